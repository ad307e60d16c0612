"""A connector certificate is not a licence to exhaust the relay (config.FloodLimits).

A hostile client registers as a connector (in a group of its own, so no user is routed
to it), dials a tunnel with its real certificate and floods PING, OPEN, RST, WINDOW,
CONTROL or DATAGRAM frames without ever reading. The relay must answer GOAWAY ENHANCE_YOUR_CALM and
close within a bounded time, its memory must stay bounded, and a real connector's app
must keep answering meanwhile. ``HostileConnector`` is also what bench/floods.py floods with.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import socket
import ssl
import time
from pathlib import Path

import pytest

from backhaul.protocol.constants import ALPN_TUNNEL, ErrorCode, FrameType
from backhaul.protocol.framing import FrameDecoder, FrameEncoder, FrameError, parse_goaway
from tests.e2e.harness import echoes

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
#: Frames of one kind per write: large enough to flood, small enough to stop soon after a close.
FRAMES_PER_WRITE = 500


@dataclasses.dataclass
class FloodResult:
    kind: str
    #: how the flood stopped: "closed" (a write failed: the relay ended the connection),
    #: "held" (a write waited ``held_after`` seconds: the relay stopped reading us), or
    #: "open" (neither, within the time given)
    how: str
    #: seconds from the first frame to the end of the flood
    seconds: float
    frames_sent: int
    #: the error code of the GOAWAY the relay sent, if one arrived
    goaway: int | None = None
    #: seconds from the first frame until the relay's end of the connection was gone
    closed_after: float | None = None


class HostileConnector:
    """Dials a tunnel with a registered connector's certificate and floods it, never reading."""

    def __init__(self, port: int, state: Path) -> None:
        self.port = port
        self.tls = ssl.create_default_context(cafile=str(state / "ca.pem"))
        self.tls.load_cert_chain(str(state / "cert.pem"), str(state / "key.pem"))
        self.tls.set_alpn_protocols([ALPN_TUNNEL])

    def _frames(self, kind: str, encoder: FrameEncoder, state: dict) -> bytes:
        for _ in range(FRAMES_PER_WRITE):
            if kind == "ping":
                encoder.ping(b"\x00" * 8)
            elif kind == "open":
                state["sid"] += 2
                encoder.open(state["sid"], b'{"app": "x", "target": "10.0.0.1:22", "proto": "tcp", "client": "c", "id": "i"}')
            elif kind == "rst":
                if not state.get("opened"):
                    encoder.open(1, b'{"app": "x"}')  # refused at once; its RSTs then bring nothing
                    state["opened"] = True
                encoder.rst(1, ErrorCode.CANCEL, "again")
            elif kind == "window":
                encoder.window(0, 1)
            elif kind == "control":
                encoder.control(b'{"type": "health", "apps": {}}')
            elif kind == "datagram":
                encoder.datagram(1, b"\x00" * 1000)
            else:
                raise ValueError(f"unknown flood {kind!r}")
        return bytes(encoder.take())

    def flood(self, kind: str, seconds: float, held_after: float = 2.0, close_wait: float = 10.0) -> FloodResult:
        """Flood for at most ``seconds``, then read what the relay sent until it closes (``close_wait``)."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock = self.tls.wrap_socket(raw, server_hostname="127.0.0.1")
        started = time.monotonic()
        sent = 0
        sock.settimeout(held_after)
        encoder, state = FrameEncoder(), {"sid": -1}
        how = "open"
        try:
            while time.monotonic() - started < seconds:
                try:
                    sock.sendall(self._frames(kind, encoder, state))
                except (socket.timeout, TimeoutError):
                    how = "held"
                    break
                except (OSError, ssl.SSLError):
                    how = "closed"
                    break
                sent += FRAMES_PER_WRITE
            result = FloodResult(kind, how, time.monotonic() - started, sent)
            result.goaway, closed = self._read_until_closed(sock, close_wait)
            if closed:
                result.closed_after = time.monotonic() - started
        finally:
            sock.close()
        return result

    def burst(self, kind: str, writes: int = 4, close_wait: float = 10.0) -> FloodResult:
        """Send ``writes`` writes of one kind at once, then read: the relay's answer, as a peer that reads sees it."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
            with self.tls.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                started = time.monotonic()
                encoder, state = FrameEncoder(), {"sid": -1}
                sock.sendall(b"".join(self._frames(kind, encoder, state) for _ in range(writes)))
                result = FloodResult(kind, "open", time.monotonic() - started, writes * FRAMES_PER_WRITE)
                result.goaway, closed = self._read_until_closed(sock, close_wait)
                if closed:
                    result.closed_after = time.monotonic() - started
        return result

    @staticmethod
    def _read_until_closed(sock: ssl.SSLSocket, timeout: float) -> tuple[int | None, bool]:
        """Everything the relay sent (never read during the flood): (the GOAWAY's code, whether it closed)."""
        decoder = FrameDecoder()
        code = None
        deadline = time.monotonic() + timeout
        sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(256 * 1024)
            except (socket.timeout, TimeoutError):
                continue
            except (OSError, ssl.SSLError):
                return code, True
            if not data:
                return code, True
            try:
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    if frame.type == FrameType.GOAWAY:
                        code = parse_goaway(frame.payload)[1]
            except FrameError:
                return code, False
        return code, False


