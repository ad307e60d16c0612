"""The OpenID Connect gate in front of ``--preauth oidc`` apps (see docs/preauth.md).

A request gets through with a valid session cookie or a valid bearer token from the
configured issuer, and carries the user's identity to the backend in x-backhaul-*
headers, one of them a JWT the relay signs. Anything else is answered here: a
browser is sent to the issuer to sign in (authorization code with PKCE), an API
client gets a 401. Paths under /.backhaul/ belong to the relay and never reach the app.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from backhaul.config import OidcSettings
from backhaul.errors import IdentityProviderError, TokenError
from backhaul.relay.preauth.identity import RelayIdentity, User
from backhaul.oidc_client import IssuerClient
from backhaul.relay.preauth.contract import (
    IDENTITY_HEADER_PREFIX,
    Allow,
    RequestHead,
    Respond,
)
from backhaul.relay.preauth.sessions import (
    SESSION_COOKIE,
    LoginFlow,
    SessionCookies,
    clear_cookie,
    cookie,
    login_cookie_name,
    set_cookie,
)

log = logging.getLogger("backhaul.relay.preauth.oidc")

RESERVED_PREFIX = "/.backhaul/"
CALLBACK_PATH = "/.backhaul/oidc/callback"
LOGOUT_PATH = "/.backhaul/logout"
JWKS_PATH = "/.backhaul/jwks.json"
LOGIN_COOKIE_PATH = "/.backhaul/oidc/"
#: A longer original URL is not kept for after the login (the user lands on / instead).
MAX_BACK_TO = 2048
#: The state the relay generates (token_urlsafe(16)); it also names the login cookie.
_STATE = re.compile(r"[A-Za-z0-9_-]{16,64}")
#: Header values keep printable ASCII; anything else (and % itself) is percent-encoded UTF-8.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")

HEADER_USER = IDENTITY_HEADER_PREFIX + "user"
HEADER_EMAIL = IDENTITY_HEADER_PREFIX + "email"
HEADER_NAME = IDENTITY_HEADER_PREFIX + "name"
HEADER_IDENTITY = IDENTITY_HEADER_PREFIX + "identity"


class OidcGate:
    """Pre-authentication of oidc apps against one issuer; a preauth.contract.Gate."""

    def __init__(
        self,
        settings: OidcSettings,
        client: IssuerClient,
        identity: RelayIdentity,
        cookies: SessionCookies,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.client = client
        self.identity = identity
        self.cookies = cookies
        self.clock = clock
        self._warm_up: asyncio.Task | None = None

    @classmethod
    def create(cls, data_dir: Path, settings: OidcSettings, *, clock: Callable[[], float] = time.time) -> OidcGate:
        """A gate using the signing keys of ``data_dir`` (created there at first use)."""
        identity = RelayIdentity.load(
            data_dir, lifetime=settings.identity_lifetime, cache_size=settings.identity_cache, clock=clock
        )
        cookies = SessionCookies.load(
            data_dir,
            session_lifetime=settings.session_lifetime,
            login_lifetime=settings.login_lifetime,
            max_token=settings.max_token,
        )
        return cls(settings, IssuerClient(settings, clock=clock), identity, cookies, clock=clock)

    def warm_up(self) -> None:
        """Fetch the issuer's discovery and keys in the background: the first user does not wait,
        and a misconfigured issuer shows in the log at start."""

        async def fetch() -> None:
            try:
                await self.client.prefetch()
            except IdentityProviderError as exc:
                log.error("the OpenID Connect issuer cannot be used yet; oidc apps answer 503 until it can", extra={"error": str(exc)})
            else:
                log.info("OpenID Connect issuer ready", extra={"issuer": self.settings.issuer})

        self._warm_up = asyncio.get_running_loop().create_task(fetch())

    async def close(self) -> None:
        if self._warm_up is not None:
            self._warm_up.cancel()
            await asyncio.gather(self._warm_up, return_exceptions=True)
        await self.client.close()

    # ------------------------------------------------------------------ the gate

    async def check(self, app: Any, request: RequestHead) -> Allow | Respond:
        """Let the request through with the user's identity, or answer it here."""
        path, query = _split_target(request.target)
        if path.startswith(RESERVED_PREFIX):
            return await self._reserved(request, path, query)
        authorization = request.header("authorization")
        if authorization is not None and authorization[:7].lower() == "bearer ":
            return await self._bearer(app, request, authorization[7:].strip())
        host = request.host.lower()
        user = self.cookies.read_session(cookie(request, SESSION_COOKIE), host, self.clock())
        if user is not None:
            return self._allow(app, user)
        if _is_browser(request):
            return await self._login(request)
        return _text(401, "Sign-in required: send a bearer token from the identity provider.", (
            ("www-authenticate", f'Bearer realm="{host}"'),
        ))

    def _allow(self, app: Any, user: User) -> Allow:
        audience = (getattr(app, "external_host", None) or "").lower()
        headers = [(HEADER_USER, _header_value(user.display))]
        if user.email is not None:
            headers.append((HEADER_EMAIL, _header_value(user.email)))
        if user.name is not None:
            headers.append((HEADER_NAME, _header_value(user.name)))
        headers.append((HEADER_IDENTITY, self.identity.token(audience, user)))
        return Allow(user=_header_value(user.display), headers=tuple(headers))

    # ------------------------------------------------------------------ API clients

    async def _bearer(self, app: Any, request: RequestHead, token: str) -> Allow | Respond:
        host = request.host.lower()
        if not token:
            return _challenge(host, "invalid_request", "the Authorization header carries no token")
        try:
            claims = await self.client.verify(token)
            user = User.from_claims(claims)
        except TokenError as exc:
            log.info("bearer token refused", extra={"host": host, "client": request.client, "reason": str(exc)})
            return _challenge(host, "invalid_token", str(exc))
        except IdentityProviderError as exc:
            log.error("cannot check a bearer token", extra={"host": host, "error": str(exc)})
            return _unavailable()
        return self._allow(app, user)

    # ------------------------------------------------------------------ browsers

    async def _login(self, request: RequestHead) -> Respond:
        try:
            metadata = await self.client.metadata()
        except IdentityProviderError as exc:
            log.error("cannot start a sign-in", extra={"host": request.host, "error": str(exc)})
            return _unavailable()
        flow = LoginFlow(
            state=secrets.token_urlsafe(16),
            nonce=secrets.token_urlsafe(16),
            verifier=secrets.token_urlsafe(48),
            redirect_uri=_origin(request) + CALLBACK_PATH,
            back_to=safe_back_to(request.target),
        )
        challenge = base64.urlsafe_b64encode(hashlib.sha256(flow.verifier.encode()).digest()).rstrip(b"=").decode()
        params = urlencode({
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": flow.redirect_uri,
            "scope": " ".join(self.settings.scopes),
            "state": flow.state,
            "nonce": flow.nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        })
        endpoint = metadata.authorization_endpoint
        location = f"{endpoint}{'&' if '?' in endpoint else '?'}{params}"
        login_cookie = set_cookie(
            login_cookie_name(flow.state),
            self.cookies.issue_login(request.host.lower(), flow, self.clock()),
            path=LOGIN_COOKIE_PATH,
            max_age=int(self.settings.login_lifetime),
            secure=request.scheme == "https",
        )
        return _text(302, "Sign-in required.", (("location", location), ("set-cookie", login_cookie)))

    async def _callback(self, request: RequestHead, query: str) -> Respond:
        host = request.host.lower()
        secure = request.scheme == "https"
        try:
            params: dict[str, list[str]] = {}
            for name, value in parse_qsl(query, keep_blank_values=True, max_num_fields=16):
                params.setdefault(name, []).append(value)
        except ValueError:
            return _text(400, "The sign-in answer has too many parameters.")
        state = params.get("state", [])
        if len(state) != 1 or not _STATE.fullmatch(state[0]):
            return _text(400, "The sign-in answer lacks a valid state; open the app again to sign in.")
        forget = (("set-cookie", clear_cookie(login_cookie_name(state[0]), path=LOGIN_COOKIE_PATH, secure=secure)),)
        if "error" in params:
            reason = _header_value(params["error"][0][:64])
            log.info("identity provider refused a sign-in", extra={"host": host, "error": reason})
            return _text(403, f"The identity provider refused the sign-in ({reason}).", forget)
        code = params.get("code", [])
        if len(code) != 1 or not code[0] or len(code[0]) > self.settings.max_token:
            return _text(400, "The sign-in answer lacks its code; open the app again to sign in.", forget)
        flow = self.cookies.read_login(cookie(request, login_cookie_name(state[0])), host, state[0], self.clock())
        if flow is None:
            return _text(
                400, "This sign-in has expired or was started in another browser; open the app again to sign in.", forget
            )
        try:
            tokens = await self.client.exchange(code[0], flow.redirect_uri, flow.verifier)
            user = User.from_claims(await self.client.verify(tokens["id_token"], nonce=flow.nonce))
        except IdentityProviderError as exc:
            log.warning("sign-in failed at the code exchange", extra={"host": host, "error": str(exc)})
            return _text(502, "The identity provider did not complete the sign-in; open the app again to retry.", forget)
        except TokenError as exc:
            log.warning("sign-in refused: the id_token does not verify", extra={"host": host, "reason": str(exc)})
            return _text(403, "The identity provider's answer did not verify; the sign-in was refused.", forget)
        session = set_cookie(
            SESSION_COOKIE,
            self.cookies.issue_session(host, user, self.clock()),
            path="/",
            max_age=int(self.settings.session_lifetime),
            secure=secure,
        )
        log.info("user signed in", extra={"host": host, "user": _header_value(user.display), "client": request.client})
        return _text(302, "Signed in.", (("location", safe_back_to(flow.back_to)), ("set-cookie", session), *forget))

    # ------------------------------------------------------------------ /.backhaul/

    async def _reserved(self, request: RequestHead, path: str, query: str) -> Respond:
        if request.method not in ("GET", "HEAD"):
            return _text(405, "Only GET is allowed here.", (("allow", "GET, HEAD"),))
        if path == CALLBACK_PATH:
            return await self._callback(request, query)
        if path == JWKS_PATH:
            return Respond(
                200,
                (("content-type", "application/json"), ("cache-control", "public, max-age=300")),
                self.identity.jwks_document,
            )
        if path == LOGOUT_PATH:
            forget = clear_cookie(SESSION_COOKIE, path="/", secure=request.scheme == "https")
            return _text(200, "Signed out.", (("set-cookie", forget),))
        return _text(404, "Not found: paths under /.backhaul/ belong to the relay.")


