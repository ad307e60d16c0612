"""Two relay nodes and a relay-to-relay link: a user on node A reaches apps whose connector
holds its tunnels only on node B.

The nodes are two real RelayWorkers on a thread of this test process (so the test can fill
their peer directories by hand: the nodes table of the store is not this part's), each with
its own data dir and node certificate from the one service CA, sharing one SQLite store (B's
store file is a link to A's; SQLite follows it, so both use one WAL). A listens on
127.0.0.1, B on 127.0.0.2: app ports bind on the node's listen host, and a user aims at one.
Connectors and backends are real processes; everything goes through real sockets and TLS.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import socket
import threading
import time

import pytest
import uvloop

from backhaul import pki
from backhaul.relay.worker import RelaySettings, RelayWorker

from .harness import System, echoes, free_port, wait_until

pytestmark = pytest.mark.e2e

HOST_A, HOST_B = "127.0.0.1", "127.0.0.2"


def _node_cert(data_dir, ca, names: list[str]) -> str:
    """A node of its own in ``data_dir``: a new node id, in its certificate and its service.json."""
    node_id = pki.new_node_id()
    key, cert = pki.make_service_cert(ca, names, node_id=node_id)
    pki.write_private(data_dir / "service.key", pki.key_to_pem(key))
    (data_dir / "service.pem").unlink()
    pki.write_file(data_dir / "service.pem", pki.cert_to_pem(cert))
    record = json.loads((data_dir / "service.json").read_text())
    (data_dir / "service.json").unlink()
    pki.write_file(data_dir / "service.json", json.dumps({**record, "node_id": node_id}).encode())
    return node_id


class TwoNodes:
    """Nodes A and B of one service, on a loop thread; ``call`` runs a coroutine there."""

    def __init__(self, tmp_path) -> None:
        self.system = System(tmp_path)
        self.system.init()
        a_dir = self.system.data_dir
        ca = pki.load_ca(a_dir)
        self.b_dir = tmp_path / "service-b"
        self.b_dir.mkdir(mode=0o700)
        for name in ("ca.pem", "ca.key", "service.pem", "service.key", "admin.token", "service.json"):
            shutil.copy2(a_dir / name, self.b_dir / name)
        os.symlink(a_dir / "store.sqlite", self.b_dir / "store.sqlite")
        _node_cert(a_dir, ca, [HOST_A, "localhost"])
        _node_cert(self.b_dir, ca, [HOST_B])
        self.b_port = free_port()
        self.b_url = f"https://{HOST_B}:{self.b_port}"
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.a: RelayWorker | None = None
        self.b: RelayWorker | None = None
        # A advertises to connectors an address they cannot dial (a bind-all one, which they drop
        # from the node list): whatever a connector learns, its tunnels stay where it enrolled.
        self.a = self.call(
            self._start(a_dir, f"{HOST_A}:{self.system.port}", f"{HOST_A}:{self.system.http_port}", advertise="0.0.0.0:9")
        )
        self.b_http = free_port()
        self.b = self.call(self._start(self.b_dir, f"{HOST_B}:{self.b_port}", f"{HOST_B}:{self.b_http}"))

    @staticmethod
    async def _start(data_dir, listen: str, http: str, advertise: str = "") -> RelayWorker:
        worker = RelayWorker(
            RelaySettings(data_dir=data_dir, listen=listen, http=http, drain_timeout=0.5, advertise=advertise, peer_advertise=listen)
        )
        await worker.start()
        return worker

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def reload(self) -> None:
        """What each worker's poll does after a change in the store (these workers do not poll)."""
        for worker in (self.a, self.b):
            if worker is not None and worker.peers is not None:
                self.call(worker.reload())

    def a_knows_b(self) -> None:
        """A's directory as the store's nodes table will fill it: B holds the default group."""

        async def fill():
            self.a.peers.update({"default": [self.b.peers.node_id]}, {self.b.peers.node_id: f"{HOST_B}:{self.b_port}"})

        self.call(fill())

    def stat(self, worker: RelayWorker, event: str) -> int:
        async def read():
            return worker.metrics.events.get(event, 0)

        return self.call(read())

    def local_tunnels(self, worker: RelayWorker) -> int:
        async def read():
            return len(worker.registry.tunnels())

        return self.call(read())

    def stop_b(self) -> None:
        worker, self.b = self.b, None
        self.call(worker.stop())

    def stop(self) -> None:
        for worker in (self.b, self.a):
            if worker is not None:
                self.call(worker.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.system.stop()


@pytest.fixture
def nodes(tmp_path):
    two = TwoNodes(tmp_path)
    try:
        yield two
    finally:
        two.stop()


def _http_get(port: int, host: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST_A, port, timeout=10)
    try:
        conn.request("GET", "/hello", headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _udp_echoes(port: int, payload: bytes) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(payload, (HOST_A, port))
        try:
            data, _ = sock.recvfrom(70000)
        except (TimeoutError, socket.timeout):
            return False
        return data == payload


def test_a_user_on_one_node_reaches_apps_whose_connector_is_on_the_other(nodes, backend):
    system = nodes.system
    echo = backend("echo")
    web = backend("http")
    udp_echo = backend("udpecho")
    port = system.publish_tcp("echo", echo.target)
    system.publish_http("web", "web.peer.test", f"http://{web.target}")
    udp_port = free_port()
    system.admin("app", "publish", "flows", "--group", "default", "--udp", str(udp_port), "--target", udp_echo.target)
    nodes.reload()
    # the connector knows only node B: its tunnels are there, none on A
    system.register("remote", service=nodes.b_url)
    system.start_connector("remote", tunnels=1)
    wait_until(lambda: nodes.local_tunnels(nodes.b) == 1, 30, "the connector's tunnel on B")
    assert nodes.local_tunnels(nodes.a) == 0
    nodes.a_knows_b()

    # TCP: through A, the link, B, B's tunnel
    wait_until(lambda: echoes(port, b"two hops"), 30, "the TCP app to echo through A", interval=0.2)
    for i in range(5):
        assert echoes(port, f"probe {i}".encode())
    bridged = nodes.stat(nodes.b, "peer_streams_bridged")
    assert bridged >= 6 and nodes.stat(nodes.a, "peer_links_dialed") == 1, "one link carries every stream"

    # HTTP: the same way
    status, body = wait_until(
        lambda: (lambda answer: answer if answer[0] == 200 else None)(_http_get(system.http_port, "web.peer.test")),
        30, "the HTTP app to answer through A", interval=0.2,
    )
    assert status == 200 and body
    assert nodes.stat(nodes.b, "peer_streams_bridged") > bridged

    # UDP: a flow's datagrams cross the link both ways
    bridged = nodes.stat(nodes.b, "peer_streams_bridged")
    wait_until(lambda: _udp_echoes(udp_port, b"datagram"), 30, "the UDP app to echo through A", interval=0.2)
    assert nodes.stat(nodes.b, "peer_streams_bridged") > bridged

    # a local tunnel is preferred: with a connector on A too, B carries none of A's streams
    system.register("local")
    system.start_connector("local", tunnels=1)
    wait_until(lambda: nodes.local_tunnels(nodes.a) == 1, 30, "the local connector's tunnel on A")
    wait_until(lambda: echoes(port), 30, "the app through the local connector", interval=0.2)
    before = nodes.stat(nodes.b, "peer_streams_bridged")
    for i in range(10):
        assert echoes(port, f"local {i}".encode())
        assert _http_get(system.http_port, "web.peer.test")[0] == 200
    assert nodes.stat(nodes.b, "peer_streams_bridged") == before
    system.connectors["local"].stop()
    wait_until(lambda: nodes.local_tunnels(nodes.a) == 0, 30, "the local connector's tunnel to go")

    # B goes away mid-stream: the user's connection through A is closed, promptly
    user = socket.create_connection((HOST_A, port), timeout=10)
    try:
        user.sendall(b"before")
        got = b""
        while len(got) < len(b"before"):
            chunk = user.recv(64)
            assert chunk, "the stream through B ended early"
            got += chunk
        started = time.monotonic()
        nodes.stop_b()
        user.settimeout(10)
        try:
            ended = user.recv(64) == b""
        except ConnectionResetError:
            ended = True
        assert ended and time.monotonic() - started < 8, "the user's connection ends when B goes"
    finally:
        user.close()
    # A stays up, and refuses new users at once (no node holds the app now) instead of hanging
    started = time.monotonic()
    assert not echoes(port)
    assert time.monotonic() - started < 5
