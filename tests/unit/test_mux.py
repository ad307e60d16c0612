"""The multiplexer as a state machine: two sessions wired back to back, no sockets."""

from __future__ import annotations

import pytest

from backhaul.config import FlowControl, Keepalive
from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode, FrameType
from backhaul.protocol.framing import FrameDecoder, FrameEncoder, parse_error_payload, parse_goaway
from .fakes import Clock

SMALL = FlowControl(
    stream_window=256 * 1024,
    tunnel_window=1024 * 1024,
    max_frame_payload=16 * 1024,
    max_streams=8,
    write_high=64 * 1024,
    write_low=16 * 1024,
)


def events(session: mux.Session) -> list[mux.Event]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def pump(a: mux.Session, b: mux.Session, byte_at_a_time: bool = False) -> tuple[list, list]:
    """Move bytes both ways until neither side has anything to send; return the events each saw."""
    seen_a, seen_b = [], []
    for _ in range(1000):
        moved = False
        for src, dst, seen in ((a, b, seen_b), (b, a, seen_a)):
            data = bytes(src.data_to_send())
            if data:
                moved = True
                if byte_at_a_time:
                    for i in range(len(data)):
                        dst.receive_data(data[i : i + 1])
                else:
                    dst.receive_data(data)
                seen.extend(events(dst))
        if not moved:
            return seen_a, seen_b
    raise AssertionError("sessions kept talking")


def pair(flow: FlowControl = SMALL, clock=None) -> tuple[mux.Session, mux.Session]:
    kwargs = {"clock": clock} if clock else {}
    relay = mux.Session(mux.Role.RELAY, flow, **kwargs)
    connector = mux.Session(mux.Role.CONNECTOR, flow, **kwargs)
    pump(relay, connector)
    return relay, connector


def open_accepted(relay: mux.Session, connector: mux.Session, meta=None) -> int:
    sid = relay.open_stream(meta or {"app": "a", "target": "127.0.0.1:1"})
    _, seen = pump(relay, connector)
    assert seen == [mux.StreamOpened(sid, meta or {"app": "a", "target": "127.0.0.1:1"})]
    connector.accept_stream(sid)
    seen_relay, _ = pump(relay, connector)
    assert seen_relay == [mux.StreamAccepted(sid)]
    return sid


def collect(seen: list, sid: int) -> bytes:
    return b"".join(e.data for e in seen if isinstance(e, mux.DataReceived) and e.stream_id == sid)


@pytest.mark.parametrize("byte_at_a_time", [False, True])
def test_stream_lifecycle_both_ways_with_half_close(byte_at_a_time):
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    assert sid == 2 and relay.active_streams == 1
    relay.send_data(sid, b"request")
    relay.end_stream(sid)
    _, seen = pump(relay, connector, byte_at_a_time)
    assert collect(seen, sid) == b"request"
    assert mux.StreamEnded(sid) in seen
    # Half-closed: the connector still answers after the relay's FIN.
    connector.send_data(sid, b"reply", end=True)
    seen, _ = pump(relay, connector, byte_at_a_time)
    assert collect(seen, sid) == b"reply"
    assert [e for e in seen if isinstance(e, mux.DataReceived)][-1].end
    assert relay.active_streams == 0 and connector.active_streams == 0


def test_stream_ids_are_even_and_grow():
    relay, connector = pair()
    ids = [relay.open_stream({"app": "a"}) for _ in range(3)]
    assert ids == [2, 4, 6]


def test_send_beyond_window_is_queued_and_flows_as_credit_returns():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    payload = bytes(range(256)) * 4096  # 1 MiB, four times the stream window
    keep_going = relay.send_data(sid, payload)
    assert keep_going is False
    assert relay.send_buffered(sid) == len(payload) - SMALL.stream_window
    received = bytearray()
    resumed = False
    for _ in range(100):
        seen_relay, seen = pump(relay, connector)
        resumed = resumed or mux.WriteResumed(sid) in seen_relay
        for event in seen:
            if isinstance(event, mux.DataReceived):
                received += event.data
                connector.consumed(sid, len(event.data))
        if len(received) == len(payload):
            break
    assert bytes(received) == payload
    assert resumed
    assert relay.send_buffered(sid) == 0


def test_reader_that_never_reads_holds_sender_at_the_window():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    chunk = b"x" * 32 * 1024
    delivered = 0
    for _ in range(64):
        if not relay.send_data(sid, chunk):
            break
        _, seen = pump(relay, connector)
        delivered += len(collect(seen, sid))
    _, seen = pump(relay, connector)
    delivered += len(collect(seen, sid))
    # Nothing consumed: the receiver got exactly one window, the sender queued at most write_high + a chunk.
    assert delivered == SMALL.stream_window
    assert relay.send_buffered(sid) <= SMALL.write_high + len(chunk)


