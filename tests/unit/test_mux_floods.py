"""Flood limits and reply backpressure of the multiplexer (config.FloodLimits), sans I/O.

Each limit is tried for both roles (a connector is protected from a hostile relay as the
relay is from a hostile connector), with the hostile frames fed whole, a byte at a time,
and followed by the start of a frame that never completes; the hostile frames are built
by each codec build in turn. Then legitimate traffic at its worst (frozen clock) must
never trip a limit: keepalive, bulk DATA both ways, tens of thousands of streams, bursts
of refusals, cancels and health reports.
"""

from __future__ import annotations

import struct

import pytest

from backhaul.config import FloodLimits, FlowControl, Keepalive
from backhaul.protocol import mux
from backhaul.protocol.constants import HEADER_FORMAT, ErrorCode, FrameType
from backhaul.protocol.framing import FrameDecoder, parse_goaway

from .test_mux import SMALL, Clock, collect, events, open_accepted, pump

#: Small buckets so that each flood is a few dozen frames (fast even a byte at a time).
TIGHT = FloodLimits(
    ping_burst=20,
    ping_rate=2.0,
    control_burst=20,
    control_rate=2.0,
    unwanted_stream_burst=30,
    unwanted_stream_rate=3.0,
    idle_frame_burst=30,
    idle_frame_rate=3.0,
    idle_frames_per_stream=2,
    window_frames_base=40,
    window_frames_per_frame=2,
    reply_bytes_while_blocked=1024,
)
ROLES = [mux.Role.RELAY, mux.Role.CONNECTOR]
MODES = ["whole", "bytes", "trailing"]


def peer_ids(role: mux.Role, count: int) -> list[int]:
    """Stream ids the peer of a ``role`` session opens: odd for a connector peer, even for a relay."""
    first = 1 if role is mux.Role.RELAY else 2
    return [first + 2 * i for i in range(count)]


def empty_data(stream_id: int) -> bytes:
    """An empty DATA without END; our encoder never makes one, so it is packed by hand."""
    return struct.pack(HEADER_FORMAT, int(FrameType.DATA), 0, 0, stream_id, 0)


def frames_out(session: mux.Session) -> list:
    decoder = FrameDecoder()
    decoder.feed(bytes(session.data_to_send()))
    return list(iter(decoder.next_frame, None))


def feed_frames(session: mux.Session, frames: list[bytes], mode: str, on_event=None) -> tuple[list, int | None]:
    """Feed hostile frames one by one; return (events, index of the frame that ended the tunnel)."""
    seen: list = []
    failed_at = None
    trailer = frames[0][:7]  # the start of a frame that never completes
    for index, frame in enumerate(frames):
        chunk = frame + trailer if mode == "trailing" and index == len(frames) - 1 else frame
        if mode == "bytes":
            for i in range(len(chunk)):
                session.receive_data(chunk[i : i + 1])
                seen.extend(_drain(session, on_event))
        else:
            session.receive_data(chunk)
            seen.extend(_drain(session, on_event))
        if failed_at is None and session.closed:
            failed_at = index
    return seen, failed_at


def _drain(session: mux.Session, on_event) -> list:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
        if on_event is not None:
            on_event(session, event)
    return out


def assert_calm_down(session: mux.Session, seen: list, limit: str) -> None:
    """The tunnel ended with ENHANCE_YOUR_CALM, said so in a GOAWAY, and named the limit."""
    assert isinstance(seen[-1], mux.TunnelFailed), seen[-3:]
    assert seen[-1].code == ErrorCode.ENHANCE_YOUR_CALM
    assert limit in seen[-1].reason
    assert session.flood == limit and session.closed
    goaways = [f for f in frames_out(session) if f.type == FrameType.GOAWAY]
    assert goaways and parse_goaway(goaways[-1].payload)[1] == ErrorCode.ENHANCE_YOUR_CALM
    assert session.next_event() is None


def test_enhance_your_calm_is_code_17():
    # A wire number: peers must agree on it (docs/protocol.md's code table).
    assert ErrorCode.ENHANCE_YOUR_CALM == 17


# ---------------------------------------------------------------------------- each limit


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("role", ROLES)
def test_ping_flood(codec, role, mode):
    session = mux.Session(role, SMALL, floods=TIGHT, clock=Clock())
    rogue = codec.FrameEncoder()
    frames = []
    for i in range(TIGHT.ping_burst + 5):
        rogue.ping(i.to_bytes(8, "big"))
        frames.append(bytes(rogue.take()))
    seen, failed_at = feed_frames(session, frames, mode)
    assert failed_at == TIGHT.ping_burst  # exactly the burst was answered
    assert_calm_down(session, seen, "ping")


