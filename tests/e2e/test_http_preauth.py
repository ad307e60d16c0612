"""The HTTP edge's pre-authentication hook, end to end, with a gate of this test's own.

The relay worker runs in this process (in a thread with its own event loop, real
sockets) so that it can be handed a Gate: the contract of relay.preauth.contract, implemented here
as a small rule table instead of OIDC. The connector and the web app are real
processes, driven through the CLI as everywhere else.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import threading

import pytest
import uvloop

from backhaul.relay.preauth.contract import Allow, RequestHead, Respond
from backhaul.relay.worker import RelaySettings, RelayWorker

from .harness import Backend, System

pytestmark = pytest.mark.e2e

HOST = "sso.test"


class RuleGate:
    """Lets in requests with the right bearer token; everything else is answered here."""

    def __init__(self) -> None:
        self.seen: list[RequestHead] = []

    async def check(self, app, request: RequestHead) -> Allow | Respond:
        self.seen.append(request)
        await asyncio.sleep(0.05)  # a gate awaits (an IdP, a key fetch): the edge must wait for it
        if request.target == "/boom":
            raise RuntimeError("the identity provider is down")
        if request.target == "/evil":
            return Allow(user="mallory", headers=(("x-backhaul-user", "a\r\nX-Injected: 1"),))
        if request.target == "/login":
            return Respond(302, (("location", "https://idp.example/authorize?state=1"),))
        if request.header("authorization") == "Bearer letmein":
            return Allow(user="alice@corp", headers=(("x-backhaul-user", "alice@corp"),))
        return Respond(401, (("www-authenticate", "Bearer"),), b"sign in first\n")


class InProcessRelay:
    """A relay worker on its own event loop in a thread, following the store like `service run`."""

    def __init__(self, settings: RelaySettings, gate) -> None:
        self.settings = settings
        self.gate = gate
        self.loop = uvloop.new_event_loop()
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the test by start()
            self.failed = exc
            self.ready.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        worker = RelayWorker(self.settings)
        worker.gate = self.gate
        await worker.start()
        self.ready.set()
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), 0.2)
            except asyncio.TimeoutError:
                await worker._poll()
        await worker.stop()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(30), "the relay did not start"
        if self.failed is not None:
            raise self.failed

    def stop(self) -> None:
        if self.thread.is_alive() and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
            self.thread.join(30)


@pytest.fixture(scope="module")
def sso(tmp_path_factory):
    work = tmp_path_factory.mktemp("preauth")
    system = System(work)
    procs: list = []
    gate = RuleGate()
    relay = None
    try:
        system.init()
        settings = RelaySettings(data_dir=system.data_dir, listen=f"127.0.0.1:{system.port}", http=f"127.0.0.1:{system.http_port}")
        relay = InProcessRelay(settings, gate)
        relay.start()
        system.wait_healthy()
        web = Backend("http", work, procs)
        system.publish_http("intranet", HOST, f"http://127.0.0.1:{web.port}", "--preauth", "oidc")
        system.start_connector("one")
        yield system, gate
    finally:
        system.stop()
        for proc in procs:
            proc.stop()
        if relay is not None:
            relay.stop()


def get(system, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", system.http_port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": HOST, **(headers or {})})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def _allowed(system):
    from .harness import wait_until

    return wait_until(
        lambda: (lambda r: r if r[0].status == 200 else None)(get(system, "/whoami", {"Authorization": "Bearer letmein"})),
        30,
        "an allowed request to reach the app",
        interval=0.2,
    )


def test_allowed_request_carries_the_gates_identity(sso):
    system, gate = sso
    response, body = _allowed(system)
    headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert headers["x-backhaul-user"] == "alice@corp"
    # A client cannot forge the identity: its own x-backhaul-* headers never pass.
    response, body = get(system, "/whoami", {"Authorization": "Bearer letmein", "X-Backhaul-User": "root", "X-Backhaul-Admin": "1"})
    headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert headers["x-backhaul-user"] == "alice@corp" and "x-backhaul-admin" not in headers
    head = gate.seen[-1]
    assert head.host == HOST and head.scheme == "http" and head.client == "127.0.0.1" and head.method == "GET"
    assert head.header("authorization") == "Bearer letmein" and head.header("x-backhaul-user") is None
    # The stream's OPEN named the user: the connector's log line for it says who.
    from .harness import wait_until

    wait_until(lambda: '"user":"alice@corp"' in system.connectors["one"].log(), 10, "the connector's stream line with the user")


def test_gate_answers_never_reach_the_app(sso):
    system, _ = sso
    _allowed(system)
    response, body = get(system, "/private")
    assert response.status == 401 and body == b"sign in first\n" and response.getheader("WWW-Authenticate") == "Bearer"
    assert response.getheader("X-Request-Id")
    response, _ = get(system, "/login")
    assert response.status == 302 and response.getheader("Location") == "https://idp.example/authorize?state=1"
    for path in ("/boom", "/evil"):
        response, body = get(system, path, {"Authorization": "Bearer letmein"})
        assert response.status == 503 and b"pre-authentication failed" in body
    # None of those requests reached the app.
    app_log = "".join(p.log() for p in system.procs if p.name.startswith("backend"))
    assert "/private" not in app_log and "/evil" not in app_log


def test_pipelined_requests_wait_for_the_gate_in_order(sso):
    system, _ = sso
    _allowed(system)
    ok = f"Host: {HOST}\r\nAuthorization: Bearer letmein\r\n".encode()
    with socket.create_connection(("127.0.0.1", system.http_port), timeout=10) as sock:
        sock.sendall(
            b"GET /one HTTP/1.1\r\n" + ok + b"\r\n"
            + b"GET /two HTTP/1.1\r\nHost: sso.test\r\n\r\n"
            + b"GET /three HTTP/1.1\r\n" + ok + b"Connection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"200", b"401", b"200"]
    assert data.index(b'"/one"') < data.index(b"sign in first") < data.index(b'"/three"')
