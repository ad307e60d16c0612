"""The control API over real TLS on 127.0.0.1, with real certificates and a real SQLite store."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from backhaul import pki, tlsconfig
from backhaul.connector import control_client
from backhaul.connector.enroll import enroll, fetch_pinned_ca
from backhaul.connector.state import ConnectorState, write_state
from backhaul.control.api import build_app
from backhaul.control.web import token_hash
from backhaul.control.context import ControlContext, ControlSettings
from backhaul.control.init import initialize
from backhaul.control.openapi import openapi_document
from backhaul.errors import CertificateError, EnrollmentError

pytestmark = pytest.mark.codec_independent


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset


class Service:
    """The control API of one data dir, served by aiohttp with the relay's TLS context."""

    def __init__(self, data_dir: Path, ctx: ControlContext) -> None:
        self.data_dir = data_dir
        self.ctx = ctx
        self.store = ctx.store
        self.admin_token = (data_dir / "admin.token").read_text().strip()
        self.ca_pem = (data_dir / "ca.pem").read_bytes()
        self.pin = pki.fingerprint_sha256(self.ca_pem)
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> "Service":
        self._runner = web.AppRunner(build_app(self.ctx))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tlsconfig.server_context(self.data_dir))
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"https://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    async def call(self, method, path, body=None, *, token="admin", ctx=None, headers=None, raw=None):
        """(status, decoded body, headers)."""
        hdrs = dict(headers or {})
        if token == "admin":
            hdrs["Authorization"] = f"Bearer {self.admin_token}"
        elif token is not None:
            hdrs["Authorization"] = token
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        ssl_ctx = ctx or tlsconfig.admin_context(self.ca_pem)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_ctx)) as session:
            async with session.request(method, self.url + path, data=data, headers=hdrs) as resp:
                content = await resp.read()
                return resp.status, (orjson.loads(content) if content else None), resp.headers.copy()

    async def token(self, group="default", ttl=3600, uses=1) -> str:
        status, body, _ = await self.call("POST", "/v1/tokens", {"group": group, "ttl": ttl, "uses": uses})
        assert status == 201, body
        return body["token"]

    async def register(self, state_dir: Path, group="default") -> ConnectorState:
        result = await enroll(self.url, self.pin, await self.token(group), "test-connector")
        write_state(
            state_dir, service_url=self.url, connector_id=result["connector_id"], name="test-connector",
            ca_pem=result["ca_pem"], cert_pem=result["cert_pem"], key_pem=result["key_pem"],
        )
        return ConnectorState.load(state_dir)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def service_dir(tmp_path):
    data_dir = tmp_path / "service"
    initialize(data_dir, ["localhost", "127.0.0.1"])
    return data_dir


@pytest.fixture
def run(service_dir, clock):
    """run(async fn(service)) -> its result, with the API served for the call's duration."""
    ctx = ControlContext.load(
        service_dir, clock=clock, settings=ControlSettings(reserved_ports=frozenset({8443}), housekeeping_interval=0)
    )

    def runner(fn):
        async def main():
            async with Service(service_dir, ctx) as service:
                return await fn(service)

        return asyncio.run(asyncio.wait_for(main(), 60))

    yield runner
    ctx.store.close()


def _is_error(body, code=None):
    assert set(body) == {"error", "detail"} and body["detail"]
    if code is not None:
        assert body["error"] == code, body


def test_health_needs_no_auth(run):
    async def go(s):
        status, body, _ = await s.call("GET", "/v1/health", token=None)
        assert (status, body) == (200, {"status": "ok", "worker": 0})

    run(go)


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc", "Bearer ", "Bearer " + "x" * 1000])
def test_admin_calls_need_the_admin_token_and_change_nothing(run, auth):
    async def go(s):
        version = s.store.config_version()
        status, body, _ = await s.call("POST", "/v1/groups", {"name": "g1"}, token=auth)
        assert status == 401
        _is_error(body, "unauthorized")
        status, body, _ = await s.call("GET", "/v1/connectors", token=auth)
        assert status == 401
        assert s.store.get_group("g1") is None and s.store.config_version() == version

    run(go)