def test_tunnel_window_is_shared_by_streams():
    flow = FlowControl(stream_window=1024 * 1024, tunnel_window=1024 * 1024, max_frame_payload=16 * 1024)
    relay, connector = pair(flow)
    a = open_accepted(relay, connector)
    b = open_accepted(relay, connector)
    relay.send_data(a, b"a" * 800 * 1024)
    relay.send_data(b, b"b" * 800 * 1024)
    _, seen = pump(relay, connector)
    assert len(collect(seen, a)) + len(collect(seen, b)) == 1024 * 1024
    for sid in (a, b):
        connector.consumed(sid, len(collect(seen, sid)))
    _, seen = pump(relay, connector)
    assert relay.send_buffered(a) == relay.send_buffered(b) == 0


def test_data_beyond_the_granted_window_is_a_flow_control_error():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    rogue = FrameEncoder(256 * 1024)
    for _ in range(3):  # 3 x 128 KiB > the 256 KiB initial stream window on the relay side
        rogue.data(sid, b"z" * 128 * 1024)
    relay_events = []
    relay.receive_data(bytes(rogue.take()))
    relay_events = events(relay)
    failure = relay_events[-1]
    assert isinstance(failure, mux.TunnelFailed) and failure.code == ErrorCode.FLOW_CONTROL_ERROR
    assert relay.closed
    decoder = FrameDecoder()
    decoder.feed(relay.data_to_send())
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    assert frames[-1].type == FrameType.GOAWAY
    assert parse_goaway(frames[-1].payload)[1] == ErrorCode.FLOW_CONTROL_ERROR


@pytest.mark.parametrize(
    "build, code",
    [
        (lambda e: e.open(3, b'{"app": "a"}'), ErrorCode.PROTOCOL_ERROR),  # connector-parity id from the relay
        (lambda e: e.data(40, b"x"), ErrorCode.PROTOCOL_ERROR),  # a stream never opened
        (lambda e: e.fin(40), ErrorCode.PROTOCOL_ERROR),
        (lambda e: (e.open(4, b"{}"), e.open(2, b"{}")), ErrorCode.PROTOCOL_ERROR),  # ids must grow
        (lambda e: e.open_ok(2), ErrorCode.PROTOCOL_ERROR),  # OPEN_OK for a stream nobody opened
        (lambda e: e.control(b"[1, 2]"), ErrorCode.PROTOCOL_ERROR),  # CONTROL must be an object
        (lambda e: e.control(b"{nope"), ErrorCode.PROTOCOL_ERROR),
    ],
)
def test_protocol_violations_end_the_tunnel(build, code):
    connector = mux.Session(mux.Role.CONNECTOR, SMALL)
    rogue = FrameEncoder()
    build(rogue)
    connector.receive_data(bytes(rogue.take()))
    seen = events(connector)
    assert isinstance(seen[-1], mux.TunnelFailed) and seen[-1].code == code
    assert connector.next_event() is None


def test_frames_for_a_closed_stream_are_ignored():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    relay.send_data(sid, b"in flight")
    connector.reset_stream(sid, ErrorCode.CANCEL, "user left")
    seen_relay, seen_conn = pump(relay, connector)
    assert seen_relay == [mux.StreamReset(sid, ErrorCode.CANCEL, "user left")]
    assert seen_conn == []  # the crossing DATA was dropped, not an error
    assert not relay.closed and not connector.closed


def test_bad_open_metadata_refuses_only_that_stream():
    connector = mux.Session(mux.Role.CONNECTOR, SMALL)
    rogue = FrameEncoder()
    rogue.open(2, b"not json")
    connector.receive_data(bytes(rogue.take()))
    assert events(connector) == []
    decoder = FrameDecoder()
    decoder.feed(connector.data_to_send())
    kinds = []
    while (frame := decoder.next_frame()) is not None:
        kinds.append(frame.type)
    assert FrameType.OPEN_FAIL in kinds and not connector.closed


def test_stream_limit_refuses_with_refused_stream():
    relay, connector = pair(FlowControl(max_streams=2))
    ids = [relay.open_stream({"app": "a"}) for _ in range(2)]
    with pytest.raises(mux.SessionError):
        relay.open_stream({"app": "a"})
    # A peer that ignores the limit gets REFUSED_STREAM, not a bigger table.
    rogue = FrameEncoder()
    rogue.open(2, b"{}")
    rogue.open(4, b"{}")
    rogue.open(6, b"{}")
    connector = mux.Session(mux.Role.CONNECTOR, FlowControl(max_streams=2))
    connector.receive_data(bytes(rogue.take()))
    assert [type(e) for e in events(connector)] == [mux.StreamOpened, mux.StreamOpened]
    assert connector.active_streams == 2
    decoder = FrameDecoder()
    decoder.feed(connector.data_to_send())
    refused = [f for f in iter(decoder.next_frame, None) if f.type == FrameType.OPEN_FAIL]
    assert [f.stream_id for f in refused] == [6]
    assert parse_error_payload(refused[0].payload)[0] == ErrorCode.REFUSED_STREAM
    assert ids == [2, 4]


