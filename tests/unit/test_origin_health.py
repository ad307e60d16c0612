"""Origin health checks of the connector (connector/health.py): hysteresis, reports, real checks.

Checks run against real listeners on 127.0.0.1: a TCP server that is closed to take the
origin down, an aiohttp server answering a health path, an https origin whose
certificate the default verification must refuse. Intervals are short real times.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import orjson
import pytest
from aiohttp import web

from backhaul import pki
from backhaul.config import HealthChecks
from backhaul.connector import health
from backhaul.connector.health import HealthMonitor, OriginState, control_messages, heartbeat_report, health_url
from backhaul.protocol.constants import MAX_CONTROL_PAYLOAD

pytestmark = pytest.mark.codec_independent

FAST = HealthChecks(interval=0.05, jitter=0.0, timeout=1.0, fall=2, rise=1, recheck_gap=0.0)


# ---------------------------------------------------------------- hysteresis


def test_two_failures_to_go_down_one_success_to_come_up():
    state = OriginState(fall=2, rise=1)
    assert state.up is None
    assert state.observe(False, "refused") is False and state.up is None  # one failure: still unknown
    assert state.observe(False, "refused") is True and state.up is False
    assert state.observe(False) is False and state.up is False  # no repeated transition
    assert state.observe(True) is True and state.up is True
    assert state.observe(False) is False and state.up is True  # one failure does not flip it
    assert state.observe(True) is False and state.up is True  # a success resets the failure count
    assert state.observe(False) is False and state.up is True
    assert state.observe(False, "timeout") is True and state.up is False and state.reason == "timeout"


def test_first_success_makes_an_unknown_origin_reachable_and_rise_is_honoured():
    assert OriginState(2, 1).observe(True) is True
    slow = OriginState(fall=1, rise=3)
    assert slow.observe(False) is True and slow.up is False
    assert [slow.observe(True) for _ in range(3)] == [False, False, True] and slow.up is True


def test_settings_are_checked():
    with pytest.raises(ValueError):
        HealthChecks(interval=0)
    with pytest.raises(ValueError):
        HealthChecks(fall=0)


# ---------------------------------------------------------------- what goes on the wire


def test_control_messages_split_large_reports_below_the_control_frame_limit():
    states = {f"app-{i:05d}-" + "x" * 50: (None if i % 3 == 0 else i % 2 == 0) for i in range(3000)}
    messages = control_messages(states)
    assert len(messages) > 1
    merged: dict = {}
    for message in messages:
        assert message["type"] == "health"
        assert len(orjson.dumps(message)) <= MAX_CONTROL_PAYLOAD
        merged.update(message["apps"])
    assert merged == states
    assert control_messages({}) == []


def test_heartbeat_report_puts_unreachable_apps_first_and_stays_within_its_budget():
    states = {f"up-{i:04d}": True for i in range(1000)} | {f"down-{i:04d}": False for i in range(10)}
    report = heartbeat_report(states, budget=2000)
    assert len(orjson.dumps(report)) <= 2000
    assert all(report[f"down-{i:04d}"] is False for i in range(10))
    assert 10 < len(report) < len(states)
    assert heartbeat_report({"a": True, "b": False}) == {"b": False, "a": True}


def test_health_url_is_the_path_on_the_internal_urls_origin():
    app = {"proto": "http", "target": "intranet:8443", "internal_url": "https://intranet:8443/app/", "health_path": "/healthz?deep=1"}
    assert health_url(app) == "https://intranet:8443/healthz?deep=1"
    assert health_url({**app, "health_path": None}) is None
    assert health_url({"proto": "tcp", "target": "h:1", "health_path": "/x"}) is None


@pytest.mark.parametrize("path", ["//127.0.0.1:19003/x", "/\\127.0.0.1:19003/x", "http://127.0.0.1:19003/x", "healthz", "/a b", "/a#b"])
def test_health_url_refuses_a_path_that_is_not_on_the_origin(path):
    app = {"proto": "http", "target": "intranet:8443", "internal_url": "https://intranet:8443/", "health_path": path}
    assert health.health_path_problem(path) is not None
    with pytest.raises(health.UnsafeHealthPath):
        health_url(app)


def test_health_url_never_leaves_the_origin_for_odd_but_plain_paths():
    app = {"proto": "http", "target": "intranet:8443", "internal_url": "https://intranet:8443/", "health_path": "/"}
    for path in ["/..//127.0.0.1:19003/x", "/%2F%2F127.0.0.1/x", "/a//b?to=//evil", "/?//evil"]:
        url = health_url({**app, "health_path": path})
        assert url == "https://intranet:8443" + path, url


# ---------------------------------------------------------------- real checks


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


class Recorder:
    def __init__(self) -> None:
        self.changes: list[dict] = []

    def __call__(self, changes: dict) -> None:
        self.changes.append(dict(changes))


async def _tcp_server(port: int) -> asyncio.AbstractServer:
    return await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", port)


def test_tcp_origin_goes_down_after_two_failed_checks_and_up_after_one_good_one():
    async def main():
        port = _free_port()
        server = await _tcp_server(port)
        seen = Recorder()
        monitor = HealthMonitor(FAST, seen)
        monitor.set_apps({"db": {"name": "db", "proto": "tcp", "target": f"127.0.0.1:{port}"}})
        task = asyncio.create_task(monitor.run())
        try:
            await _until(lambda: seen.changes == [{"db": True}])
            assert monitor.snapshot() == {"db": True}
            server.close()
            await server.wait_closed()
            await _until(lambda: len(seen.changes) == 2)
            assert seen.changes[1] == {"db": False} and monitor.snapshot() == {"db": False}
            assert monitor.state("db").failures >= 2 and "refused" in monitor.state("db").reason.lower()
            server = await _tcp_server(port)
            await _until(lambda: len(seen.changes) == 3)
            assert seen.changes[2] == {"db": True}
        finally:
            task.cancel()
            server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_config_changes_reset_and_drop_states_and_udp_apps_are_not_checked():
    async def main():
        server = await _tcp_server(0)
        port = server.sockets[0].getsockname()[1]
        seen = Recorder()
        monitor = HealthMonitor(FAST, seen)
        apps = {
            "a": {"name": "a", "proto": "tcp", "target": f"127.0.0.1:{port}"},
            "b": {"name": "b", "proto": "tcp", "target": f"127.0.0.1:{port}"},
            "dns": {"name": "dns", "proto": "udp", "target": "127.0.0.1:53"},
        }
        monitor.set_apps(apps)
        task = asyncio.create_task(monitor.run())
        try:
            await _until(lambda: monitor.snapshot() == {"a": True, "b": True})
            seen.changes.clear()
            dead = _free_port()
            # a's target changes: its state is unknown again at once; b is removed: forgotten
            monitor.set_apps({"a": {**apps["a"], "target": f"127.0.0.1:{dead}"}, "dns": apps["dns"]})
            assert seen.changes[0] == {"a": None, "b": None}
            assert monitor.snapshot() == {}
            await _until(lambda: monitor.snapshot() == {"a": False})
            assert "dns" not in monitor.snapshot() and monitor.state("dns") is None
        finally:
            task.cancel()
            server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_recheck_checks_a_failing_app_before_the_next_round():
    async def main():
        port = _free_port()
        server = await _tcp_server(port)
        seen = Recorder()
        slow = HealthChecks(interval=3600, jitter=0.0, timeout=1.0, fall=1, rise=1, recheck_gap=0.0)
        monitor = HealthMonitor(slow, seen)
        monitor.set_apps({"db": {"name": "db", "proto": "tcp", "target": f"127.0.0.1:{port}"}})
        task = asyncio.create_task(monitor.run())
        try:
            await _until(lambda: seen.changes == [{"db": True}])
            server.close()
            await server.wait_closed()
            monitor.recheck("db")  # what the agent does when a stream's target connect fails
            await _until(lambda: len(seen.changes) == 2, timeout=5)
            assert seen.changes[1] == {"db": False}
            monitor.recheck("unknown-app")  # ignored, nothing to check
        finally:
            task.cancel()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_http_health_path_decides_by_the_answer_status():
    async def main():
        status = {"code": 200}
        hits: list[str] = []

        async def healthz(request: web.Request) -> web.Response:
            hits.append(request.path_qs)
            return web.Response(status=status["code"], text="state")

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        seen = Recorder()
        monitor = HealthMonitor(FAST, seen)
        monitor.set_apps(
            {
                "web": {
                    "name": "web", "proto": "http", "target": f"127.0.0.1:{port}",
                    "internal_url": f"http://127.0.0.1:{port}/portal/", "health_path": "/healthz?from=backhaul",
                }
            }
        )
        task = asyncio.create_task(monitor.run())
        try:
            await _until(lambda: seen.changes == [{"web": True}])
            assert hits[0] == "/healthz?from=backhaul"
            status["code"] = 503  # the port still accepts: only the health path tells
            await _until(lambda: len(seen.changes) == 2)
            assert seen.changes[1] == {"web": False} and "HTTP 503" in monitor.state("web").reason
            status["code"] = 302
            await _until(lambda: len(seen.changes) == 3)
            assert seen.changes[2] == {"web": True}
        finally:
            task.cancel()
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_https_health_check_verifies_the_origin_certificate(tmp_path):
    """An https origin whose certificate no trusted CA signed is not 'reachable'."""

    async def main():
        # A certificate for 127.0.0.1 from a CA of our own, which the system does not trust.
        key, cert = pki.make_service_cert(pki.make_ca("untrusted test CA"), ["127.0.0.1"])
        (tmp_path / "origin.pem").write_bytes(pki.cert_to_pem(cert))
        (tmp_path / "origin.key").write_bytes(pki.key_to_pem(key))
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(tmp_path / "origin.pem", tmp_path / "origin.key")

        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/healthz", ok)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        seen = Recorder()
        monitor = HealthMonitor(FAST, seen)
        monitor.set_apps(
            {
                "secure": {
                    "name": "secure", "proto": "http", "target": f"127.0.0.1:{port}",
                    "internal_url": f"https://127.0.0.1:{port}/", "health_path": "/healthz",
                }
            }
        )
        task = asyncio.create_task(monitor.run())
        try:
            await _until(lambda: seen.changes == [{"secure": False}])
            assert "certificate" in monitor.state("secure").reason.lower()
        finally:
            task.cancel()
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_https_health_check_verifies_with_the_apps_own_tls_options(tmp_path):
    """The check trusts what the app's streams trust: its backend_ca, or nothing with
    backend_insecure; the same origin without either is unreachable."""

    async def main():
        ca = pki.make_ca("app backend CA")
        key, cert = pki.make_service_cert(ca, ["127.0.0.1"])
        (tmp_path / "origin.pem").write_bytes(pki.cert_to_pem(cert))
        (tmp_path / "origin.key").write_bytes(pki.key_to_pem(key))
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(tmp_path / "origin.pem", tmp_path / "origin.key")

        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_get("/healthz", ok)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        base = {
            "proto": "http", "target": f"127.0.0.1:{port}",
            "internal_url": f"https://127.0.0.1:{port}/", "health_path": "/healthz",
        }
        apps = {
            "own-ca": {**base, "name": "own-ca", "backend_ca": ca.cert_pem.decode("ascii")},
            "insecure": {**base, "name": "insecure", "backend_insecure": True},
            "system-ca": {**base, "name": "system-ca"},
        }
        seen = Recorder()
        monitor = HealthMonitor(FAST, seen)
        monitor.set_apps(apps)
        task = asyncio.create_task(monitor.run())
        try:
            await _until(lambda: monitor.snapshot() == {"own-ca": True, "insecure": True, "system-ca": False})
            assert "certificate" in monitor.state("system-ca").reason.lower()
            # Dropping the CA is a change of what the check depends on: unknown, then down.
            monitor.set_apps({**apps, "own-ca": {**base, "name": "own-ca"}})
            assert {"own-ca": None} in seen.changes
            await _until(lambda: monitor.snapshot().get("own-ca") is False)
        finally:
            task.cancel()
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_checks_run_at_most_concurrency_at_once(monkeypatch):
    """Counted by wrapping the real TCP check (it still connects to a real listener)."""

    async def main():
        active = {"now": 0, "max": 0}

        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        original = health.check_tcp

        limited = HealthChecks(interval=3600, jitter=0.0, timeout=1.0, concurrency=3)
        monitor = HealthMonitor(limited, Recorder())

        async def counting(target, timeout):
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
            try:
                await asyncio.sleep(0.02)
                return await original(target, timeout)
            finally:
                active["now"] -= 1

        monkeypatch.setattr(health, "check_tcp", counting)
        monitor.set_apps({f"a{i}": {"name": f"a{i}", "proto": "tcp", "target": f"127.0.0.1:{port}"} for i in range(12)})
        task = asyncio.create_task(monitor.run())
        try:
            await _until(lambda: len(monitor.snapshot()) == 12)
            assert active["max"] == 3
        finally:
            task.cancel()
            server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_refused_health_path_never_dials_and_leaves_the_app_unchecked(caplog):
    """A config pulled from a relay that took ``//host:port/x`` (before validation refused it):
    the connector must not GET that host. A listener on the named port sees no connection."""

    async def main():
        dialed: list = []
        trap = await asyncio.get_running_loop().create_server(lambda: _Trap(dialed), "127.0.0.1", 0)
        trap_port = trap.sockets[0].getsockname()[1]
        origin = await _tcp_server(0)
        origin_port = origin.sockets[0].getsockname()[1]
        seen = Recorder()
        monitor = HealthMonitor(FAST, seen)
        bad = {
            "name": "web", "proto": "http", "target": f"127.0.0.1:{origin_port}",
            "internal_url": f"http://127.0.0.1:{origin_port}/", "health_path": f"//127.0.0.1:{trap_port}/x",
        }
        good = {"name": "db", "proto": "tcp", "target": f"127.0.0.1:{origin_port}"}
        monitor.set_apps({"web": bad, "db": good})
        monitor.set_apps({"web": dict(bad), "db": good})  # the same config pulled again: logged once
        task = asyncio.create_task(monitor.run())
        try:
            # Rounds run (db is checked, and checked again) while web never is.
            await _until(lambda: seen.changes == [{"db": True}])
            rounds = monitor._last_check["db"]
            await _until(lambda: monitor._last_check["db"] > rounds)
            await _until(lambda: monitor._last_check["db"] > rounds + 3 * FAST.interval)
            assert dialed == []
            assert monitor.state("web") is None and "web" not in monitor.snapshot()
            # Fixed by the admin: checked (on its own origin) from the next pull.
            monitor.set_apps({"web": {**bad, "health_path": "/x"}, "db": good})
            await _until(lambda: monitor.state("web") is not None and monitor.state("web").up is not None)
            assert dialed == []
        finally:
            task.cancel()
            trap.close()
            origin.close()

    with caplog.at_level("ERROR", logger="backhaul.connector.health"):
        asyncio.run(asyncio.wait_for(main(), 30))
    refused = [r for r in caplog.records if r.getMessage() == "health path refused: the app is not checked"]
    assert len(refused) == 1 and refused[0].app == "web" and "//" in refused[0].reason


class _Trap(asyncio.Protocol):
    """A listener that records every connection it gets (none is the point)."""

    def __init__(self, dialed: list) -> None:
        self.dialed = dialed

    def connection_made(self, transport) -> None:
        self.dialed.append(transport.get_extra_info("peername"))
        transport.close()
