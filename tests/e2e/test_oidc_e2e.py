"""oidc apps end to end: a browser with a cookie jar and API clients -> relay HTTP(S) edge
(two workers) -> gate -> tunnel -> connector -> a backend that verifies the relay's identity token.

The issuer is the test issuer on loopback HTTPS; the relay, the connector and the backend
are real processes set up through the CLI. The backend counts the requests it gets, so
"never reaches a connector" is checked where it matters: at the app.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
import urllib.request

import aiohttp
import yarl
import pytest
from aiohttp.abc import AbstractResolver

from backhaul import pki

from .harness import HERE, Proc, System, free_port, wait_until
from .oidc_issuer import OidcIssuer, SigningKey
from .test_oidc_relay import oidc_flags

pytestmark = pytest.mark.e2e

HOST = "app.test"


class LoopbackResolver(AbstractResolver):
    """Every name is 127.0.0.1: the app's external host reaches the relay on loopback."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        return None


class Deployment:
    """Issuer, relay (HTTP and HTTPS edge, two workers), connector, backend and an oidc app."""

    def __init__(self, workdir, issuer: OidcIssuer) -> None:
        self.workdir = workdir
        self.issuer = issuer
        self.system = System(workdir)
        self.https_port = free_port()
        self.backend: Proc | None = None
        self.backend_port = 0

    def start(self) -> None:
        system = self.system
        system.init()
        # The edge's certificate for the app host, from a CA of the operator's own.
        edge_ca = pki.make_ca("edge test CA")
        key, cert = pki.make_service_cert(edge_ca, [HOST])
        pki.write_file(self.workdir / "edge-ca.pem", edge_ca.cert_pem)
        pki.write_file(self.workdir / "edge.pem", pki.cert_to_pem(cert))
        pki.write_private(self.workdir / "edge.key", pki.key_to_pem(key))
        system.start_relay(workers=2, extra=(
            "--https", f"127.0.0.1:{self.https_port}",
            "--https-cert", str(self.workdir / "edge.pem"), "--https-key", str(self.workdir / "edge.key"),
            *oidc_flags(self.issuer),
        ))
        portfile = self.workdir / "oidc-backend.port"
        self.backend = Proc("oidc-backend", [
            sys.executable, str(HERE / "oidc_backend.py"), str(portfile),
            f"http://127.0.0.1:{system.http_port}/.backhaul/jwks.json", HOST, f"urn:backhaul:relay:{system.ca_sha256}",
        ], self.workdir)
        system.procs.append(self.backend)
        self.backend_port = int(wait_until(lambda: portfile.exists() and portfile.read_text(), 15, "the backend to listen"))
        system.start_connector("one", tunnels=2)
        system.publish_http("wiki", HOST, f"http://127.0.0.1:{self.backend_port}", "--preauth", "oidc")

    def backend_count(self) -> int:
        """Requests the backend got, asked of it directly (not through the relay)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.backend_port}/__count", timeout=5) as response:
            return json.loads(response.read())["count"]

    def client(self, *, cookies: bool = True) -> aiohttp.ClientSession:
        """A client trusting the issuer's and the edge's CAs, reaching app.test on loopback."""
        ctx = ssl.create_default_context(cafile=str(self.issuer.ca_path))
        ctx.load_verify_locations(cafile=str(self.workdir / "edge-ca.pem"))
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, resolver=LoopbackResolver(), force_close=True),
            cookie_jar=aiohttp.CookieJar() if cookies else aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.system.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://{HOST}:{self.https_port}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """One deployment for the tests of this module (each leaves it as it found it)."""
    tmp_path = tmp_path_factory.mktemp("oidc-e2e")
    with OidcIssuer(tmp_path) as issuer:
        deployment_ = Deployment(tmp_path, issuer)
        try:
            deployment_.start()
            token = issuer.mint(lifetime=3600)

            async def through_every_worker() -> bool:
                # Fresh connections spread over both relay workers: ready when all get the app.
                async with deployment_.client() as client:
                    for _ in range(16):
                        async with client.get(f"{deployment_.http_url}/ready", headers={"Authorization": f"Bearer {token}"}) as r:
                            if r.status != 200:
                                return False
                return True

            wait_until(lambda: asyncio.run(through_every_worker()), 40, "the oidc app to answer through both relay workers", interval=0.3)
            yield deployment_
        finally:
            deployment_.system.stop()


async def _json(response: aiohttp.ClientResponse) -> dict:
    assert response.status == 200, (response.status, await response.text())
    return await response.json()


def test_browser_signs_in_through_the_issuer_and_the_backend_verifies_who_it_is(deployment):
    issuer = deployment.issuer

    async def scenario():
        async with deployment.client() as browser:
            html = {"Accept": "text/html"}
            async with browser.get(f"{deployment.https_url}/docs/page?x=1", headers=html) as response:
                seen = await _json(response)
                hops = [(str(r.url.host), r.status) for r in response.history]
            # edge -> issuer -> callback -> the page first asked for
            assert hops == [(HOST, 302), ("127.0.0.1", 302), (HOST, 302)]
            assert seen["path"] == "/docs/page?x=1"
            headers = dict(seen["headers"])
            assert headers["x-backhaul-user"] == "alice" and headers["x-backhaul-email"] == "alice@example.test"
            identity = seen["identity"]
            assert isinstance(identity, dict), f"the backend could not verify the identity token: {identity}"
            assert identity["sub"] == "user-0001" and identity["aud"] == HOST and identity["idp"] == issuer.issuer
            session = [c for c in browser.cookie_jar if c.key == "backhaul_session"]
            assert len(session) == 1 and session[0]["secure"] and session[0]["httponly"]

            # Signed in: further pages (on new connections, so either worker) go straight through,
            # an x-backhaul-* header the user sends is dropped, not passed on, and the backend
            # gets the app's own cookies but never the relay's session cookie.
            browser.cookie_jar.update_cookies({"theme": "dark"}, yarl.URL(deployment.https_url))
            sign_ins = issuer.hits["/authorize"]
            for n in range(6):
                async with browser.get(f"{deployment.https_url}/p{n}", headers={**html, "X-Backhaul-User": "admin"}) as response:
                    seen = await _json(response)
                    assert not response.history
                headers = dict(seen["headers"])
                assert headers["x-backhaul-user"] == "alice"
                assert headers["cookie"] == "theme=dark"
            assert issuer.hits["/authorize"] == sign_ins

            # Signing out clears the cookie: the next page goes back to the issuer.
            async with browser.get(f"{deployment.https_url}/.backhaul/logout") as response:
                assert response.status == 200
            async with browser.get(f"{deployment.https_url}/docs", headers=html, allow_redirects=False) as response:
                assert response.status == 302 and response.headers["Location"].startswith(f"{issuer.url}/authorize?")

    asyncio.run(scenario())


def test_bearer_tokens_and_unauthenticated_requests_never_reach_the_connector(deployment):
    issuer = deployment.issuer

    async def scenario():
        async with deployment.client(cookies=False) as api:
            url = f"{deployment.http_url}/api/items"
            before = deployment.backend_count()
            refused = {
                "no credentials": {},
                "expired": {"Authorization": f"Bearer {issuer.mint(lifetime=-300)}"},
                "wrongly signed": {"Authorization": f"Bearer {issuer.mint(key=SigningKey(), kid=issuer.key.kid)}"},
                "another client's": {"Authorization": f"Bearer {issuer.mint(aud='someone-else')}"},
                "forged identity header": {"X-Backhaul-Identity": "eyJhbGciOiJub25lIn0.e30.", "X-Backhaul-User": "admin"},
            }
            for why, headers in refused.items():
                async with api.get(url, headers={"Accept": "application/json", **headers}) as response:
                    assert response.status == 401, why
                    assert response.headers["WWW-Authenticate"].startswith(f'Bearer realm="{HOST}"'), why
            async with api.post(url, data=b"x" * 1000, headers={"Content-Type": "text/plain"}) as response:
                assert response.status == 401
            async with api.get(f"{deployment.http_url}/", headers={"Accept": "text/html"}, allow_redirects=False) as response:
                assert response.status == 302
            async with api.get(f"{deployment.http_url}/.backhaul/oidc/callback?code=x&state=AAAAAAAAAAAAAAAAAAAAAA") as response:
                assert response.status == 400
            async with api.get(f"{deployment.http_url}/.backhaul/other") as response:
                assert response.status == 404
            assert deployment.backend_count() == before, "a request without a valid sign-in reached the app"

            async with api.get(url, headers={"Authorization": f"Bearer {issuer.mint()}"}) as response:
                seen = await _json(response)
            assert deployment.backend_count() == before + 1
            assert seen["identity"]["preferred_username"] == "alice"

            # The relay's JWKS is public on the app host, for backends and anyone.
            async with api.get(f"{deployment.https_url}/.backhaul/jwks.json") as response:
                keys = (await _json(response))["keys"]
            assert [k["alg"] for k in keys] == ["ES256"]

    asyncio.run(scenario())