def test_enroll_config_heartbeat_renew_and_revoke(run, tmp_path):
    async def go(s):
        await s.call("POST", "/v1/groups", {"name": "branch"})
        status, body, _ = await s.call("POST", "/v1/apps", {"name": "db", "group": "branch", "proto": "tcp", "port": 15432, "target": "10.0.0.5:5432"})
        assert status == 201, body
        state = await s.register(tmp_path / "conn", group="branch")
        record = s.store.get_connector(state.connector_id)
        assert record.group == "branch" and record.cert_serial == state.cert_serial and record.name == "test-connector"
        async with control_client.connector_session(state) as session:
            etag, config = await control_client.pull_config(state, session, None)
            assert config["apps"] == [{"name": "db", "proto": "tcp", "target": "10.0.0.5:5432", "internal_url": None, "health_path": None}]
            assert etag == config["etag"]
            assert await control_client.pull_config(state, session, etag) == (etag, None)
            answer = await control_client.heartbeat(state, session, {"version": "9.9", "cpu": 75.0, "memory": 1.0, "streams": 2, "bytes_in": 5, "bytes_out": 6})
            assert answer["config_version"] == s.store.config_version()
            new_state = await control_client.renew(state, session)
        assert new_state.cert_serial != state.cert_serial
        assert s.store.get_connector(state.connector_id).cert_serial == new_state.cert_serial
        status, listed, _ = await s.call("GET", "/v1/connectors")
        assert status == 200 and listed[0]["version"] == "9.9" and listed[0]["cpu_warning"] is True
        assert listed[0]["status"] == "inactive"
        async with control_client.connector_session(new_state) as session:
            etag2, config2 = await control_client.pull_config(new_state, session, "stale")
            assert config2 is not None and etag2 == etag
            status, body, _ = await s.call("DELETE", f"/v1/connectors/{state.connector_id}")
            assert status == 200
            with pytest.raises(CertificateError, match="deleted by an admin"):
                await control_client.pull_config(new_state, session, None)
        status, listed, _ = await s.call("GET", "/v1/connectors")
        assert listed == []

    run(go)


def test_config_change_changes_the_etag(run, tmp_path):
    async def go(s):
        state = await s.register(tmp_path / "conn")
        async with control_client.connector_session(state) as session:
            etag, _ = await control_client.pull_config(state, session, None)
            await s.call("POST", "/v1/apps", {"name": "ssh", "proto": "tcp", "port": 2222, "target": "[fd00::5]:22"})
            etag2, config = await control_client.pull_config(state, session, etag)
            assert etag2 != etag and [a["target"] for a in config["apps"]] == ["[fd00::5]:22"]

    run(go)


def test_refused_tokens_enroll_nothing(run, clock):
    async def go(s):
        with pytest.raises(EnrollmentError, match="unknown, expired or used up"):
            await enroll(s.url, s.pin, "bht_bogus", "x")
        used = await s.token(uses=1)
        await enroll(s.url, s.pin, used, "first")
        with pytest.raises(EnrollmentError, match="used up"):
            await enroll(s.url, s.pin, used, "second")
        expiring = await s.token(ttl=5)
        clock.offset += 6
        with pytest.raises(EnrollmentError, match="expired"):
            await enroll(s.url, s.pin, expiring, "late")
        assert [c.name for c in s.store.list_connectors()] == ["first"]

    run(go)


def test_wrong_ca_pin_sends_no_token(run):
    async def go(s):
        token = await s.token()
        wrong = "00" * 32
        with pytest.raises(CertificateError, match="not the pinned"):
            await enroll(s.url, wrong, token, "x")
        assert s.store.list_connectors() == []
        assert s.store.check_token(token_hash(token)) == "default"
        assert await fetch_pinned_ca(s.url, s.pin) == s.ca_pem

    run(go)


def test_server_not_chaining_to_the_pinned_ca_is_refused(run, tmp_path):
    """A server answering /v1/ca with the right CA but holding another CA's certificate."""

    async def go(s):
        other = tmp_path / "other"
        initialize(other, ["127.0.0.1"])
        ctx = ControlContext(data_dir=other, store=s.store, ca=s.ctx.ca, settings=ControlSettings(housekeeping_interval=0))
        impostor = Service(other, ctx)
        async with impostor:
            token = await s.token()
            with pytest.raises(CertificateError, match="does not match the pinned CA"):
                await enroll(impostor.url, s.pin, token, "x")
        assert s.store.list_connectors() == []

    run(go)