def test_goaway_refuses_streams_above_last_and_blocks_new_opens():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    late = relay.open_stream({"app": "a"})  # not yet seen by the connector
    connector.goaway(ErrorCode.NO_ERROR, "draining")
    relay.receive_data(bytes(connector.data_to_send()))
    seen = events(relay)
    assert isinstance(seen[0], mux.GoAwayReceived) and seen[0].last_stream_id == sid
    assert mux.StreamRejected(late, ErrorCode.REFUSED_STREAM, "peer is going away: draining") in seen
    with pytest.raises(mux.SessionError):
        relay.open_stream({"app": "a"})
    # The stream opened before the GOAWAY still works.
    relay.send_data(sid, b"still here")
    _, seen = pump(relay, connector)
    assert collect(seen, sid) == b"still here"


def test_keepalive_ping_pong_and_dead_peer():
    clock = Clock()
    relay, connector = pair(clock=clock)
    clock.now += Keepalive().interval + 1
    relay.tick()
    seen_relay, _ = pump(relay, connector)
    assert len(seen_relay) == 1 and isinstance(seen_relay[0], mux.PongReceived)
    clock.now += Keepalive().timeout + 1
    relay.tick()
    seen = events(relay)
    assert isinstance(seen[-1], mux.TunnelFailed) and seen[-1].code == ErrorCode.PEER_DEAD


def test_connection_lost_resets_every_stream():
    relay, connector = pair()
    a = open_accepted(relay, connector)
    b = open_accepted(relay, connector)
    relay.connection_lost("socket closed")
    seen = events(relay)
    assert {e.stream_id for e in seen if isinstance(e, mux.StreamReset)} == {a, b}
    assert isinstance(seen[-1], mux.TunnelFailed)
    with pytest.raises(mux.SessionError):
        relay.send_data(a, b"x")


def test_control_messages_round_trip():
    relay, connector = pair()
    relay.send_control({"type": "hello", "worker": 1, "workers": 2})
    _, seen = pump(relay, connector)
    assert seen == [mux.ControlReceived({"type": "hello", "worker": 1, "workers": 2})]


def test_idle_stream_is_small():
    import sys

    relay, connector = pair(FlowControl())
    sid = relay.open_stream({"app": "a"})
    stream = relay._streams[sid]
    assert stream.queue is None
    assert sys.getsizeof(stream) < 256


def test_data_after_fin_is_a_stream_error_and_the_tunnel_lives():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    connector.end_stream(sid)
    pump(relay, connector)
    rogue = FrameEncoder()
    rogue.data(sid, b"late")
    relay.receive_data(bytes(rogue.take()))
    assert events(relay) == [mux.StreamReset(sid, ErrorCode.STREAM_CLOSED, f"DATA on stream {sid} after its FIN")]
    assert not relay.closed and relay.active_streams == 0


def test_stream_window_overflow_resets_only_that_stream():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    other = open_accepted(relay, connector)
    rogue = FrameEncoder()
    rogue.window(sid, 2**31 - 1)
    relay.receive_data(bytes(rogue.take()))
    seen = events(relay)
    assert len(seen) == 1 and seen[0].code == ErrorCode.FLOW_CONTROL_ERROR and seen[0].stream_id == sid
    assert not relay.closed and relay.has_stream(other)


def test_data_before_open_ok_from_the_acceptor_resets_only_that_stream():
    relay, connector = pair()
    sid = relay.open_stream({"app": "a"})
    pump(relay, connector)
    rogue = FrameEncoder()
    rogue.data(sid, b"too early")
    relay.receive_data(bytes(rogue.take()))
    seen = events(relay)
    assert [(type(e), e.code) for e in seen] == [(mux.StreamReset, ErrorCode.PROTOCOL_ERROR)]
    assert not relay.closed


def test_control_without_a_type_ends_the_tunnel():
    relay, connector = pair()
    rogue = FrameEncoder()
    rogue.control(b'{"kind": "hello"}')
    relay.receive_data(bytes(rogue.take()))
    seen = events(relay)
    assert isinstance(seen[-1], mux.TunnelFailed) and seen[-1].code == ErrorCode.PROTOCOL_ERROR