def timed_echo(port: int) -> float | None:
    """Seconds a new connection through the app takes to echo a probe; None if it failed."""
    started = time.monotonic()
    return time.monotonic() - started if echoes(port, b"probe") else None


#: kind -> the FloodLimits bucket that must end it
FLOODS = {
    "ping": "ping",
    "open": "unwanted_streams",
    "rst": "idle_frames",
    "window": "window_frames",
    "control": "control",
    "datagram": "idle_frames",
}


def test_a_hostile_connector_is_told_to_calm_down_and_others_keep_working(system, backend):
    echo = backend("echo")
    system.start_connector("good", tunnels=1)
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    system.admin("group", "create", "hostile")
    hostile = HostileConnector(system.port, system.register("evil", group="hostile"))
    rss_before = system.relay.rss_kib()
    rss_max = rss_before
    results: list[FloodResult] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for kind in FLOODS:
            future = pool.submit(hostile.flood, kind, 5.0)
            probes = []
            for _ in range(200):  # bounded: the flood itself ends within 5 s
                probes.append(timed_echo(port))
                rss_max = max(rss_max, system.relay.rss_kib())
                if future.done():
                    break
            result = future.result(30)
            results.append(result)
            # Another connector's app answered all along, and promptly.
            assert probes and all(p is not None and p < 2.0 for p in probes), (kind, probes)
            # Cut off: the relay stops reading at once and drops the connection within a second.
            # Its GOAWAY ENHANCE_YOUR_CALM left first; a client that does not read may lose it
            # to the reset (the relay's log below says which limit it was, every time).
            assert result.how in ("closed", "held"), result
            assert result.goaway in (ErrorCode.ENHANCE_YOUR_CALM, None), result
            assert result.closed_after is not None and result.closed_after < 3.0, result
    assert timed_echo(port) is not None
    # A peer that does read gets the reason in the GOAWAY: 2000 PINGs, twenty times the burst.
    told = hostile.burst("ping")
    assert told.goaway == ErrorCode.ENHANCE_YOUR_CALM and told.closed_after is not None, told
    # Before the limits, +417 MiB in 35 s of PINGs; now a flood ends long before memory grows.
    assert rss_max - rss_before < 48 * 1024, f"relay RSS grew by {(rss_max - rss_before) / 1024:.0f} MiB"
    logged = system.relay.log_entries("tunnel closed for a flood")
    assert sorted(e["limit"] for e in logged) == sorted([*FLOODS.values(), "ping"])
    assert all(e["level"] == "warning" and e["connector"] and e["peer"].startswith("127.0.0.1:") for e in logged)
    print("\n".join(f"{r.kind}: {r.how} after {r.seconds:.2f} s, closed after {r.closed_after:.2f} s, {r.frames_sent} frames, GOAWAY {r.goaway}" for r in results))
