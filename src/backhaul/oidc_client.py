"""The relay as an OpenID Connect relying party: discovery, JWKS, code exchange, token checks.

Discovery and JWKS are cached for ``metadata_ttl``. A token signed by a key id the
cache does not know refetches the JWKS (that is how the issuer's key rotation reaches
the relay), but at most once per ``jwks_refetch_interval``, so a flood of tokens with
made-up key ids costs the issuer one request. Every answer from the issuer is read
with a size limit and a timeout; when the issuer is down, stale metadata and keys
keep being used.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
import orjson

from backhaul.config import OidcSettings
from backhaul.errors import ConfigError, IdentityProviderError, TokenError

log = logging.getLogger("backhaul.relay.preauth.oidc")

#: Which key type (and curve) each accepted algorithm needs.
_KEY_TYPES = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
#: A failed discovery is retried after this long while the stale copy is used, seconds.
_RETRY_AFTER_FAILURE = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class IssuerMetadata:
    """The parts of the issuer's discovery document the relay uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    #: client_secret_basic (default) or client_secret_post.
    token_auth: str


class IssuerClient:
    """One OpenID Connect issuer, as seen by one relay worker."""

    def __init__(self, settings: OidcSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._metadata: IssuerMetadata | None = None
        self._metadata_until = float("-inf")
        self._keys: dict[str, dict[str, Any]] = {}
        self._keys_until = float("-inf")
        self._keys_fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        # sha256(token) -> claims of bearer tokens that verified, so a client's next requests
        # with the same token cost a dict lookup instead of a signature check.
        self._verified: collections.OrderedDict[bytes, dict[str, Any]] = collections.OrderedDict()
        #: Calls made to the issuer, by kind (for logs and tests).
        self.fetches = {"discovery": 0, "jwks": 0, "token": 0}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ HTTP

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            try:
                ctx = ssl.create_default_context(cafile=self.settings.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load --oidc-ca {self.settings.ca_file}: {exc}") from exc
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx, limit=16),
                timeout=aiohttp.ClientTimeout(total=self.settings.http_timeout),
                headers={"Accept": "application/json"},
            )
        return self._session

    async def _call(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        limit = self.settings.max_document
        try:
            async with self._client().request(method, url, allow_redirects=False, **kwargs) as resp:
                raw = await resp.content.read(limit + 1)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, ssl.SSLError, OSError) as exc:
            raise IdentityProviderError(
                f"cannot reach the OpenID Connect issuer at {url} ({exc.__class__.__name__}: {exc}); "
                "check --oidc-issuer, --oidc-ca and that the issuer is up"
            ) from exc
        if len(raw) > limit:
            raise IdentityProviderError(f"the issuer's answer to {method} {url} is larger than {limit} bytes; refusing it")
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as exc:
            raise IdentityProviderError(f"the issuer answered {method} {url} with HTTP {status} and no JSON") from exc

    # ------------------------------------------------------------------ discovery

    async def metadata(self) -> IssuerMetadata:
        """The issuer's discovery document, cached; a stale copy while the issuer is unreachable."""
        if self.clock() < self._metadata_until and self._metadata is not None:
            return self._metadata
        async with self._lock:
            return await self._metadata_locked()

    async def _metadata_locked(self) -> IssuerMetadata:
        if self.clock() < self._metadata_until and self._metadata is not None:
            return self._metadata
        try:
            self._metadata = await self._discover()
            self._metadata_until = self.clock() + self.settings.metadata_ttl
        except IdentityProviderError as exc:
            if self._metadata is None:
                raise
            log.warning("issuer discovery failed; using the cached document", extra={"error": str(exc)})
            self._metadata_until = self.clock() + _RETRY_AFTER_FAILURE
        return self._metadata

    async def _discover(self) -> IssuerMetadata:
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        self.fetches["discovery"] += 1
        status, doc = await self._call("GET", url)
        if status != 200 or not isinstance(doc, dict):
            raise IdentityProviderError(f"GET {url} answered HTTP {status}, not a discovery document; check --oidc-issuer")
        if doc.get("issuer") != self.settings.issuer:
            raise IdentityProviderError(
                f"the discovery document at {url} names issuer {doc.get('issuer')!r}, not {self.settings.issuer!r}; "
                "pass exactly the issuer it names as --oidc-issuer"
            )
        endpoints = {}
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = doc.get(name)
            if not isinstance(value, str) or not value.startswith("https://"):
                raise IdentityProviderError(f"the discovery document at {url} has no https {name}")
            endpoints[name] = value
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        token_auth = "client_secret_post" if "client_secret_basic" not in methods and "client_secret_post" in methods else "client_secret_basic"
        return IssuerMetadata(issuer=doc["issuer"], token_auth=token_auth, **endpoints)

    async def prefetch(self) -> None:
        """Fetch discovery and keys now rather than at the first request."""
        await self.metadata()
        await self._refresh_keys(expired=True)

    # ------------------------------------------------------------------ keys

    async def _key(self, kid: str | None) -> dict[str, Any] | None:
        if self.clock() >= self._keys_until:
            await self._refresh_keys(expired=True)
        key = self._find(kid)
        if key is None:
            if self.clock() - self._keys_fetched_at >= self.settings.jwks_refetch_interval:
                await self._refresh_keys(expired=False)
            elif self._lock.locked():
                # A fetch is under way, perhaps for a token under this same new key id: wait for its keys.
                async with self._lock:
                    pass
            key = self._find(kid)
        return key

    def _find(self, kid: str | None) -> dict[str, Any] | None:
        if kid is not None:
            return self._keys.get(kid)
        # A token without a key id is only usable when the issuer has a single key.
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    async def _refresh_keys(self, *, expired: bool) -> None:
        started = self.clock()
        async with self._lock:
            # Whoever held the lock before us may have just fetched them.
            if self._keys_fetched_at >= started or (not expired and started - self._keys_fetched_at < self.settings.jwks_refetch_interval):
                return
            self._keys_fetched_at = self.clock()
            try:
                metadata = await self._metadata_locked()
                keys = await self._fetch_keys(metadata.jwks_uri)
                if not keys.keys() >= self._keys.keys():
                    # A key left the JWKS: what it signed must be checked again (and fail).
                    self._verified.clear()
                self._keys = keys
                self._keys_until = self.clock() + self.settings.metadata_ttl
            except IdentityProviderError as exc:
                if not self._keys:
                    raise
                log.warning("issuer JWKS fetch failed; using the cached keys", extra={"error": str(exc)})
                self._keys_until = self.clock() + _RETRY_AFTER_FAILURE

    async def _fetch_keys(self, url: str) -> dict[str, dict[str, Any]]:
        self.fetches["jwks"] += 1
        status, doc = await self._call("GET", url)
        if status != 200 or not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise IdentityProviderError(f"GET {url} answered HTTP {status}, not a JWKS")
        keys: dict[str, dict[str, Any]] = {}
        for jwk in doc["keys"]:
            if len(keys) >= self.settings.max_keys:
                log.warning("issuer JWKS has too many keys; the rest are ignored", extra={"kept": len(keys), "url": url})
                break
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            try:
                parsed = jwt.PyJWK(jwk)
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                log.info("issuer JWKS key skipped", extra={"kid": str(jwk.get("kid"))[:64], "error": str(exc)})
                continue
            keys[str(jwk.get("kid", ""))] = {"jwk": jwk, "key": parsed.key}
        return keys

    # ------------------------------------------------------------------ tokens

    async def verify(self, token: str, *, nonce: str | None = None) -> dict[str, Any]:
        """The claims of a token the issuer signed for this client; TokenError if it is not one.

        Checks: signature by a current issuer key with an allowed algorithm, iss, aud
        (and azp when several audiences), exp/nbf/iat within the leeway, and for an
        id_token from a login, its nonce.
        """
        if len(token) > self.settings.max_token:
            raise TokenError(f"the token is longer than {self.settings.max_token} bytes")
        digest = hashlib.sha256(token.encode()).digest()
        if nonce is None and digest in self._verified:
            claims = self._verified[digest]
            try:
                self._check_times(claims)
            except TokenError:
                del self._verified[digest]
                raise
            self._verified.move_to_end(digest)
            return claims
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError(f"not a signed JWT ({exc})") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.settings.algorithms or alg not in _KEY_TYPES:
            raise TokenError(f"signature algorithm {str(alg)[:16]!r} is not accepted")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("the token's key id is not a string")
        entry = await self._key(kid)
        if entry is None:
            raise TokenError("the token is signed by a key the issuer does not publish")
        jwk = entry["jwk"]
        kty, crv = _KEY_TYPES[alg]
        if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv) or jwk.get("alg", alg) != alg:
            raise TokenError(f"the issuer's key {str(kid)[:64]!r} is not a {alg} key")
        try:
            claims = jwt.decode(
                token, entry["key"], algorithms=[alg], audience=self.settings.client_id, issuer=self.settings.issuer,
                options={"require": ["iss", "aud", "exp", "iat", "sub"], "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidSignatureError as exc:
            raise TokenError("the token's signature does not verify") from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenError("the token is not for this relay's client id (aud)") from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenError("the token was not issued by the configured issuer (iss)") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise TokenError(f"the token is not acceptable ({exc})") from exc
        self._check_times(claims)
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.settings.client_id:
            raise TokenError("the token has several audiences and is not authorized for this client (azp)")
        if nonce is not None:
            if not hmac.compare_digest(str(claims.get("nonce", "")), nonce):
                raise TokenError("the id_token's nonce does not match the login")
            return claims
        self._verified[digest] = claims
        while len(self._verified) > self.settings.verified_cache:
            self._verified.popitem(last=False)
        return claims

    @property
    def verified(self) -> int:
        """How many verified bearer tokens are kept."""
        return len(self._verified)

    def _check_times(self, claims: dict[str, Any]) -> None:
        now, leeway = self.clock(), self.settings.leeway
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise TokenError(f"the token's {name} is not a number")
        if claims["exp"] <= now - leeway:
            raise TokenError("the token has expired")
        if claims.get("nbf") is not None and claims["nbf"] > now + leeway:
            raise TokenError("the token is not valid yet (nbf)")
        if claims["iat"] > now + leeway:
            raise TokenError("the token was issued in the future (iat)")

    async def exchange(self, code: str, redirect_uri: str, verifier: str) -> dict[str, Any]:
        """Trade an authorization code for the issuer's tokens (with the PKCE verifier)."""
        metadata = await self.metadata()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}
        headers = {}
        secret = self.settings.client_secret
        if secret is not None and metadata.token_auth == "client_secret_basic":
            # RFC 6749 2.3.1: client id and secret are form-urlencoded before the Basic encoding.
            pair = f"{quote_plus(self.settings.client_id)}:{quote_plus(secret)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        else:
            form["client_id"] = self.settings.client_id
            if secret is not None:
                form["client_secret"] = secret
        self.fetches["token"] += 1
        status, body = await self._call("POST", metadata.token_endpoint, data=form, headers=headers)
        if status != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            raise IdentityProviderError(
                f"the issuer's token endpoint refused the code (HTTP {status}, {str(error)[:64]}); "
                "check the client id and secret and that the redirect URI is registered"
            )
        if not isinstance(body.get("id_token"), str):
            raise IdentityProviderError("the issuer's token endpoint answered without an id_token; is the openid scope allowed?")
        return body