def safe_back_to(target: str) -> str:
    """``target`` if it is a path on this same host, else "/": the login never redirects elsewhere."""
    if (
        not target.startswith("/")
        or target.startswith(("//", RESERVED_PREFIX))
        or len(target) > MAX_BACK_TO
        # Browsers read a backslash as a slash and drop tabs and newlines: /\evil and /<TAB>/evil are //evil.
        or any(c == "\\" or ord(c) <= 0x20 or ord(c) >= 0x7F for c in target)
    ):
        return "/"
    return target


def _split_target(target: str) -> tuple[str, str]:
    if not target.startswith("/"):
        # absolute-form (or *): only its path and query matter here.
        parts = urlsplit(target)
        return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    return path, query


def _is_browser(request: RequestHead) -> bool:
    """A page a browser navigates to (sent to sign in), not a script or API call (given a 401)."""
    if request.method not in ("GET", "HEAD"):
        return False
    if request.header("sec-fetch-mode") == "navigate":
        return True
    return "text/html" in (request.header("accept") or "").lower()


def _origin(request: RequestHead) -> str:
    """scheme://host[:port] the browser used, the port taken from Host only if its name is the app's."""
    host = request.host.lower()
    base = f"[{host}]" if ":" in host else host
    sent = (request.header("host") or "").strip().lower()
    port = ""
    if sent.startswith(base):
        rest = sent[len(base):]
        if rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6 and 0 < int(rest[1:]) < 65536:
            port = rest
    return f"{request.scheme}://{base}{port}"


def _header_value(value: str) -> str:
    if value.isascii() and value.isprintable() and "%" not in value:
        return value
    return quote(value, safe=_HEADER_SAFE)


def _text(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Respond:
    return Respond(
        status,
        (("content-type", "text/plain; charset=utf-8"), ("cache-control", "no-store"), *headers),
        message.encode() + b"\n",
    )


def _challenge(host: str, error: str, description: str) -> Respond:
    description = _header_value(description).replace('"', "'").replace("\\", "/")
    return _text(401, f"Bearer token refused: {description}", (
        ("www-authenticate", f'Bearer realm="{host}", error="{error}", error_description="{description}"'),
    ))


def _unavailable() -> Respond:
    return _text(503, "The sign-in service cannot be reached right now; try again shortly.", (("retry-after", "10"),))
