"""A private web app behind an oidc app, run as its own process:

    python oidc_backend.py PORTFILE JWKS_URL APP_HOST RELAY_ISSUER

binds 127.0.0.1:0 and writes the port to PORTFILE (readiness). Every request it gets
is counted; it verifies the x-backhaul-identity header the way a real backend would,
against the relay's JWKS at JWKS_URL (fetched with Host: APP_HOST, refetched on an
unknown key id), and answers JSON with what it saw and what verified. GET /__count on
the port itself (not through the relay) answers how many requests came in.
"""

from __future__ import annotations

import os
import socket
import sys

import jwt
from aiohttp import ClientSession, web


class Backend:
    def __init__(self, jwks_url: str, host: str, issuer: str) -> None:
        self.jwks_url, self.host, self.issuer = jwks_url, host, issuer
        self.keys: dict[str, jwt.PyJWK] = {}
        self.count = 0

    async def key(self, kid: str) -> jwt.PyJWK | None:
        if kid not in self.keys:
            async with ClientSession() as session, session.get(self.jwks_url, headers={"Host": self.host}) as resp:
                resp.raise_for_status()
                self.keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(await resp.json()).keys}
        return self.keys.get(kid)

    async def verify(self, token: str | None) -> dict | str:
        if token is None:
            return "no x-backhaul-identity header"
        try:
            key = await self.key(jwt.get_unverified_header(token)["kid"])
            if key is None:
                return "unknown key id"
            return jwt.decode(token, key.key, algorithms=["ES256"], audience=self.host, issuer=self.issuer)
        except (jwt.PyJWTError, KeyError) as exc:
            return f"refused: {exc}"

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/__count" and request.headers.get("Host", "").startswith("127.0.0.1"):
            return web.json_response({"count": self.count})
        self.count += 1
        identity = await self.verify(request.headers.get("x-backhaul-identity"))
        return web.json_response({
            "path": request.path_qs,
            "headers": [[k.lower(), v] for k, v in request.headers.items()],
            "identity": identity,
        })


def main() -> None:
    portfile, jwks_url, host, issuer = sys.argv[1:5]
    backend = Backend(jwks_url, host, issuer)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # Listening before the port is announced: a client that reads the file can connect at once.
    sock.listen(128)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(sock.getsockname()[1]))
    os.replace(portfile + ".tmp", portfile)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


if __name__ == "__main__":
    main()
