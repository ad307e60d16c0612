"""Admin-center sessions as signed cookies, and the CSRF token bound to each.

A cookie is ``v1.<payload>.<mac>``: the payload (session id, subject, issued, expires) in
base64url JSON, the MAC an HMAC-SHA256 under a key derived from the store's session key
*and* the admin token's hash, so replacing the admin token (or the store's key) ends every
session. Any worker of any node checks a cookie with what the store holds; a signed-out
session id is remembered until its expiry (store.center_sign_out). Pure functions: the
caller reads the store and the clock.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import secrets

import orjson

#: The cookie's name. The __Host- prefix makes browsers insist on Secure, path=/ and no
#: Domain, so a sibling host cannot plant one.
COOKIE = "__Host-backhaul-admin"
#: Longest cookie value looked at (a subject is at most MAX_SUBJECT characters).
MAX_COOKIE = 1024
MAX_SUBJECT = 256
CSRF_HEADER = "X-CSRF-Token"


class Refused(Exception):
    """A session or change refused: HTTP status, short code, and what the user should do."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Session:
    id: str
    subject: str
    issued: float
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mac_key(store_key_hex: str, admin_token_hash: str) -> bytes:
    """The key cookies and CSRF tokens are signed with (see the module's docstring)."""
    return hmac.new(bytes.fromhex(store_key_hex), b"backhaul-admin-center|" + admin_token_hash.encode(), hashlib.sha256).digest()


def _mac(key: bytes, what: bytes) -> str:
    return _b64(hmac.new(key, what, hashlib.sha256).digest())


def issue(key: bytes, subject: str, now: float, lifetime: float) -> tuple[Session, str]:
    """A new session for ``subject`` and its cookie value."""
    session = Session(id=secrets.token_urlsafe(16), subject=subject[:MAX_SUBJECT], issued=now, expires=now + lifetime)
    payload = _b64(orjson.dumps({"sid": session.id, "sub": session.subject, "iat": now, "exp": session.expires}))
    return session, f"v1.{payload}.{_mac(key, payload.encode())}"


def verify(key: bytes, cookie: str, now: float, signed_out: dict[str, float]) -> Session:
    """The session of a cookie value; Refused(401) if it is forged, expired or signed out."""
    parts = cookie.split(".") if len(cookie) <= MAX_COOKIE else []
    if len(parts) != 3 or parts[0] != "v1":
        raise Refused(401, "unauthorized", "the session cookie is malformed; sign in again at /admin/")
    payload, mac = parts[1], parts[2]
    if not hmac.compare_digest(_mac(key, payload.encode()), mac):
        raise Refused(401, "unauthorized", "the session is not valid here (forged, or the admin token changed); sign in again at /admin/")
    try:
        data = orjson.loads(_unb64(payload))
        session = Session(id=str(data["sid"]), subject=str(data["sub"]), issued=float(data["iat"]), expires=float(data["exp"]))
    except (ValueError, KeyError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise Refused(401, "unauthorized", "the session cookie is malformed; sign in again at /admin/") from None
    if now >= session.expires:
        raise Refused(401, "session_expired", "the session has expired; sign in again at /admin/")
    if session.id in signed_out:
        raise Refused(401, "signed_out", "this session was signed out; sign in again at /admin/")
    return session


def seal(key: bytes, purpose: str, data: dict, now: float, lifetime: float) -> str:
    """``data`` signed for ``purpose`` until ``now + lifetime`` (the OIDC sign-in's flow cookie)."""
    payload = _b64(orjson.dumps({**data, "exp": now + lifetime}))
    return f"{payload}.{_mac(key, purpose.encode() + b'|' + payload.encode())}"


def unseal(key: bytes, purpose: str, value: str, now: float) -> dict | None:
    """What ``seal`` signed, or None if forged, for another purpose, malformed or expired."""
    payload, _, mac = value.partition(".") if len(value) <= MAX_COOKIE else ("", "", "")
    if not payload or not hmac.compare_digest(_mac(key, purpose.encode() + b"|" + payload.encode()), mac):
        return None
    try:
        data = orjson.loads(_unb64(payload))
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("exp"), (int, float)) or now >= data["exp"]:
        return None
    return data


def csrf_token(key: bytes, session: Session) -> str:
    """The CSRF token of a session: its pages carry it, its changes must send it back."""
    return _mac(key, b"csrf|" + session.id.encode())


def check_csrf(key: bytes, session: Session, presented: str | None) -> None:
    """Refused(403) unless ``presented`` is the session's CSRF token (compared in constant time)."""
    if not presented or not hmac.compare_digest(csrf_token(key, session).encode(), presented.encode()[:128]):
        raise Refused(403, "csrf_refused", f"a change from the admin center needs its page's {CSRF_HEADER}; reload the page")