def test_connector_endpoints_need_a_client_certificate(run):
    async def go(s):
        for method, path in (("GET", "/v1/connector/config"), ("POST", "/v1/connector/heartbeat"), ("POST", "/v1/connector/renew")):
            status, body, _ = await s.call(method, path, {}, token=None)
            assert status == 403
            _is_error(body, "no_client_certificate")

    run(go)


def test_certificate_from_another_ca_fails_the_handshake(run, tmp_path):
    async def go(s):
        rogue = pki.make_ca()
        key = pki.generate_key()
        cert = pki.sign_csr(rogue, pki.make_csr(key, "x"), pki.new_connector_id())
        (tmp_path / "k").write_bytes(pki.key_to_pem(key))
        (tmp_path / "c").write_bytes(pki.cert_to_pem(cert))
        ctx = tlsconfig.admin_context(s.ca_pem)
        ctx.load_cert_chain(tmp_path / "c", tmp_path / "k")
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await s.call("GET", "/v1/connector/config", ctx=ctx, token=None)

    run(go)


def test_tls12_client_is_refused(run):
    async def go(s):
        ctx = ssl.create_default_context(cadata=s.ca_pem.decode())
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
            await s.call("GET", "/v1/health", ctx=ctx, token=None)

    run(go)


@pytest.mark.parametrize(
    "body, status, code, words",
    [
        ({"name": "a", "proto": "tcp", "port": 1, "target": "nohostport"}, 400, "bad_request", "HOST:PORT"),
        ({"name": "a", "proto": "tcp", "port": 1, "target": "fd00::1:22"}, 400, "bad_request", "brackets"),
        ({"name": "a", "proto": "tcp", "port": 0, "target": "h:1"}, 400, "bad_request", "1 to 65535"),
        ({"name": "a", "proto": "tcp", "port": 8443, "target": "h:1"}, 409, "conflict", "relay itself"),
        ({"name": "a", "proto": "udp", "port": 53, "target": "h:99999"}, 400, "bad_request", ":PORT (1-65535)"),
        ({"name": "a b", "proto": "tcp", "port": 1, "target": "h:1"}, 400, "bad_request", "app name"),
        ({"name": "a", "proto": "sctp", "port": 1, "target": "h:1"}, 400, "bad_request", "proto"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "ftp://x/"}, 400, "bad_request", "http://"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "http://u:p@x/"}, 400, "bad_request", "password"),
        ({"name": "a", "proto": "http", "external_host": "x y", "internal_url": "http://x/"}, 400, "bad_request", "external host"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "http://x/", "preauth": "magic"}, 400, "bad_request", "preauth"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "http://x/", "port": 80}, 400, "bad_request", "only for tcp/udp"),
        ({"name": "a", "group": "nope", "proto": "tcp", "port": 1, "target": "h:1"}, 404, "not_found", "nope"),
        ({"name": "a", "proto": "tcp", "port": 1, "target": "h:1", "keep_host": True}, 400, "bad_request", "only for http"),
        ({"name": "a", "proto": "tcp", "port": 1, "target": "h:1", "backend_insecure": True}, 400, "bad_request", "only for http"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "http://x/", "backend_insecure": True}, 400, "bad_request", "https://"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "https://x/", "backend_ca": "not a pem"}, 400, "bad_request", "PEM"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "https://x/", "backend_ca": "x" * 40000}, 400, "bad_request", "at most"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "https://x/", "keep_host": "yes"}, 400, "bad_request", "true or false"),
        # Python's "$" also matches before a final newline; the document's (ECMA-262) does not.
        ({"name": "a\n", "proto": "tcp", "port": 1, "target": "h:1"}, 400, "bad_request", "app name"),
        ({"name": "a", "proto": "tcp", "port": 1, "target": "[fe80::1%eth0]:22"}, 400, "bad_request", "zone"),
        ({"name": "a", "proto": "tcp", "port": 1, "target": "[10.0.0.5]:22"}, 400, "bad_request", "IPv6 addresses only"),
        ({"name": "a", "proto": "tcp", "port": 1, "target": "h:\u0663"}, 400, "bad_request", ":PORT"),
        ({"name": "a", "proto": "tcp", "port": 1, "target": "h..:1"}, 400, "bad_request", "neither"),
        ({"name": "a", "proto": "tcp", "port": 1, "target": "h:1", "keep_host": 0}, 400, "bad_request", "only for http"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "http://x/", "preauth": ""}, 400, "bad_request", "preauth"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "http://x:0/"}, 400, "bad_request", "port from 1"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "http://x/a b"}, 400, "bad_request", "no spaces"),
        ({"name": "a", "proto": "http", "external_host": "x.example", "internal_url": "http://x/", "health_path": "/h\n"}, 400, "bad_request", "health path"),
    ],
)
def test_bad_apps_are_refused_clearly(run, body, status, code, words):
    async def go(s):
        version = s.store.config_version()
        got, answer, _ = await s.call("POST", "/v1/apps", body)
        assert got == status, answer
        _is_error(answer, code)
        assert words in answer["detail"]
        assert s.store.list_apps() == [] and s.store.config_version() == version

    run(go)


