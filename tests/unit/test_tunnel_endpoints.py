"""Tunnels over real sockets: endpoints are forgotten once a stream is closed both ways, bulk
DATA both ways completes behind small write buffers, and a hostile relay that floods a
connector's tunnel, or sends and never reads, is closed or held by TCP backpressure."""

from __future__ import annotations

import asyncio

import pytest

import logging
import socket
import ssl
import time

from backhaul.config import FloodLimits, FlowControl
from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode, FrameType
from backhaul.protocol.framing import FrameDecoder, FrameEncoder
from backhaul.transport.tunnel import Tunnel


class Owner:
    def __init__(self) -> None:
        self.up = asyncio.get_running_loop().create_future()
        self.down = asyncio.get_running_loop().create_future()
        self.opened: list[int] = []

    def tunnel_up(self, tunnel):
        if not self.up.done():
            self.up.set_result(tunnel)

    def tunnel_down(self, tunnel, code, reason):
        if not self.down.done():
            self.down.set_result((code, reason))

    def stream_opened(self, tunnel, stream_id, meta):
        endpoint = Endpoint(tunnel)
        endpoint.stream_id = stream_id
        tunnel.accept(stream_id, endpoint)
        self.opened.append(stream_id)

    def control_received(self, tunnel, message):
        pass

    def goaway_received(self, tunnel, code, reason):
        pass

    def datagram_received(self, tunnel, flow_id, data):
        pass


class Endpoint:
    """Echoes what it gets and ends its side when the peer ends."""

    def __init__(self, tunnel: Tunnel, echo: bool = True) -> None:
        self.tunnel = tunnel
        self.stream_id = 0
        self.echo = echo
        self.received = bytearray()
        self.ended = asyncio.get_running_loop().create_future()
        self.accepted = asyncio.get_running_loop().create_future()

    def on_accepted(self):
        self.accepted.set_result(True)

    def on_rejected(self, code, reason):
        self.accepted.set_exception(AssertionError(reason))

    def on_data(self, data, end):
        self.received += data
        self.tunnel.consumed(self.stream_id, len(data))
        if self.echo and data:
            self.tunnel.send(self.stream_id, data)
        if end:
            self.on_end()

    def on_end(self):
        if self.echo:
            self.tunnel.end(self.stream_id)
        if not self.ended.done():
            self.ended.set_result(True)

    def on_reset(self, code, reason):
        if not self.ended.done():
            self.ended.set_exception(AssertionError(reason))

    def on_write_resumed(self):
        pass


