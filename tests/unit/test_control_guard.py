"""ControlGuard: the control API's idle, head and body timers, with time mocked.

The guard sits on a real transport (a socket pair); its timers run on a fake clock that
the test advances; the inner protocol records what it is handed.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from backhaul.config import ListenLimits
from backhaul.relay.control_guard import ControlGuard

pytestmark = pytest.mark.codec_independent

LIMITS = ListenLimits(idle_timeout=60, header_timeout=10, body_timeout=30)


class Clock:
    """``call_later`` on a clock the test moves (the guard's only use of its loop)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[list] = []

    def call_later(self, delay, callback, *args):
        entry = [self.now + delay, callback, args, False]
        self.timers.append(entry)

        class Handle:
            def cancel(self_inner):
                entry[3] = True

        return Handle()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for entry in sorted(self.timers, key=lambda e: e[0]):
            if entry[0] <= self.now and not entry[3]:
                entry[3] = True
                entry[1](*entry[2])

    def pending(self) -> int:
        return sum(1 for entry in self.timers if not entry[3])


class Inner(asyncio.Protocol):
    """Stands where aiohttp's RequestHandler is: records every callback."""

    def __init__(self) -> None:
        self.events: list = []

    def connection_made(self, transport):
        self.events.append("made")

    def data_received(self, data):
        self.events.append(data)

    def eof_received(self):
        self.events.append("eof")  # and None, as aiohttp's: the transport then closes

    def connection_lost(self, exc):
        self.events.append("lost")


async def _guarded(clock: Clock, closed: list):
    ours, theirs = socket.socketpair()
    inner = Inner()
    guard = ControlGuard(inner, LIMITS, on_close=lambda: closed.append(True), loop=clock)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: guard, ours)
    theirs.setblocking(False)
    return guard, inner, transport, theirs


async def _until(predicate, what: str) -> None:
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data + b"<eof>"
        data += chunk


def test_a_silent_connection_is_closed_after_the_idle_timeout():
    async def run():
        clock, closed = Clock(), []
        guard, inner, transport, peer = await _guarded(clock, closed)
        clock.advance(59.9)
        assert not transport.is_closing()
        clock.advance(0.2)
        assert transport.is_closing()
        await _until(lambda: closed, "connection_lost")
        assert inner.events == ["made", "lost"]
        assert _read_all(peer) == b"<eof>"  # closed without an answer: nothing was asked
        assert guard.metrics.events == {"control_idle_timeouts": 1}
        peer.close()

    asyncio.run(run())


def test_a_head_not_whole_in_time_gets_408_and_is_closed():
    async def run():
        clock, closed = Clock(), []
        guard, inner, transport, peer = await _guarded(clock, closed)
        clock.advance(50)
        peer.send(b"GET /v1/health HTTP/1.1\r\nHo")
        await _until(lambda: len(inner.events) == 2, "the first bytes")
        clock.advance(9.9)  # 59.9 s after the start: the idle timer no longer runs
        assert not transport.is_closing()
        peer.send(b"st: relay\r\nX-Slow: a")
        await _until(lambda: len(inner.events) == 3, "more bytes")
        clock.advance(0.2)  # 10 s after the head's first byte, trickle or not
        assert transport.is_closing()
        await _until(lambda: closed, "connection_lost")
        assert _read_all(peer).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert guard.metrics.events == {"control_head_timeouts": 1}
        peer.close()

    asyncio.run(run())


def test_whole_requests_stop_the_timers_and_a_slow_body_is_cut():
    async def run():
        clock, closed = Clock(), []
        guard, inner, transport, peer = await _guarded(clock, closed)
        peer.send(b"GET /a HTTP/1.1\r\nHost: relay\r\n\r\n")
        await _until(lambda: len(inner.events) == 2, "a request")
        assert guard.waiting_for is None and clock.pending() == 0  # aiohttp's keep-alive takes over
        clock.advance(1000)
        assert not transport.is_closing()
        # Two pipelined requests in one read: the forwarding is byte for byte.
        pipelined = b"GET /b HTTP/1.1\r\nHost: relay\r\n\r\nPOST /c HTTP/1.1\r\nHost: relay\r\nContent-Length: 5\r\n\r\nab"
        peer.send(pipelined)
        await _until(lambda: len(inner.events) == 3, "the pipelined requests")
        assert inner.events[2] == pipelined
        assert guard.waiting_for == "body" and guard.requests == 3
        clock.advance(29.9)
        assert not transport.is_closing()
        clock.advance(0.2)
        assert transport.is_closing()
        await _until(lambda: closed, "connection_lost")
        assert not _read_all(peer).startswith(b"HTTP/1.1 408")  # not the first request: no 408
        assert guard.metrics.events == {"control_body_timeouts": 1}
        peer.close()

    asyncio.run(run())


def test_eof_and_a_close_reach_the_inner_protocol_and_cancel_the_timers():
    async def run():
        clock, closed = Clock(), []
        guard, inner, transport, peer = await _guarded(clock, closed)
        peer.send(b"GET /a HTTP/1.1\r\nHo")
        await _until(lambda: len(inner.events) == 2, "bytes")
        peer.close()
        await _until(lambda: closed, "connection_lost")
        # aiohttp's eof_received returns None: the transport closes after it.
        assert inner.events[2:] == ["eof", "lost"] and closed == [True]
        assert clock.pending() == 0
        clock.advance(1000)
        assert guard.metrics.events == {}

    asyncio.run(run())


def test_unparsable_input_goes_to_aiohttp_and_a_last_deadline_runs():
    async def run():
        clock, closed = Clock(), []
        guard, inner, transport, peer = await _guarded(clock, closed)
        peer.send(b"\x16\x03\x01 not http at all\r\n\r\n")
        await _until(lambda: len(inner.events) == 2, "bytes")
        assert guard.waiting_for == "unparsed"
        clock.advance(30.1)
        assert transport.is_closing()
        await _until(lambda: closed, "connection_lost")
        peer.close()

    asyncio.run(run())