def test_http_app_tls_options_reach_the_connector_config(run, tmp_path):
    ca_pem = pki.make_ca("backend CA").cert_pem.decode()

    async def go(s):
        body = {"name": "web", "proto": "http", "external_host": "web.example", "internal_url": "https://intranet/"}
        status, answer, _ = await s.call("POST", "/v1/apps", {**body, "backend_ca": ca_pem, "backend_insecure": True})
        assert status == 400 and "not both" in answer["detail"]
        status, app, _ = await s.call("POST", "/v1/apps", {**body, "backend_ca": ca_pem, "keep_host": True})
        assert status == 201 and app["backend_ca"] == ca_pem and app["keep_host"] is True and app["backend_insecure"] is False
        assert s.store.get_app("web") == s.store.list_apps()[0] and s.store.get_app("web").backend_ca == ca_pem
        status, app, _ = await s.call("PATCH", "/v1/apps/web", {"backend_ca": None, "backend_insecure": True})
        assert status == 200 and app["backend_ca"] is None and app["backend_insecure"] is True
        # Well-formed, but not for this app (it has backend_insecure): a conflict, not a bad request.
        status, answer, _ = await s.call("PATCH", "/v1/apps/web", {"internal_url": "http://intranet/"})
        assert status == 409 and "https://" in answer["detail"]
        state = await s.register(tmp_path / "conn")
        async with control_client.connector_session(state) as session:
            _, config = await control_client.pull_config(state, session, None)
        assert config["apps"] == [
            {"name": "web", "proto": "http", "target": "intranet:443", "internal_url": "https://intranet/", "health_path": None, "backend_ca": None, "backend_insecure": True}
        ]

    run(go)


def test_app_update_and_http_target_derivation(run):
    async def go(s):
        status, app, _ = await s.call("POST", "/v1/apps", {"name": "web", "proto": "http", "external_host": "Web.Example.com", "internal_url": "https://intranet.local/"})
        assert status == 201 and app["target"] == "intranet.local:443" and app["external_host"] == "web.example.com" and app["preauth"] == "passthrough"
        status, app, _ = await s.call("PATCH", "/v1/apps/web", {"internal_url": "http://intranet.local:8080/x"})
        assert status == 200 and app["target"] == "intranet.local:8080"
        status, body, _ = await s.call("PATCH", "/v1/apps/web", {"proto": "tcp"})
        assert status == 409 and "cannot change" in body["detail"]
        status, body, _ = await s.call("PATCH", "/v1/apps/web", {"port": 5432})
        assert status == 409 and "only for tcp/udp" in body["detail"] and "http app" in body["detail"]
        status, body, _ = await s.call("PATCH", "/v1/apps/web", {"port": 5432, "internal_url": "http://x/"})
        assert status == 400 and "port" in body["detail"], "no app takes both a port and an internal URL"
        status, body, _ = await s.call("PATCH", "/v1/apps/web", {"colour": "red"})
        assert status == 400 and "colour" in body["detail"]
        status, body, _ = await s.call("PATCH", "/v1/apps/nope", {"group": "default"})
        assert status == 404
        status, body, _ = await s.call("DELETE", "/v1/apps/web")
        assert (status, body) == (200, {"deleted": "web"})
        status, body, _ = await s.call("DELETE", "/v1/apps/web")
        assert status == 404

    run(go)


