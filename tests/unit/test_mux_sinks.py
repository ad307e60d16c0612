"""Session.set_sink: DATA of an accepted stream goes straight to its endpoint, in order with
every event of the stream, and the sink owes credit exactly as for a DataReceived."""

from __future__ import annotations

from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode
from .test_mux import SMALL, events, open_accepted, pair, pump


class Sink:
    """An endpoint that records what it was handed, and credits it back when asked to."""

    def __init__(self, session: mux.Session | None = None, stream_id: int = 0) -> None:
        self.got: list = []
        self.session = session
        self.stream_id = stream_id

    def on_data(self, data, end):
        self.got.append((bytes(data), end))
        if self.session is not None:
            self.session.consumed(self.stream_id, len(data))


def test_data_goes_to_the_sink_and_no_event_is_made():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    sink = Sink()
    relay.set_sink(sid, sink)
    connector.send_data(sid, b"one")
    connector.send_data(sid, b"two")
    seen, _ = pump(relay, connector)
    assert sink.got == [(b"one", False), (b"two", False)]
    assert seen == []


def test_data_with_end_and_data_of_a_stream_without_sink_are_events():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    plain = open_accepted(relay, connector)
    sink = Sink()
    relay.set_sink(sid, sink)
    connector.send_data(sid, b"last", end=True)  # DATA with END: an event, not the shortcut
    connector.send_data(plain, b"x")
    seen, _ = pump(relay, connector)
    assert sink.got == []
    assert seen == [mux.DataReceived(sid, b"last", True), mux.DataReceived(plain, b"x", False)]


def test_fin_after_sink_data_arrives_after_it_even_byte_by_byte():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    order: list = []

    class Recorder:
        def on_data(self, data, end):
            order.append(("data", bytes(data)))

    relay.set_sink(sid, Recorder())
    connector.send_data(sid, b"abc")
    connector.end_stream(sid)
    data = bytes(connector.data_to_send())
    for i in range(len(data)):
        relay.receive_data(data[i : i + 1])
        for event in events(relay):
            order.append(("event", type(event).__name__))
    assert order == [("data", b"abc"), ("event", "StreamEnded")]


def test_credit_from_a_sink_reopens_the_window():
    relay, connector = pair(SMALL)
    sid = open_accepted(relay, connector)
    sink = Sink(relay, sid)
    relay.set_sink(sid, sink)
    payload = b"z" * (1024 * 1024)  # four stream windows: only credit from the sink lets it through
    assert connector.send_data(sid, payload) is False
    for _ in range(200):
        pump(relay, connector)
        if sum(len(d) for d, _ in sink.got) == len(payload):
            break
    assert b"".join(d for d, _ in sink.got) == payload


def test_a_sink_that_never_credits_holds_the_sender_at_the_window():
    relay, connector = pair(SMALL)
    sid = open_accepted(relay, connector)
    sink = Sink()  # takes bytes, never calls consumed()
    relay.set_sink(sid, sink)
    connector.send_data(sid, b"q" * (4 * SMALL.stream_window))
    for _ in range(10):
        pump(relay, connector)
    assert sum(len(d) for d, _ in sink.got) == SMALL.stream_window
    assert connector.send_buffered(sid) == 3 * SMALL.stream_window


def test_a_reset_stream_has_no_sink_and_late_data_is_dropped():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    sink = Sink()
    relay.set_sink(sid, sink)
    connector.send_data(sid, b"crossing")  # in flight when the relay resets
    relay.reset_stream(sid, ErrorCode.CANCEL, "user left")
    pump(relay, connector)
    assert sink.got == []
    relay.set_sink(sid, sink)  # a stream that is gone takes no sink: nothing raised, nothing kept
    assert not relay.has_stream(sid)


def test_a_sink_may_reset_its_stream_while_it_is_handed_bytes():
    relay, connector = pair()
    sid = open_accepted(relay, connector)
    other = open_accepted(relay, connector)

    class Quitter:
        got = 0

        def on_data(self, data, end):
            Quitter.got += 1
            relay.reset_stream(sid, ErrorCode.CANCEL, "enough")

    relay.set_sink(sid, Quitter())
    connector.send_data(sid, b"a")
    connector.send_data(sid, b"b")  # arrives after the reset: dropped, credit kept flowing
    connector.send_data(other, b"still here")
    seen, _ = pump(relay, connector)
    assert Quitter.got == 1
    assert mux.DataReceived(other, b"still here", False) in seen
    assert not relay.closed
