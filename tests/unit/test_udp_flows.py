"""UDP flows on each side of a real tunnel, in one process, with a fake clock for idle expiry.

The side under test runs its real code: a ``Tunnel`` on one end of a socketpair, a
real UDP app socket (relay) or real UDP target sockets (connector). The far side is
a bare ``mux.Session`` that the test drives by hand, so it can check every frame.
The wiring classes stand in for what RelayWorker / ConnectorAgent do with the
tunnel's events, reduced to UDP.
"""

from __future__ import annotations

import asyncio
import socket

import uvloop

from backhaul.config import FlowControl, UdpLimits
from backhaul.connector import admission, udp_flows
from backhaul.connector.streams import open_failure as _open_failure
from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode
from backhaul.relay import udp_edge
from backhaul.relay.metrics import UDP_DROPS, RelayMetrics
from backhaul.relay.opening import StreamOpener
from backhaul.relay.routing import TunnelRecord, TunnelRegistry
from backhaul.store.base import App
from backhaul.transport.tunnel import Tunnel
from .fakes import Clock


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 30))


class FarEnd:
    """The other end of the tunnel: a mux Session read and written by the test."""

    def __init__(self, sock: socket.socket, role: mux.Role) -> None:
        self.sock = sock
        self.session = mux.Session(role)
        self.seen: list[mux.Event] = []

    async def flush(self) -> None:
        data = self.session.data_to_send()
        if data:
            await asyncio.get_running_loop().sock_sendall(self.sock, bytes(data))

    async def until(self, predicate, what: str, timeout: float = 5.0) -> list[mux.Event]:
        """Read frames until ``predicate(all events seen)`` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.seen):
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; saw {self.seen}")
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), left)
            except asyncio.TimeoutError:
                continue
            self.session.receive_data(data)
            while (event := self.session.next_event()) is not None:
                self.seen.append(event)
            await self.flush()
        return self.seen

    def of(self, kind) -> list:
        return [e for e in self.seen if isinstance(e, kind)]


async def tunnel_pair(owner, role: mux.Role, flow: FlowControl = FlowControl()) -> tuple[Tunnel, FarEnd]:
    near, far = socket.socketpair()
    far.setblocking(False)
    tunnel = Tunnel(mux.Session(role, flow), owner, name="under-test", flow=flow)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: tunnel, near)
    other = mux.Role.CONNECTOR if role is mux.Role.RELAY else mux.Role.RELAY
    return tunnel, FarEnd(far, other)


# ---------------------------------------------------------------------------- relay side


class RelayWiring:
    def __init__(self, registry: TunnelRegistry, edge: udp_edge.UdpEdge) -> None:
        self.registry = registry
        self.edge = edge

    def tunnel_up(self, tunnel):
        tunnel.info = TunnelRecord("c-1", "default")
        self.registry.add(tunnel)

    def tunnel_down(self, tunnel, code, reason):
        self.registry.remove(tunnel)

    def stream_opened(self, tunnel, stream_id, meta):
        tunnel.reject(stream_id, ErrorCode.PROTOCOL_ERROR, "no")

    def control_received(self, tunnel, message):
        pass

    def goaway_received(self, tunnel, code, reason):
        pass

    def datagram_received(self, tunnel, flow_id, data):
        self.edge.deliver(tunnel, flow_id, data)


async def relay_side(limits: UdpLimits, clock: Clock, flow: FlowControl = FlowControl()):
    metrics = RelayMetrics()
    registry = TunnelRegistry()
    opener = StreamOpener(registry, metrics)
    wiring = RelayWiring(registry, udp_edge.UdpEdge(opener, "127.0.0.1", limits, metrics))
    tunnel, far = await tunnel_pair(wiring, mux.Role.RELAY, flow)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    app = App(name="dns", group="default", proto="udp", port=port, target="10.0.0.53:53")
    edge = udp_edge.UdpApp(app, opener, limits, metrics, clock)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    await asyncio.get_running_loop().create_datagram_endpoint(lambda: edge, sock=sock)
    return edge, tunnel, far, metrics


def user() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def received(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """The next datagram on a non-blocking socket (uvloop has no sock_recvfrom)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            return sock.recvfrom(70000)[0]
        except BlockingIOError:
            await asyncio.sleep(0.005)
    raise AssertionError("no datagram arrived")