async def _pair(flow: FlowControl = FlowControl()):
    loop = asyncio.get_running_loop()
    server_owner, client_owner = Owner(), Owner()
    server = await loop.create_server(
        lambda: Tunnel(mux.Session(mux.Role.CONNECTOR, flow), server_owner, "connector", flow), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    await loop.create_connection(lambda: Tunnel(mux.Session(mux.Role.RELAY, flow), client_owner, "relay", flow), "127.0.0.1", port)
    relay = await asyncio.wait_for(client_owner.up, 5)
    connector = await asyncio.wait_for(server_owner.up, 5)
    return server, relay, connector


@pytest.mark.parametrize("size", [10, 20 * 1024 * 1024])
def test_streams_closed_both_ways_leave_no_endpoint_behind(size):
    async def main():
        server, relay, connector = await _pair()
        try:
            endpoints = []
            for _ in range(5):
                endpoint = Endpoint(relay, echo=False)
                endpoint.stream_id = relay.open({"app": "a", "target": "t:1", "proto": "tcp", "client": "c", "id": "i"}, endpoint)
                await asyncio.wait_for(endpoint.accepted, 5)
                # More than the stream window: the END waits in the session's queue for credit.
                relay.send(endpoint.stream_id, b"x" * size, end=True)
                endpoints.append(endpoint)
            for endpoint in endpoints:
                await asyncio.wait_for(endpoint.ended, 20)
                assert len(endpoint.received) == size
            for _ in range(100):
                if not relay.endpoints and not connector.endpoints:
                    break
                await asyncio.sleep(0.02)
            assert relay.endpoints == {} and connector.endpoints == {}
            assert relay.session.active_streams == 0 and connector.session.active_streams == 0
        finally:
            relay.close()
            connector.close()
            server.close()

    asyncio.run(main())


def test_bulk_data_both_ways_behind_small_write_buffers_completes():
    """Both ends above their write-buffer mark at once must not stop reading each other:
    DATA and WINDOW are not replies (protocol/mux.py, "Floods")."""
    flow = FlowControl(tunnel_write_high=64 * 1024, tunnel_write_low=16 * 1024)

    async def main():
        server, relay, connector = await _pair(flow)
        try:
            endpoints = []
            size = 8 * 1024 * 1024
            for _ in range(4):
                endpoint = Endpoint(relay, echo=False)
                endpoint.stream_id = relay.open({"app": "a", "target": "t:1", "proto": "tcp", "client": "c", "id": "i"}, endpoint)
                await asyncio.wait_for(endpoint.accepted, 5)
                endpoints.append(endpoint)
            for endpoint in endpoints:  # the connector echoes: DATA flows both ways at once
                relay.send(endpoint.stream_id, b"x" * size, end=True)
            for endpoint in endpoints:
                await asyncio.wait_for(endpoint.ended, 30)
                assert len(endpoint.received) == size
            assert relay.session.flood is None and connector.session.flood is None
            assert not relay.session.input_held and not connector.session.input_held
        finally:
            relay.close()
            connector.close()
            server.close()

    asyncio.run(main())


class HostileRelay(asyncio.Protocol):
    """Sends PINGs as fast as its socket takes them and, until ``read()``, never reads."""

    def __init__(self, pings: int) -> None:
        self.pings = pings
        self.sent = 0
        self.decoder = FrameDecoder()
        self.pongs = 0
        self.goaway_code = None
        self.transport = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.started = False
        transport.pause_reading()
        transport.set_write_buffer_limits(256 * 1024, 64 * 1024)
        # Small kernel buffers, so that "TCP holds it" shows within a few MiB.
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)

    def start(self):
        self.started = True
        self.resume_writing()

    def resume_writing(self):
        encoder = FrameEncoder()
        while self.started and self.sent < self.pings and self.transport.get_write_buffer_size() < 256 * 1024:
            for _ in range(min(1000, self.pings - self.sent)):
                encoder.ping(self.sent.to_bytes(8, "big"))
                self.sent += 1
            self.transport.write(bytes(encoder.take()))

    def pause_writing(self):
        pass

    def read(self):
        self.transport.resume_reading()

    def data_received(self, data):
        self.decoder.feed(data)
        while (frame := self.decoder.next_frame()) is not None:
            if frame.type == FrameType.PONG:
                self.pongs += 1
            elif frame.type == FrameType.GOAWAY:
                self.goaway_code = int.from_bytes(frame.payload[4:6], "big")

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


async def _until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _tls_contexts(tmp_path):
    """(server, client) TLS contexts from a CA of our own, as between a relay and a connector."""
    from backhaul import pki

    ca = pki.make_ca()
    key, cert = pki.make_service_cert(ca, ["127.0.0.1"])
    (tmp_path / "ca.pem").write_bytes(pki.cert_to_pem(ca.cert))
    (tmp_path / "service.pem").write_bytes(pki.cert_to_pem(cert))
    (tmp_path / "service.key").write_bytes(pki.key_to_pem(key))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(tmp_path / "service.pem"), str(tmp_path / "service.key"))
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    return server, client


