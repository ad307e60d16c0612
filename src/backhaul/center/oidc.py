"""Signing in to the admin center with OpenID Connect, when the relay has an issuer
(``service run --oidc-issuer``) and an admin claim (``--admin-oidc-claim NAME=VALUE``).

The authorization code flow with PKCE and a nonce, through the relay's own issuer client
(backhaul/oidc_client.py: discovery, JWKS, code exchange, id_token checks). The flow's
secrets ride in a short-lived cookie signed with the center's key (SameSite=Lax: the
issuer's redirect back is a cross-site navigation). Only an id_token whose claim NAME is
VALUE, or a list holding VALUE (``groups=backhaul-admins``), starts a session.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from backhaul.center import sessions
from backhaul.config import OidcSettings
from backhaul.errors import IdentityProviderError, TokenError
from backhaul.oidc_client import IssuerClient

log = logging.getLogger("backhaul.center")

#: The redirect URI's path on the listen port: the same path the HTTP edge's oidc apps use,
#: so an issuer needs one more redirect URI registered (https://RELAY:PORT/.backhaul/oidc/callback).
CALLBACK_PATH = "/.backhaul/oidc/callback"
FLOW_COOKIE = "__Host-backhaul-admin-login"
PURPOSE = "admin-oidc-flow"


def parse_claim(value: str) -> tuple[str, str]:
    """``NAME=VALUE`` of --admin-oidc-claim; ValueError says what is wrong."""
    name, sep, wanted = value.partition("=")
    if not sep or not name.strip() or not wanted.strip():
        raise ValueError(f"--admin-oidc-claim {value!r}: expected NAME=VALUE, e.g. groups=backhaul-admins")
    return name.strip(), wanted.strip()


def claim_allows(claims: dict[str, Any], name: str, wanted: str) -> bool:
    """True when claim ``name`` is ``wanted`` or a list holding it."""
    value = claims.get(name)
    if isinstance(value, list):
        return wanted in value
    return isinstance(value, str) and value == wanted


class AdminOidc:
    """One worker's OIDC sign-in to the admin center."""

    def __init__(self, settings: OidcSettings, claim: tuple[str, str]) -> None:
        self.settings = settings
        self.claim = claim
        self.client = IssuerClient(settings)

    async def close(self) -> None:
        await self.client.close()

    async def login(self, key: bytes, host: str, now: float) -> tuple[str, str]:
        """The issuer's authorization URL and the flow cookie's value."""
        state, nonce, verifier = secrets.token_urlsafe(16), secrets.token_urlsafe(16), secrets.token_urlsafe(48)
        redirect_uri = f"https://{host}{CALLBACK_PATH}"
        metadata = await self.client.metadata()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        params = urlencode({
            "response_type": "code", "client_id": self.settings.client_id, "redirect_uri": redirect_uri,
            "scope": " ".join(self.settings.scopes), "state": state, "nonce": nonce,
            "code_challenge": challenge, "code_challenge_method": "S256",
        })
        endpoint = metadata.authorization_endpoint
        flow = sessions.seal(
            key, PURPOSE, {"state": state, "nonce": nonce, "verifier": verifier, "redirect_uri": redirect_uri},
            now, self.settings.login_lifetime,
        )
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{params}", flow

    async def finish(self, key: bytes, query: Any, flow_cookie: str, now: float) -> str:
        """The subject of a completed sign-in; sessions.Refused says why not."""
        if "error" in query:
            raise sessions.Refused(403, "oidc_refused", f"the identity provider refused the sign-in ({query['error'][:64]})")
        flow = sessions.unseal(key, PURPOSE, flow_cookie, now)
        state, code = query.get("state", ""), query.get("code", "")
        if flow is None or not secrets.compare_digest(str(flow.get("state", "")), state):
            raise sessions.Refused(400, "oidc_flow", "this sign-in expired or was started in another browser; start it again")
        if not code or len(code) > self.settings.max_token:
            raise sessions.Refused(400, "oidc_flow", "the sign-in answer lacks its code; start it again")
        try:
            tokens = await self.client.exchange(code, flow["redirect_uri"], flow["verifier"])
            claims = await self.client.verify(tokens["id_token"], nonce=flow["nonce"])
        except IdentityProviderError as exc:
            raise sessions.Refused(502, "oidc_unavailable", f"the identity provider did not complete the sign-in: {exc}") from None
        except TokenError as exc:
            raise sessions.Refused(403, "oidc_refused", f"the identity provider's answer did not verify: {exc}") from None
        subject = str(claims.get("email") or claims.get("preferred_username") or claims.get("sub"))
        name, wanted = self.claim
        if not claim_allows(claims, name, wanted):
            log.warning("admin center: OIDC sign-in refused: not an admin", extra={"subject": subject, "claim": name, "wanted": wanted})
            raise sessions.Refused(403, "not_an_admin", f"{subject} is signed in but has no {name}={wanted} claim; ask for admin rights")
        return subject


def flow_cookie(response: web.StreamResponse, value: str, max_age: int) -> None:
    response.set_cookie(FLOW_COOKIE, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="Lax")