async def until(predicate, what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def test_relay_holds_a_flows_datagrams_until_open_ok_and_drops_beyond_its_bound():
    async def main():
        edge, tunnel, far, metrics = await relay_side(UdpLimits(pending_bytes=3000), Clock())
        u = user()
        for n in range(5):
            u.sendto(bytes([n]) * 1000, ("127.0.0.1", edge.app.port))
        await until(lambda: edge.udp.up == 5, "the five datagrams")
        opened = (await far.until(lambda seen: far.of(mux.StreamOpened), "OPEN"))[0]
        assert opened.meta["proto"] == "udp" and opened.meta["app"] == "dns"
        assert opened.meta["target"] == "10.0.0.53:53" and opened.meta["client"] == f"127.0.0.1:{u.getsockname()[1]}"
        assert not far.of(mux.DatagramReceived), "nothing may go up before OPEN_OK"
        assert edge.udp.dropped["queue_full"] == 2  # 3000 bytes held, two datagrams over
        far.session.accept_stream(opened.stream_id)
        await far.flush()
        await far.until(lambda seen: len(far.of(mux.DatagramReceived)) == 3, "the held datagrams")
        assert [d.data for d in far.of(mux.DatagramReceived)] == [bytes([n]) * 1000 for n in range(3)]
        assert all(d.flow_id == opened.stream_id for d in far.of(mux.DatagramReceived))
        far.session.send_datagram(opened.stream_id, b"answer")
        await far.flush()
        assert await received(u) == b"answer"
        assert edge.udp.down == 1
        u.close()

    run(main())


def test_relay_flow_limit_then_idle_expiry_resets_flows_and_frees_the_table():
    async def main():
        clock = Clock()
        edge, tunnel, far, metrics = await relay_side(UdpLimits(max_flows=2, idle_timeout=10), clock)
        users = [user() for _ in range(3)]
        for u in users:
            u.sendto(b"q", ("127.0.0.1", edge.app.port))
        await until(lambda: edge.udp.up == 3, "three datagrams")
        assert metrics.apps["dns"].opened == 2 and edge.udp.dropped["flow_limit"] == 1
        await far.until(lambda seen: len(far.of(mux.StreamOpened)) == 2, "two OPENs")
        for opened in far.of(mux.StreamOpened):
            far.session.accept_stream(opened.stream_id)
        await far.flush()
        await far.until(lambda seen: len(far.of(mux.DatagramReceived)) == 2, "one datagram per flow")
        clock.now += 9.9
        assert edge.sweep() == 0
        clock.now += 0.1
        assert edge.sweep() == 2
        resets = await far.until(lambda seen: len(far.of(mux.StreamReset)) == 2, "two RSTs")
        assert {e.code for e in far.of(mux.StreamReset)} == {ErrorCode.IDLE_TIMEOUT}
        assert len(edge.flows) == 0 and tunnel.load == 0 and resets
        users[2].sendto(b"again", ("127.0.0.1", edge.app.port))
        await far.until(lambda seen: len(far.of(mux.StreamOpened)) == 3, "the third user's flow")
        assert edge.udp.idle == 2
        for u in users:
            u.close()

    run(main())


def test_relay_drops_datagrams_while_the_tunnel_is_backed_up():
    async def main():
        flow = FlowControl(tunnel_write_high=64 * 1024, tunnel_write_low=16 * 1024)
        edge, tunnel, far, metrics = await relay_side(UdpLimits(), Clock(), flow)
        u = user()
        u.sendto(b"open", ("127.0.0.1", edge.app.port))
        opened = (await far.until(lambda seen: far.of(mux.StreamOpened), "OPEN"))[0]
        far.session.accept_stream(opened.stream_id)
        await far.flush()
        await far.until(lambda seen: far.of(mux.DatagramReceived), "the first datagram")
        # The far end stops reading: the socketpair fills, then the tunnel's write buffer.
        chunk = b"x" * 60000
        for n in range(200):
            u.sendto(chunk, ("127.0.0.1", edge.app.port))
            await asyncio.sleep(0.001)
            assert tunnel.transport.get_write_buffer_size() <= 64 * 1024 + 2 * len(chunk)
            if edge.udp.dropped["tunnel_busy"] >= 5:
                break
        assert edge.udp.dropped["tunnel_busy"] >= 5
        u.close()

    run(main())


def test_relay_counts_a_flow_as_one_stream_with_its_datagrams_bytes_and_clean_idle_end():
    async def main():
        clock = Clock()
        edge, tunnel, far, metrics = await relay_side(UdpLimits(idle_timeout=10), clock)
        u = user()
        u.sendto(b"abc", ("127.0.0.1", edge.app.port))
        u.sendto(b"defg", ("127.0.0.1", edge.app.port))
        await far.until(lambda seen: far.of(mux.StreamOpened), "OPEN")
        opened = far.of(mux.StreamOpened)[0]
        far.session.accept_stream(opened.stream_id)
        await far.flush()
        await far.until(lambda seen: len(far.of(mux.DatagramReceived)) == 2, "the held datagrams")
        far.session.send_datagram(opened.stream_id, b"answer!")
        await far.flush()
        assert await received(u) == b"answer!"
        app = metrics.apps["dns"]
        assert app.opened == 1 and len(app.live) == 1 and sum(app.latency.counts) == 1
        clock.now += 10
        assert edge.sweep() == 1
        assert app.live == set() and app.failed == {}, "an idle end is a flow's clean end"
        assert (app.to_app, app.to_client) == (7, 7)
        assert (edge.udp.up, edge.udp.down, edge.udp.idle, edge.udp.failed_over) == (2, 1, 1, 0)
        series = metrics.snapshot([tunnel], ["dns"], 1, 0)["series"]
        assert [v for labels, v in series["backhaul_relay_udp_datagrams_total"]] == [2, 1]
        assert {labels[1] for labels, _ in series["backhaul_relay_udp_dropped_total"]} == set(UDP_DROPS)
        u.close()

    run(main())


# ---------------------------------------------------------------------------- connector side


class ConnectorWiring:
    def __init__(self, flows: udp_flows.UdpFlows, apps: dict) -> None:
        self.flows = flows
        self.apps = apps

    def tunnel_up(self, tunnel):
        pass

    def tunnel_down(self, tunnel, code, reason):
        pass

    def stream_opened(self, tunnel, stream_id, meta):
        refused = admission.admit(self.apps, meta, draining=False)
        if refused:
            tunnel.reject(stream_id, *refused)
        else:
            self.flows.open(tunnel, stream_id, meta, 5.0)

    def control_received(self, tunnel, message):
        pass

    def goaway_received(self, tunnel, code, reason):
        pass

    def datagram_received(self, tunnel, flow_id, data):
        self.flows.from_tunnel(tunnel, flow_id, data)


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(b"echo:" + data, addr)


def test_connector_flow_limit_refuses_with_refused_stream_and_idle_flows_are_reset():
    async def main():
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        target = f"127.0.0.1:{echo.get_extra_info('sockname')[1]}"
        clock = Clock()
        stats: dict = {}
        flows = udp_flows.UdpFlows(UdpLimits(max_flows=2, connector_idle_timeout=30), stats, _open_failure, clock)
        tunnel, far = await tunnel_pair(ConnectorWiring(flows, {"echo": {"name": "echo", "proto": "udp", "target": target}}), mux.Role.CONNECTOR)
        ids = [far.session.open_stream(mux.stream_meta("echo", target, "udp", f"198.51.100.1:{n}", f"r{n}")) for n in range(3)]
        await far.flush()
        await far.until(lambda seen: len(far.of(mux.StreamAccepted)) + len(far.of(mux.StreamRejected)) == 3, "three answers")
        assert sorted(e.stream_id for e in far.of(mux.StreamAccepted)) == ids[:2]
        (rejected,) = far.of(mux.StreamRejected)
        assert rejected.stream_id == ids[2] and rejected.code == ErrorCode.REFUSED_STREAM
        assert stats["udp_flows_refused"] == 1 and len(flows) == 2
        for flow_id in ids[:2]:
            far.session.send_datagram(flow_id, f"hi {flow_id}".encode())
        await far.flush()
        await far.until(lambda seen: len(far.of(mux.DatagramReceived)) == 2, "two echoes")
        assert {(d.flow_id, d.data) for d in far.of(mux.DatagramReceived)} == {(i, f"echo:hi {i}".encode()) for i in ids[:2]}
        clock.now += 30
        assert flows.sweep() == 2
        await far.until(lambda seen: len(far.of(mux.StreamReset)) == 2, "two RSTs")
        assert {e.code for e in far.of(mux.StreamReset)} == {ErrorCode.IDLE_TIMEOUT}
        assert len(flows) == 0 and stats["udp_flows_idle"] == 2
        # A datagram for a flow that is gone is dropped and counted, not an error.
        far.session.send_datagram(ids[0], b"late")
        await far.flush()
        await until(lambda: stats.get("udp_dropped_no_flow") == 1, "the late datagram to be counted")
        echo.close()

    run(main())


def test_connector_flow_holds_datagrams_sent_before_its_socket_is_ready_within_its_bound():
    async def main():
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        target = f"127.0.0.1:{echo.get_extra_info('sockname')[1]}"
        stats: dict = {}
        flows = udp_flows.UdpFlows(UdpLimits(pending_bytes=2500), stats, _open_failure)
        tunnel, far = await tunnel_pair(ConnectorWiring(flows, {"echo": {"name": "echo", "proto": "udp", "target": target}}), mux.Role.CONNECTOR)
        flow_id = far.session.open_stream(mux.stream_meta("echo", target, "udp", "198.51.100.1:9", "r"))
        for n in range(4):  # the protocol lets the opener send right after OPEN
            far.session.send_datagram(flow_id, bytes([65 + n]) * 1000)
        await far.flush()
        await far.until(lambda seen: len(far.of(mux.DatagramReceived)) == 2, "the two held datagrams echoed")
        assert sorted(d.data for d in far.of(mux.DatagramReceived)) == [b"echo:" + b"A" * 1000, b"echo:" + b"B" * 1000]
        assert stats["udp_dropped_queue_full"] == 2
        echo.close()

    run(main())
