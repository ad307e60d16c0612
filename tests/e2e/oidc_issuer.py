"""A small OpenID Connect issuer for tests, served over HTTPS on 127.0.0.1.

It serves discovery, a JWKS, an authorization endpoint that consents at once for one
configured user and redirects back with a code, and a token endpoint (client secret,
PKCE S256, single-use codes). Its certificate comes from a CA of our own (backhaul.pki),
written to ``ca_path`` for the relay's ``--oidc-ca``. Tests mint bearer tokens with
:meth:`OidcIssuer.mint` and rotate its signing key with :meth:`OidcIssuer.rotate`.

It runs on its own event loop in a thread, so it serves the test process and the relay
processes a test starts alike.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import secrets
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlencode, urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from backhaul import pki

CALLBACK_PATH = "/.backhaul/oidc/callback"
DEFAULT_USER = {
    "sub": "user-0001",
    "email": "alice@example.test",
    "email_verified": True,
    "name": "Alice Example",
    "preferred_username": "alice",
}


class SigningKey:
    """One RSA key of the issuer and the id it is published under."""

    def __init__(self, key: rsa.RSAPrivateKey | None = None) -> None:
        self.kid = secrets.token_hex(8)
        self.key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, Any]:
        return {**jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True), "kid": self.kid, "use": "sig", "alg": "RS256"}


class OidcIssuer:
    """The test issuer; use as a context manager (it stops its server on exit)."""

    def __init__(self, workdir: Path, client_id: str = "backhaul-test", client_secret: str = "test-secret-0123") -> None:
        self.workdir = workdir
        self.client_id = client_id
        self.client_secret = client_secret
        self.user = dict(DEFAULT_USER)
        self.keys = [SigningKey()]
        #: Keys the JWKS publishes; rotate() changes it.
        self.published = list(self.keys)
        #: Extra claims (or None to remove one) applied to the next id_tokens.
        self.id_token_changes: dict[str, Any] = {}
        #: When set, the authorization endpoint answers with this error instead of a code.
        self.deny: str | None = None
        #: Requests served, by path.
        self.hits: collections.Counter[str] = collections.Counter()
        self.ca_path = workdir / "issuer-ca.pem"
        self.secret_path = workdir / "issuer-client-secret"
        self.url = ""
        self._codes: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def issuer(self) -> str:
        return self.url

    @property
    def key(self) -> SigningKey:
        """The key new tokens are signed with."""
        return self.keys[-1]

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ca = pki.make_ca("backhaul test issuer CA")
        key, cert = pki.make_service_cert(ca, ["127.0.0.1", "localhost"])
        pki.write_file(self.ca_path, ca.cert_pem)
        pki.write_private(self.workdir / "issuer.key", pki.key_to_pem(key))
        pki.write_file(self.workdir / "issuer.pem", pki.cert_to_pem(cert))
        pki.write_private(self.secret_path, self.client_secret.encode() + b"\n")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.workdir / "issuer.pem", self.workdir / "issuer.key")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{sock.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
            await self._runner.setup()
            await web.SockSite(self._runner, sock, ssl_context=ctx).start()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="oidc-issuer", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    # ------------------------------------------------------------------ test controls

    def rotate(self, keep_old: bool = False) -> SigningKey:
        """Sign with a new key from now on; the JWKS publishes it (and the old one if ``keep_old``)."""
        new = SigningKey()
        self.published = [*self.published, new] if keep_old else [new]
        self.keys.append(new)
        return new

    def mint(
        self,
        *,
        lifetime: float = 300,
        key: SigningKey | None = None,
        kid: str | None = "",
        alg: str = "RS256",
        **changes: Any,
    ) -> str:
        """A token for the configured user, as the issuer would sign it, with ``changes`` to its claims.

        ``key`` signs it (default: the current key); ``kid`` overrides the key id in the
        header (None: no key id). A claim changed to None is removed.
        """
        now = int(time.time())
        claims: dict[str, Any] = {
            **self.user,
            "iss": self.issuer,
            "aud": self.client_id,
            "iat": now,
            "exp": now + int(lifetime),
        }
        for name, value in changes.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        signer = key or self.key
        headers = {"kid": signer.kid if kid == "" else kid}
        if headers["kid"] is None:
            del headers["kid"]
        return jwt.encode(claims, signer.key, algorithm=alg, headers=headers)

    # ------------------------------------------------------------------ the issuer

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler):
        self.hits[request.path] += 1
        return await handler(request)

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.url}/authorize",
            "token_endpoint": f"{self.url}/token",
            "jwks_uri": f"{self.url}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [k.jwk() for k in self.published]})

    async def _authorize(self, request: web.Request) -> web.Response:
        q = request.query
        redirect_uri = q.get("redirect_uri", "")
        target = urlsplit(redirect_uri)
        if q.get("client_id") != self.client_id or target.path != CALLBACK_PATH or target.scheme not in ("http", "https"):
            return web.Response(status=400, text="unknown client or unregistered redirect_uri")
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return web.Response(status=400, text="only the code flow with PKCE S256 is supported")
        if "openid" not in q.get("scope", "").split():
            return web.Response(status=400, text="scope must include openid")
        if self.deny is not None:
            raise web.HTTPFound(f"{redirect_uri}?{urlencode({'error': self.deny, 'state': q.get('state', '')})}")
        code = secrets.token_urlsafe(24)
        self._codes[code] = {
            "redirect_uri": redirect_uri,
            "challenge": q["code_challenge"],
            "nonce": q.get("nonce"),
            "user": dict(self.user),
            "expires": time.time() + 60,
        }
        raise web.HTTPFound(f"{redirect_uri}?{urlencode({'code': code, 'state': q.get('state', '')})}")

    def _client_ok(self, request: web.Request, form) -> bool:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            client, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        else:
            client, secret = form.get("client_id", ""), form.get("client_secret", "")
        return client == self.client_id and hmac.compare_digest(secret, self.client_secret)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if not self._client_ok(request, form):
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "authorization_code":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        grant = self._codes.pop(str(form.get("code", "")), None)
        if grant is None or grant["expires"] < time.time() or grant["redirect_uri"] != form.get("redirect_uri"):
            return web.json_response({"error": "invalid_grant"}, status=400)
        verifier = str(form.get("code_verifier", ""))
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not hmac.compare_digest(challenge, grant["challenge"]):
            return web.json_response({"error": "invalid_grant", "error_description": "PKCE verification failed"}, status=400)
        changes = {"nonce": grant["nonce"], **self.id_token_changes}
        saved, self.user = self.user, grant["user"]
        try:
            id_token = self.mint(**changes)
            access_token = self.mint()
        finally:
            self.user = saved
        return web.json_response(
            {"access_token": access_token, "token_type": "Bearer", "expires_in": 300, "id_token": id_token},
            headers={"Cache-Control": "no-store"},
        )
