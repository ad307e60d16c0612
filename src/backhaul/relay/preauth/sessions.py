"""Login state and browser sessions, kept in cookies the relay signs (never in process memory).

Any relay worker must accept a session or finish a login another worker started, so
both live in the browser: a ``backhaul_login_<state>`` cookie holds one login in
progress (nonce, PKCE verifier, where to go back to) and a ``backhaul_session`` cookie
holds the signed-in user. Both are ``<base64url JSON claims>.<base64url HMAC-SHA256>``
under keys derived from ``session.key`` in the data dir, each bound to the app host it
was issued for. Nobody but the relay reads them, so they are not JWTs: checking one is
a single HMAC, on the path of every request a browser makes.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any

import orjson

from backhaul.relay.preauth.identity import User
from backhaul.relay.preauth.keyfiles import load_or_create
from backhaul.relay.preauth.contract import RELAY_COOKIE_PREFIX, RequestHead

SESSION_KEY_FILE = "session.key"
SESSION_COOKIE = RELAY_COOKIE_PREFIX + "session"
LOGIN_COOKIE_PREFIX = RELAY_COOKIE_PREFIX + "login_"


@dataclasses.dataclass(frozen=True, slots=True)
class LoginFlow:
    """One authorization-code login in progress."""

    state: str
    nonce: str
    verifier: str
    #: The redirect_uri sent to the issuer; the code exchange must repeat it exactly.
    redirect_uri: str
    #: Where the user goes after signing in: a path on the same host.
    back_to: str


class SessionCookies:
    """Issues and checks the relay's login and session cookies."""

    def __init__(self, secret: bytes, *, session_lifetime: float, login_lifetime: float, max_token: int) -> None:
        if len(secret) < 32:
            raise ValueError("the session secret must be at least 32 bytes")
        # One key per use, so a login cookie can never be replayed as a session and back.
        self._session_key = hmac.new(secret, b"backhaul session cookie", hashlib.sha256).digest()
        self._login_key = hmac.new(secret, b"backhaul login cookie", hashlib.sha256).digest()
        self.session_lifetime = session_lifetime
        self.login_lifetime = login_lifetime
        self.max_token = max_token

    @classmethod
    def load(cls, data_dir: Path, **kwargs: Any) -> SessionCookies:
        """Cookies signed under the data dir's session.key (created at first use)."""
        return cls(load_or_create(data_dir / SESSION_KEY_FILE, lambda: secrets.token_bytes(32)), **kwargs)

    # ------------------------------------------------------------------ sessions

    def issue_session(self, host: str, user: User, now: float) -> str:
        claims = {**user.claims(), "aud": host, "iat": int(now), "exp": int(now + self.session_lifetime)}
        return _sign(self._session_key, claims)

    def read_session(self, value: str | None, host: str, now: float) -> User | None:
        """The user of a session cookie issued for ``host`` and not expired; None otherwise."""
        claims = self._decode(value, self._session_key, host, now)
        if claims is None or not isinstance(claims.get("sub"), str) or not isinstance(claims.get("idp"), str):
            return None
        return User.from_session(claims)

    # ------------------------------------------------------------------ logins

    def issue_login(self, host: str, flow: LoginFlow, now: float) -> str:
        claims = {
            "aud": host,
            "st": flow.state,
            "nonce": flow.nonce,
            "cv": flow.verifier,
            "ru": flow.redirect_uri,
            "back": flow.back_to,
            "exp": int(now + self.login_lifetime),
        }
        return _sign(self._login_key, claims)

    def read_login(self, value: str | None, host: str, state: str, now: float) -> LoginFlow | None:
        """The login a callback for ``state`` on ``host`` finishes; None if forged, stale or another's."""
        claims = self._decode(value, self._login_key, host, now)
        if claims is None:
            return None
        fields = [claims.get(k) for k in ("st", "nonce", "cv", "ru", "back")]
        if not all(isinstance(f, str) for f in fields) or not hmac.compare_digest(fields[0], state):
            return None
        return LoginFlow(*fields)

    def _decode(self, value: str | None, key: bytes, host: str, now: float) -> dict[str, Any] | None:
        if not value or len(value) > self.max_token:
            return None
        payload, _, mac = value.rpartition(".")
        try:
            if not hmac.compare_digest(mac.encode(), _mac(key, payload.encode())):
                return None
            claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, UnicodeError):
            return None
        if not isinstance(claims, dict) or claims.get("aud") != host:
            return None
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= now:
            return None
        return claims


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _mac(key: bytes, payload: bytes) -> bytes:
    return _b64(hmac.digest(key, payload, "sha256"))


def _sign(key: bytes, claims: dict[str, Any]) -> str:
    payload = _b64(orjson.dumps(claims))
    return (payload + b"." + _mac(key, payload)).decode("ascii")


def login_cookie_name(state: str) -> str:
    return LOGIN_COOKIE_PREFIX + state


def cookie(request: RequestHead, name: str) -> str | None:
    """The value of the cookie ``name`` in the request (the first one if repeated)."""
    for key, header in request.headers:
        if key != "cookie":
            continue
        for pair in header.split(";"):
            cname, sep, value = pair.strip().partition("=")
            if sep and cname == name:
                return value.strip().strip('"')
    return None


def set_cookie(name: str, value: str, *, path: str, max_age: int, secure: bool) -> str:
    """A Set-Cookie value for a host-only, script-invisible cookie."""
    attributes = [f"{name}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)


def clear_cookie(name: str, *, path: str, secure: bool) -> str:
    """A Set-Cookie value that deletes the cookie ``name``."""
    return set_cookie(name, "", path=path, max_age=0, secure=secure)