async def _hostile_pair(hostile: HostileRelay, flow: FlowControl, floods: FloodLimits, tls=None):
    loop = asyncio.get_running_loop()
    owner = Owner()
    server_tls, client_tls = tls or (None, None)
    server = await loop.create_server(lambda: hostile, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    session = mux.Session(mux.Role.CONNECTOR, flow, floods=floods)
    extra = {"ssl": client_tls, "server_hostname": "127.0.0.1"} if client_tls else {}
    await loop.create_connection(lambda: Tunnel(session, owner, "connector", flow), "127.0.0.1", port, **extra)
    tunnel = await asyncio.wait_for(owner.up, 5)
    sock = tunnel.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    await _until(lambda: hostile.transport is not None, 5)
    hostile.start()
    return server, owner, tunnel


def test_a_relay_flooding_pings_is_told_to_calm_down_and_dropped(caplog):
    """The connector side defends itself exactly as the relay does (same Session code)."""
    flow = FlowControl(tunnel_close_timeout=0.5)

    async def main():
        hostile = HostileRelay(pings=20_000)
        server, owner, tunnel = await _hostile_pair(hostile, flow, FloodLimits())
        try:
            code, reason = await asyncio.wait_for(owner.down, 5)
            assert code == ErrorCode.ENHANCE_YOUR_CALM and "ping" in reason
            # The hostile end never reads, yet the connection goes within the close timeout.
            await _until(lambda: tunnel.lost, 5)
            assert hostile.sent < hostile.pings or hostile.pongs == 0  # it never read a thing
        finally:
            tunnel.close()
            server.close()

    with caplog.at_level(logging.WARNING, logger="backhaul.tunnel"):
        asyncio.run(main())
    floods = [r for r in caplog.records if r.getMessage() == "tunnel closed for a flood"]
    assert floods and floods[0].levelno == logging.WARNING and floods[0].limit == "ping"


@pytest.mark.parametrize("transport", ["tcp-asyncio", "tls-uvloop"])
def test_a_relay_that_sends_and_never_reads_is_held_by_tcp(transport, tmp_path):
    """Replies behind a full write buffer: the connector stops reading, its buffer stays bounded,
    and once the relay reads again every PING gets its PONG. Over plain TCP with asyncio's
    loop, and over TLS with uvloop, as the relay and the connector run."""
    flow = FlowControl(tunnel_write_high=64 * 1024, tunnel_write_low=16 * 1024, tunnel_close_timeout=0.5)
    floods = FloodLimits(ping_burst=10**7, ping_rate=10.0**7, reply_bytes_while_blocked=16 * 1024)
    pings = 300_000  # 6 MiB of PINGs, 6 MiB of PONGs: far beyond the buffers

    tls = _tls_contexts(tmp_path) if transport.startswith("tls") else None

    async def main():
        hostile = HostileRelay(pings)
        server, owner, tunnel = await _hostile_pair(hostile, flow, floods, tls)
        try:
            deadline = time.monotonic() + 10
            while not tunnel._reading_held and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert tunnel._reading_held and tunnel.session.input_held
            held = tunnel.transport.get_write_buffer_size()
            await asyncio.sleep(0.3)  # held: nothing more is read, so nothing more is queued
            assert tunnel.transport.get_write_buffer_size() == held
            # The bound: the high mark, the replies allowed behind it, and the replies to the one
            # read (256 KiB of PINGs) that was being answered when the buffer crossed the mark.
            assert held <= flow.tunnel_write_high + floods.reply_bytes_while_blocked + 256 * 1024
            assert hostile.sent < pings  # TCP holds the hostile end too
            hostile.read()
            deadline = time.monotonic() + 30
            while hostile.pongs < pings and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert hostile.sent == pings and hostile.pongs == pings
            assert not tunnel.closed
        finally:
            tunnel.close()
            server.close()
            hostile.transport.abort()

    if transport == "tls-uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def test_a_closing_tunnel_whose_peer_never_reads_is_aborted():
    flow = FlowControl(tunnel_write_high=64 * 1024, tunnel_write_low=16 * 1024, tunnel_close_timeout=0.5)
    floods = FloodLimits(ping_burst=10**7, ping_rate=10.0**7, reply_bytes_while_blocked=16 * 1024)

    async def main():
        hostile = HostileRelay(300_000)
        server, owner, tunnel = await _hostile_pair(hostile, flow, floods)
        try:
            deadline = time.monotonic() + 10
            while not tunnel._reading_held and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert tunnel.transport.get_write_buffer_size() > 0
            started = time.monotonic()
            tunnel.close(ErrorCode.GOING_AWAY, "retired")
            await _until(lambda: tunnel.lost, 5)
            # Aborted after tunnel_close_timeout, not left waiting for a reader that never comes.
            assert flow.tunnel_close_timeout <= time.monotonic() - started < 3
        finally:
            server.close()
            hostile.transport.abort()

    asyncio.run(main())