def test_groups_over_the_api(run, tmp_path):
    async def go(s):
        assert (await s.call("POST", "/v1/groups", {"name": "g1"}))[0] == 201
        status, body, _ = await s.call("POST", "/v1/groups", {"name": "g1"})
        assert status == 409 and "already exists" in body["detail"]
        await s.call("POST", "/v1/apps", {"name": "db", "group": "g1", "proto": "tcp", "port": 5000, "target": "h:1"})
        status, body, _ = await s.call("DELETE", "/v1/groups/g1")
        assert status == 409 and "db" in body["detail"]
        status, body, _ = await s.call("PATCH", "/v1/groups/g1", {"name": "g2"})
        assert status == 200 and body["apps"] == 1
        state = await s.register(tmp_path / "c")
        status, body, _ = await s.call("PUT", f"/v1/connectors/{state.connector_id}/group", {"group": "g2"})
        assert status == 200 and body["group"] == "g2"
        status, body, _ = await s.call("PUT", f"/v1/connectors/{state.connector_id}/group", {"group": "missing"})
        assert status == 404
        status, groups, _ = await s.call("GET", "/v1/groups")
        assert [(g["name"], g["apps"], g["connectors"]) for g in groups] == [("default", 0, 0), ("g2", 1, 1)]
        status, body, _ = await s.call("DELETE", "/v1/groups/default")
        assert status == 409

    run(go)


def test_malformed_and_oversized_bodies(run):
    async def go(s):
        status, body, _ = await s.call("POST", "/v1/groups", raw=b"{nope")
        assert status == 400
        _is_error(body, "bad_json")
        status, body, _ = await s.call("POST", "/v1/groups", raw=b"[1, 2]")
        assert status == 400
        status, body, _ = await s.call("POST", "/v1/groups", raw=b"x" * (128 * 1024))
        assert status == 413
        _is_error(body)
        status, body, _ = await s.call("GET", "/v1/nothing-here")
        assert status == 404
        _is_error(body)
        status, body, _ = await s.call("PUT", "/v1/health")
        assert status == 405
        _is_error(body)
        for bad in ({"ttl": 0}, {"uses": 0}, {"ttl": 10**9}, {"uses": "many"}, {"group": "nope"}):
            status, body, _ = await s.call("POST", "/v1/tokens", bad)
            assert status in (400, 404), (bad, body)
            _is_error(body)
        # A bad token is refused before the CSR is even parsed; a good token with a bad CSR gets 400.
        status, body, _ = await s.call("POST", "/v1/enroll", {"token": "bht_x", "csr": "garbage"}, token=None)
        assert status == 403
        _is_error(body, "enrollment_refused")
        status, body, _ = await s.call("POST", "/v1/enroll", {"token": await s.token(), "csr": "garbage"}, token=None)
        assert status == 400 and "CSR" in body["detail"]

    run(go)


def test_openapi_describes_every_route(run):
    async def go(s):
        status, doc, _ = await s.call("GET", "/v1/openapi.json", token=None)
        assert status == 200 and doc == orjson.loads(orjson.dumps(openapi_document(s.ctx.settings)))
        app = build_app(s.ctx)
        every = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
        routes = {(m, p) for m, p in every if p.startswith("/v1/")}
        documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
        assert routes == documented
        # The rest is the admin center's web page (HTML, not API: it calls the routes above).
        assert {p for _, p in every - routes} <= {"/", "/admin", "/.backhaul/oidc/callback"} | {
            p for _, p in every if p.startswith("/admin/")
        }

    run(go)


def test_expired_connector_certificate_is_reported(run, tmp_path):
    async def go(s):
        state = await s.register(tmp_path / "c")
        later = state.cert_not_after + datetime.timedelta(seconds=1)
        with pytest.raises(CertificateError, match="re-register"):
            ConnectorState.load(tmp_path / "c", now=later)

    run(go)