@pytest.mark.parametrize("role", ROLES)
def test_pings_within_the_rate_are_answered(codec, role):
    clock = Clock()
    session = mux.Session(role, SMALL, floods=TIGHT, clock=clock)
    rogue = codec.FrameEncoder()
    for i in range(10 * TIGHT.ping_burst):
        clock.now += 1.0 / TIGHT.ping_rate
        rogue.ping(i.to_bytes(8, "big"))
        session.receive_data(bytes(rogue.take()))
        assert events(session) == []
    assert not session.closed
    assert sum(f.type == FrameType.PONG for f in frames_out(session)) == 10 * TIGHT.ping_burst


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("role", ROLES)
def test_control_flood(codec, role, mode):
    session = mux.Session(role, SMALL, floods=TIGHT, clock=Clock())
    rogue = codec.FrameEncoder()
    frames = []
    for _ in range(TIGHT.control_burst + 5):
        rogue.control(b'{"type": "health", "apps": {"a": true}}')
        frames.append(bytes(rogue.take()))
    seen, failed_at = feed_frames(session, frames, mode)
    assert failed_at == TIGHT.control_burst
    assert sum(isinstance(e, mux.ControlReceived) for e in seen) == TIGHT.control_burst
    assert_calm_down(session, seen, "control")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("role", ROLES)
def test_open_flood_refused_by_the_owner(codec, role, mode):
    """The relay refuses every OPEN from a connector; a connector refuses unknown apps: both count."""
    code = ErrorCode.PROTOCOL_ERROR if role is mux.Role.RELAY else ErrorCode.UNKNOWN_APP

    def refuse(session, event):
        if isinstance(event, mux.StreamOpened):
            session.reject_stream(event.stream_id, code, "not here")

    session = mux.Session(role, SMALL, floods=TIGHT, clock=Clock())
    rogue = codec.FrameEncoder()
    frames = []
    for sid in peer_ids(role, TIGHT.unwanted_stream_burst + 5):
        rogue.open(sid, b'{"app": "x", "target": "10.0.0.1:22"}')
        frames.append(bytes(rogue.take()))
    seen, failed_at = feed_frames(session, frames, mode, on_event=refuse)
    assert failed_at == TIGHT.unwanted_stream_burst
    assert_calm_down(session, seen, "unwanted_streams")


@pytest.mark.parametrize("role", ROLES)
def test_open_flood_refused_by_the_session_itself(codec, role):
    """OPENs beyond max_streams (answered REFUSED_STREAM by the session) count too."""
    session = mux.Session(role, FlowControl(max_streams=1), floods=TIGHT, clock=Clock())
    rogue = codec.FrameEncoder()
    frames = []
    for sid in peer_ids(role, TIGHT.unwanted_stream_burst + 5):
        rogue.open(sid, b'{"app": "x"}')
        frames.append(bytes(rogue.take()))
    seen, failed_at = feed_frames(session, frames, "whole")
    assert failed_at == TIGHT.unwanted_stream_burst + 1  # the first one was taken, not refused
    assert_calm_down(session, seen, "unwanted_streams")


def test_refusals_after_a_connect_attempt_are_not_a_flood(codec):
    """A target that is down makes every OPEN fail: that is work done, not a flood."""
    session = mux.Session(mux.Role.CONNECTOR, FlowControl(), floods=TIGHT, clock=Clock())
    rogue = codec.FrameEncoder()
    for sid in peer_ids(mux.Role.CONNECTOR, 5 * TIGHT.unwanted_stream_burst):
        rogue.open(sid, b'{"app": "x"}')
    session.receive_data(bytes(rogue.take()))
    for event in events(session):
        session.reject_stream(event.stream_id, ErrorCode.CONNECT_REFUSED, "connection refused")
    assert not session.closed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("role", ROLES)
def test_rapid_reset(codec, role, mode):
    """Streams opened and reset by the peer before they were accepted (CVE-2023-44487)."""
    session = mux.Session(role, SMALL, floods=TIGHT, clock=Clock())
    rogue = codec.FrameEncoder()
    frames = []
    for sid in peer_ids(role, TIGHT.unwanted_stream_burst + 5):
        rogue.open(sid, b'{"app": "x"}')
        rogue.rst(sid, ErrorCode.CANCEL, "never mind")
        frames.append(bytes(rogue.take()))
    seen, failed_at = feed_frames(session, frames, mode)
    assert failed_at == TIGHT.unwanted_stream_burst
    assert_calm_down(session, seen, "unwanted_streams")