def test_housekeeping_removes_connectors_unseen_for_ten_days(service_dir, clock, tmp_path):
    settings = ControlSettings(housekeeping_interval=0.05)
    ctx = ControlContext.load(service_dir, clock=clock, settings=settings)

    async def main():
        async with Service(service_dir, ctx) as s:
            stale = await s.register(tmp_path / "stale")
            clock.offset += 9 * 86400
            fresh = await s.register(tmp_path / "fresh")
            await asyncio.sleep(0.2)
            assert {c.id for c in s.store.list_connectors()} == {stale.connector_id, fresh.connector_id}
            clock.offset += 1 * 86400 + 60
            for _ in range(100):
                if len(s.store.list_connectors()) == 1:
                    break
                await asyncio.sleep(0.05)
            assert [c.id for c in s.store.list_connectors()] == [fresh.connector_id]
            async with control_client.connector_session(stale) as session:
                with pytest.raises(CertificateError, match="not known"):
                    await control_client.pull_config(stale, session, None)

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        ctx.store.close()


def test_only_worker_zero_does_housekeeping(service_dir, clock, tmp_path):
    settings = ControlSettings(housekeeping_interval=0.05)
    ctx = ControlContext.load(service_dir, clock=clock, settings=settings, worker=1)

    async def main():
        async with Service(service_dir, ctx) as s:
            await s.register(tmp_path / "c")
            clock.offset += 11 * 86400
            await asyncio.sleep(0.3)
            assert len(s.store.list_connectors()) == 1

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        ctx.store.close()


def test_renew_if_due_renews_once_across_concurrent_callers(run, tmp_path):
    async def go(s):
        state = await s.register(tmp_path / "c")
        async with control_client.connector_session(state) as a, control_client.connector_session(state) as b:
            assert await control_client.renew_if_due(state, a) is state  # not yet due
            later = state.cert_not_before + datetime.timedelta(days=61)
            first, second = await asyncio.gather(
                control_client.renew_if_due(state, a, later), control_client.renew_if_due(state, b, later)
            )
        assert first.cert_serial == second.cert_serial != state.cert_serial
        record = s.store.get_connector(state.connector_id)
        assert record.cert_serial == first.cert_serial and record.previous_serial == state.cert_serial

    run(go)


def test_refused_enrollments_are_logged_with_the_peer_and_braked(service_dir, clock, caplog):
    from backhaul.config import EnrollLimits

    settings = ControlSettings(housekeeping_interval=0, enroll=EnrollLimits(burst=3, refill_per_second=0.1))
    ctx = ControlContext.load(service_dir, clock=clock, settings=settings)
    bogus = "bht_" + "x" * 43

    async def main():
        async with Service(service_dir, ctx) as s:
            good = await s.token()
            expiring = await s.token(ttl=5)
            clock.offset += 6
            with caplog.at_level("WARNING", logger="backhaul.control.api"):
                for token in (bogus, expiring, bogus):
                    status, body, _ = await s.call("POST", "/v1/enroll", {"token": token, "csr": "x"}, token=None)
                    assert status == 403, body
                    _is_error(body, "enrollment_refused")
                refused = [r for r in caplog.records if r.getMessage().startswith("enrollment refused")]
                assert [(r.levelname, r.peer, r.reason) for r in refused] == [
                    ("WARNING", "127.0.0.1", "unknown"), ("WARNING", "127.0.0.1", "expired"), ("WARNING", "127.0.0.1", "unknown"),
                ]
                (expired_id,) = {r.token_id for r in refused if r.reason == "expired"}
                assert len(expired_id) == 12
                # The budget is spent: even a good token waits now, with Retry-After.
                for _ in range(3):
                    status, body, headers = await s.call("POST", "/v1/enroll", {"token": good, "csr": "x"}, token=None)
                    assert status == 429 and body["error"] == "too_many_attempts", body
                    assert 1 <= int(headers["Retry-After"]) <= 10
                braked = [r for r in caplog.records if r.getMessage().startswith("enrollments refused from this address")]
                assert len(braked) == 1 and braked[0].peer == "127.0.0.1"  # logged once, not per request
            for record in caplog.records:
                assert bogus not in record.getMessage() and bogus not in str(record.__dict__)
                assert good not in str(record.__dict__) and expiring not in str(record.__dict__)
            clock.offset += 10  # one refusal refilled
            assert (await s.call("POST", "/v1/enroll", {"token": good, "csr": "x"}, token=None))[0] == 400  # reached the CSR

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        ctx.store.close()


def test_tokens_are_listed_without_secrets_and_revoked(run):
    async def go(s):
        status, made, _ = await s.call("POST", "/v1/tokens", {"uses": 3, "ttl": 600})
        assert status == 201 and set(made) == {"token", "id", "group", "expires", "uses"}
        status, listed, _ = await s.call("GET", "/v1/tokens")
        assert status == 200
        assert listed == [{"id": made["id"], "group": "default", "uses_left": 3, "expires": made["expires"], "created": listed[0]["created"]}]
        assert made["token"] not in orjson.dumps(listed).decode() and token_hash(made["token"]) not in orjson.dumps(listed).decode()
        status, body, _ = await s.call("DELETE", f"/v1/tokens/{made['id']}")
        assert status == 200 and body == {"revoked": made["id"]}
        with pytest.raises(EnrollmentError, match="unknown, expired or used up"):
            await enroll(s.url, s.pin, made["token"], "late")
        status, body, _ = await s.call("DELETE", f"/v1/tokens/{made['id']}")
        assert status == 404
        _is_error(body, "not_found")
        assert (await s.call("GET", "/v1/tokens"))[1] == []
        assert (await s.call("GET", "/v1/tokens", token=None))[0] == 401
        assert (await s.call("DELETE", "/v1/tokens/x", token=None))[0] == 401

    run(go)


def test_old_certificate_is_refused_after_the_grace_once_the_new_one_is_used(run, tmp_path, clock):
    async def go(s):
        grace = s.ctx.settings.replaced_cert_grace
        assert grace == 300.0  # 90-day certificates
        state = await s.register(tmp_path / "c")
        old_state = ConnectorState.load(state.state_dir)
        async with control_client.connector_session(state) as old:
            new_state = await control_client.renew(state, old)
            clock.offset += 3600  # the new one unused: the old one stays good (a lost renewal answer)
            await control_client.pull_config(old_state, old, None)
            async with control_client.connector_session(new_state) as new:
                await control_client.pull_config(new_state, new, None)  # first use of the new certificate
                clock.offset += grace - 5
                await control_client.pull_config(old_state, old, None)  # other workers still switching
                clock.offset += 10
                with pytest.raises(CertificateError, match="replaced by a newer one") as refused:
                    await control_client.pull_config(old_state, old, None)
                assert not isinstance(refused.value, control_client.ConnectorDeleted)  # not mistaken for a deletion
                await control_client.pull_config(new_state, new, None)
                s.ctx.store.revoke_connector(state.connector_id)
                with pytest.raises(control_client.ConnectorDeleted, match="deleted by an admin"):
                    await control_client.heartbeat(new_state, new, {})

    run(go)


def test_connector_list_shows_the_grace_inactive_since_and_removal_date(service_dir, clock, tmp_path):
    from .conftest import TEST_NODE, count_tunnel

    settings = ControlSettings(housekeeping_interval=0, inactive_grace=30.0, remove_inactive_after=5 * 86400.0)
    ctx = ControlContext.load(service_dir, clock=clock, settings=settings)

    async def main():
        async with Service(service_dir, ctx) as s:
            state = await s.register(tmp_path / "c")

            async def listed() -> dict:
                status, body, _ = await s.call("GET", "/v1/connectors")
                assert status == 200, body
                (entry,) = body
                return entry

            entry = await listed()
            assert (entry["status"], entry["inactive_since"]) == ("inactive", entry["created"])
            assert entry["removal_at"] == entry["last_seen"] + 5 * 86400
            count_tunnel(s.store, state.connector_id, +1)
            entry = await listed()
            assert (entry["status"], entry["inactive_since"], entry["removal_at"]) == ("active", None, None)
            s.store.tunnel_changed(state.connector_id, TEST_NODE, 0, -1, "p")
            gone = s.store.get_connector(state.connector_id).inactive_since
            clock.offset += 29  # a redial's worth: still active
            s.store.node_heartbeat(TEST_NODE)
            entry = await listed()
            assert (entry["status"], entry["inactive_since"], entry["removal_at"]) == ("active", None, None)
            clock.offset += 2
            entry = await listed()
            assert (entry["status"], entry["inactive_since"]) == ("inactive", gone)
            assert entry["removal_at"] == entry["last_seen"] + 5 * 86400
            status, assigned, _ = await s.call("PUT", f"/v1/connectors/{state.connector_id}/group", {"group": "default"})
            assert status == 200 and (assigned["status"], assigned["inactive_since"]) == ("inactive", gone)

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        ctx.store.close()