def _idle_frames(codec, role: mux.Role, kind: str, session: mux.Session, count: int) -> list[bytes]:
    """``count`` frames that bring no work, after whatever sets them up (first in the list)."""
    rogue = codec.FrameEncoder()
    setup = b""
    if kind in ("rst", "fin", "open_ok"):
        sid = session.open_stream({"app": "a"})
        session.data_to_send()
        rogue.rst(sid, ErrorCode.CANCEL, "gone")  # closes it: work, not idle
        setup = bytes(rogue.take())
    elif kind == "empty_data":
        sid = session.open_stream({"app": "a"})
        session.data_to_send()
        rogue.open_ok(sid)
        setup = bytes(rogue.take())
    frames = []
    for _ in range(count):
        if kind == "rst":
            rogue.rst(sid, ErrorCode.CANCEL, "gone again")
        elif kind == "fin":
            rogue.fin(sid)
        elif kind == "open_ok":
            rogue.open_ok(sid)
        elif kind == "pong":
            rogue.pong(b"12345678")
        elif kind == "datagram":
            rogue.datagram(99, b"x" * 100)
        frames.append(empty_data(sid) if kind == "empty_data" else bytes(rogue.take()))
    return [setup + frames[0]] + frames[1:]


@pytest.mark.parametrize("kind", ["rst", "fin", "open_ok", "empty_data", "pong", "datagram"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("role", ROLES)
def test_idle_frame_flood(codec, role, mode, kind):
    """RST / FIN / OPEN_OK for a closed stream, empty DATA, PONGs nobody asked for, DATAGRAMs for no flow."""
    session = mux.Session(role, SMALL, floods=TIGHT, clock=Clock())
    frames = _idle_frames(codec, role, kind, session, TIGHT.idle_frame_burst + 5)
    seen, failed_at = feed_frames(session, frames, mode)
    assert failed_at == TIGHT.idle_frame_burst
    assert_calm_down(session, seen, "idle_frames")


@pytest.mark.parametrize("stream", ["tunnel", "closed stream"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("role", ROLES)
def test_window_flood(codec, role, mode, stream):
    session = mux.Session(role, SMALL, floods=TIGHT, clock=Clock())
    rogue = codec.FrameEncoder()
    sid = 0
    if stream == "closed stream":
        sid = session.open_stream({"app": "a"})
        session.reset_stream(sid, ErrorCode.CANCEL, "done")
    allowance = TIGHT.window_frames_base + TIGHT.window_frames_per_frame * session.frames_sent
    session.data_to_send()
    frames = []
    for _ in range(allowance + 5):
        rogue.window(sid, 1)
        frames.append(bytes(rogue.take()))
    seen, failed_at = feed_frames(session, frames, mode)
    assert failed_at == allowance
    assert_calm_down(session, seen, "window_frames")


def test_window_frames_are_earned_by_the_frames_we_send(codec):
    """A peer that credits us once per DATA frame we send is far inside the WINDOW limit."""
    session = mux.Session(mux.Role.RELAY, SMALL, floods=TIGHT, clock=Clock())
    rogue = codec.FrameEncoder()
    sid = session.open_stream({"app": "a"})
    rogue.open_ok(sid)
    session.receive_data(bytes(rogue.take()))
    assert events(session) == [mux.StreamAccepted(sid)]
    for _ in range(20 * TIGHT.window_frames_base):
        session.send_data(sid, b"x" * 1000)
        rogue.window(sid, 1000)
        rogue.window(0, 1000)
        session.receive_data(bytes(rogue.take()))
        assert events(session) == []
        session.data_to_send()
    assert not session.closed


# ---------------------------------------------------------------------------- legitimate traffic


def test_keepalive_for_hours_never_trips():
    clock = Clock()
    relay = mux.Session(mux.Role.RELAY, SMALL, clock=clock)
    connector = mux.Session(mux.Role.CONNECTOR, SMALL, clock=clock)
    pump(relay, connector)
    pongs = 0
    for _ in range(2000):  # about six hours of idle tunnel
        clock.now += Keepalive().interval + 0.5
        relay.tick()
        connector.tick()
        seen_relay, seen_connector = pump(relay, connector)
        pongs += sum(isinstance(e, mux.PongReceived) for e in seen_relay + seen_connector)
    assert not relay.closed and not connector.closed
    assert pongs >= 2000


def test_bulk_data_both_ways_with_window_updates_never_trips():
    relay, connector = mux.Session(mux.Role.RELAY, SMALL, clock=Clock()), mux.Session(mux.Role.CONNECTOR, SMALL, clock=Clock())
    pump(relay, connector)
    sid = open_accepted(relay, connector)
    size = 8 * 1024 * 1024
    up, down = bytearray(), bytearray()
    relay.send_data(sid, b"u" * size, end=True)
    connector.send_data(sid, b"d" * size, end=True)
    for _ in range(2000):
        seen_relay, seen_connector = pump(relay, connector)
        for session, seen, sink in ((relay, seen_relay, down), (connector, seen_connector, up)):
            got = collect(seen, sid)
            sink += got
            session.consumed(sid, len(got))
        if len(up) == len(down) == size:
            break
    assert len(up) == len(down) == size
    assert not relay.closed and not connector.closed
    assert relay.flood is None and connector.flood is None


def test_tens_of_thousands_of_streams_with_refusals_and_cancels_never_trip():
    """The benchmark's load at a frozen clock: 30k streams in bursts, 10% refused, 10% cancelled."""
    relay = mux.Session(mux.Role.RELAY, FlowControl(), clock=Clock())
    connector = mux.Session(mux.Role.CONNECTOR, FlowControl(), clock=Clock())
    pump(relay, connector)
    finished = 0
    for batch in range(30):
        ids = [relay.open_stream({"app": "a"}) for _ in range(1000)]
        cancelled = set(ids[:100])
        for sid in cancelled:  # the user went away before the target answered
            relay.reset_stream(sid, ErrorCode.CANCEL, "user left")
        _, seen = pump(relay, connector)
        opened = [e.stream_id for e in seen if isinstance(e, mux.StreamOpened)]
        for i, sid in enumerate(opened):
            if not connector.has_stream(sid):
                continue
            if i % 10 == 1:
                connector.reject_stream(sid, ErrorCode.UNKNOWN_APP, "config not pulled yet")
            else:
                connector.accept_stream(sid)
                connector.send_data(sid, b"hello", end=True)
        seen_relay, _ = pump(relay, connector)
        for event in seen_relay:
            if isinstance(event, mux.DataReceived) and event.end:
                relay.send_data(event.stream_id, b"bye", end=True)
                finished += 1
        pump(relay, connector)
    assert not relay.closed and not connector.closed
    assert relay.active_streams == 0 and connector.active_streams == 0
    assert finished >= 30 * 800


def test_a_burst_of_health_reports_never_trips():
    relay, connector = mux.Session(mux.Role.RELAY, SMALL, clock=Clock()), mux.Session(mux.Role.CONNECTOR, SMALL, clock=Clock())
    pump(relay, connector)
    relay.send_control({"type": "hello", "worker": 0, "workers": 1})
    for i in range(500):
        connector.send_control({"type": "health", "apps": {f"app{j}": bool((i + j) % 2) for j in range(100)}})
    relay.send_control({"type": "config_changed", "version": 2})
    seen_relay, seen_connector = pump(relay, connector)
    assert sum(isinstance(e, mux.ControlReceived) for e in seen_relay) == 500
    assert len(seen_connector) == 2
    assert not relay.closed and not connector.closed


# ---------------------------------------------------------------------------- reply backpressure


@pytest.mark.parametrize("role", ROLES)
def test_replies_behind_a_full_buffer_hold_the_input(codec, role):
    """A peer that sends PINGs and never reads: past the reply bound the session stops handing out events."""
    floods = FloodLimits(ping_burst=10**6, reply_bytes_while_blocked=1024)
    session = mux.Session(role, SMALL, floods=floods, clock=Clock())
    session.data_to_send()
    session.output_blocked(True)
    rogue = codec.FrameEncoder()
    count = 2000
    for i in range(count):
        rogue.ping(i.to_bytes(8, "big"))
    rogue.control(b'{"type": "after the pings"}')
    session.receive_data(bytes(rogue.take()))
    assert events(session) == []
    assert session.input_held and not session.closed
    pongs = sum(f.type == FrameType.PONG for f in frames_out(session))
    assert pongs * 20 <= floods.reply_bytes_while_blocked + 20  # the bound, one reply over at most
    # The buffer drained: the rest is handed out, and nothing was lost.
    session.output_blocked(False)
    assert not session.input_held
    assert events(session) == [mux.ControlReceived({"type": "after the pings"})]
    assert pongs + sum(f.type == FrameType.PONG for f in frames_out(session)) == count


def test_refused_opens_behind_a_full_buffer_hold_the_relay(codec):
    floods = FloodLimits(reply_bytes_while_blocked=1024)
    relay = mux.Session(mux.Role.RELAY, SMALL, floods=floods, clock=Clock())
    relay.output_blocked(True)
    rogue = codec.FrameEncoder()
    for sid in peer_ids(mux.Role.RELAY, 500):
        rogue.open(sid, b'{"app": "x"}')
    relay.receive_data(bytes(rogue.take()))
    refused = 0
    while (event := relay.next_event()) is not None:
        relay.reject_stream(event.stream_id, ErrorCode.PROTOCOL_ERROR, "the relay does not accept streams")
        refused += 1
    assert relay.input_held and refused < 50
    relay.output_blocked(False)
    while (event := relay.next_event()) is not None:
        relay.reject_stream(event.stream_id, ErrorCode.PROTOCOL_ERROR, "the relay does not accept streams")
        refused += 1
    assert refused == 500 and not relay.closed


def test_bulk_data_both_ways_behind_full_buffers_never_holds():
    """DATA and the WINDOWs it earns are not replies: two blocked ends keep reading each other."""
    relay, connector = mux.Session(mux.Role.RELAY, SMALL, clock=Clock()), mux.Session(mux.Role.CONNECTOR, SMALL, clock=Clock())
    pump(relay, connector)
    sid = open_accepted(relay, connector)
    relay.output_blocked(True)
    connector.output_blocked(True)
    size = 4 * 1024 * 1024
    relay.send_data(sid, b"u" * size, end=True)
    connector.send_data(sid, b"d" * size, end=True)
    got = {relay: 0, connector: 0}
    for _ in range(2000):
        seen_relay, seen_connector = pump(relay, connector)
        for session, seen in ((relay, seen_relay), (connector, seen_connector)):
            n = len(collect(seen, sid))
            got[session] += n
            session.consumed(sid, n)
        if got[relay] == got[connector] == size:
            break
    assert got[relay] == got[connector] == size
    assert not relay.input_held and not connector.input_held


def test_datagrams_of_open_flows_are_never_counted(codec):
    session = mux.Session(mux.Role.CONNECTOR, SMALL, floods=TIGHT, clock=Clock())
    rogue = codec.FrameEncoder()
    rogue.open(2, b'{"app": "dns", "proto": "udp"}')
    for _ in range(10 * TIGHT.idle_frame_burst):
        rogue.datagram(2, b"q" * 64)
    session.receive_data(bytes(rogue.take()))
    seen = events(session)
    assert sum(isinstance(e, mux.DatagramReceived) for e in seen) == 10 * TIGHT.idle_frame_burst
    assert not session.closed


def test_our_own_sender_never_sends_an_idle_frame():
    """Empty sends, queued or not, never go out as an empty DATA without END (a peer counts those)."""
    relay, connector = mux.Session(mux.Role.RELAY, SMALL, clock=Clock()), mux.Session(mux.Role.CONNECTOR, SMALL, clock=Clock())
    pump(relay, connector)
    sid = open_accepted(relay, connector)
    relay.send_data(sid, b"x" * (SMALL.stream_window + 1000))  # some of it waits for credit
    relay.send_data(sid, b"")
    relay.send_data(sid, b"", end=True)
    received = 0
    for _ in range(100):
        raw = bytes(relay.data_to_send())
        decoder = FrameDecoder()
        decoder.feed(raw)
        for frame in iter(decoder.next_frame, None):
            assert frame.type != FrameType.DATA or frame.payload or frame.flags, "an empty DATA without END"
        connector.receive_data(raw)
        for event in events(connector):
            if isinstance(event, mux.DataReceived):
                received += len(event.data)
                connector.consumed(sid, len(event.data))
        relay.receive_data(bytes(connector.data_to_send()))
        events(relay)
        if received == SMALL.stream_window + 1000:
            break
    assert received == SMALL.stream_window + 1000


def test_flood_limits_must_be_positive():
    with pytest.raises(ValueError, match="ping_rate"):
        FloodLimits(ping_rate=0)
