"""The tunnel multiplexer: many streams over one byte stream, as a sans-I/O state machine.

Theory of operation
-------------------
A ``Session`` is one end of one tunnel. It never touches a socket. Bytes that arrive
are handed to it (``receive_data``, or ``get_buffer``/``buffer_updated`` for a
BufferedProtocol); it decodes frames, enforces the protocol's rules and hands back
events from ``next_event()``. The application acts with methods (``open_stream``,
``send_data``, ``end_stream``, ...) and ``data_to_send()`` returns everything those
methods encoded, as one buffer for one ``transport.write``.

Flow control is the session's job, so no caller can get it wrong. Each stream has a
send window (credit granted by the peer) and so does the tunnel. ``send_data`` sends
what the windows allow and queues the rest inside the session; it returns False once
the stream's queue is above ``FlowControl.write_high``, which tells the caller to stop
reading its socket until a ``WriteResumed`` event. Received DATA is credited back to
the peer only when the application calls ``consumed()`` (it has handed the bytes on
without backpressure), so a reader that never reads holds the sender at the window
and nobody buffers more than that.

Stream ids: the relay opens streams with even ids, the connector (future) with odd
ids; ids only grow. A frame for an id that was opened and has since closed is
ignored (RST and DATA may cross); a frame for an id that was never opened is a
protocol error that ends the tunnel.

Any violation by the peer produces a ``TunnelFailed`` event, queues a GOAWAY with the
reason, and leaves the session closed: every later ``next_event()`` returns None.

Floods
------
A peer with a valid certificate can still try to exhaust this side with frames that
bring no work but cost a reply or a callback: the session asks its ``FloodGuard``
(``protocol/floods.py``, where the rules and their reasons are) on every frame of such a
kind, never on DATA. A flood ends the tunnel with GOAWAY ENHANCE_YOUR_CALM (``flood``
names the limit); replies piling up behind a full write buffer hold the input
(``input_held``: ``next_event()`` hands out nothing and the transport stops reading)
until the transport says the buffer drained (``output_blocked(False)``).
"""

from __future__ import annotations

import collections
import os
import time
from typing import Callable

import cython

import orjson

from backhaul.config import FloodLimits, FlowControl, Keepalive
from backhaul.protocol.constants import (
    CONNECTION_STREAM,
    INITIAL_STREAM_WINDOW,
    INITIAL_TUNNEL_WINDOW,
    MAX_STREAM_ID,
    MAX_WINDOW,
    ErrorCode,
    Role,
    Flag,
    FrameType,
)
from backhaul.protocol.errors import SessionError
from backhaul.protocol.events import (
    Event,
    StreamOpened,
    StreamAccepted,
    StreamRejected,
    DataReceived,
    StreamEnded,
    StreamReset,
    WriteResumed,
    PongReceived,
    GoAwayReceived,
    ControlReceived,
    DatagramReceived,
    TunnelFailed,
)
from backhaul.protocol.floods import ERROR_FRAME_SIZE, PONG_SIZE, UNWANTED_REFUSALS, FloodGuard
if cython.compiled:
    # The compiled session calls the compiled codec in C (its .pxd cimports it): always that one.
    from backhaul.protocol import _framing_c as _codec
else:
    from backhaul.protocol import framing as _codec
from backhaul.protocol.framing import (
    FrameError,
    parse_error_payload,
    parse_goaway,
    parse_window,
)


# Plain ints for the per-frame path (C ints once compiled): enum attribute access and IntFlag
# arithmetic are slow.
_END = cython.declare(cython.int, int(Flag.END))
_DATA = cython.declare(cython.int, int(FrameType.DATA))
_OPEN = cython.declare(cython.int, int(FrameType.OPEN))
_OPEN_OK = cython.declare(cython.int, int(FrameType.OPEN_OK))
_OPEN_FAIL = cython.declare(cython.int, int(FrameType.OPEN_FAIL))
_FIN = cython.declare(cython.int, int(FrameType.FIN))
_RST = cython.declare(cython.int, int(FrameType.RST))
_WINDOW = cython.declare(cython.int, int(FrameType.WINDOW))
_PING = cython.declare(cython.int, int(FrameType.PING))
_PONG = cython.declare(cython.int, int(FrameType.PONG))
_DATAGRAM = cython.declare(cython.int, int(FrameType.DATAGRAM))
_GOAWAY = cython.declare(cython.int, int(FrameType.GOAWAY))
_CONTROL = cython.declare(cython.int, int(FrameType.CONTROL))
_CONNECTION_STREAM = cython.declare(cython.int, CONNECTION_STREAM)


# ---------------------------------------------------------------------------- streams


class _Stream:
    """Per-stream bookkeeping; small on purpose (an idle stream must cost little)."""

    __slots__ = (
        "id",
        "accepted",  # OPEN_OK seen (opener) or sent (acceptor)
        "local_open",  # we may still send DATA
        "remote_open",  # the peer may still send DATA
        "send_window",  # credit the peer granted us
        "recv_window",  # credit we granted the peer and it has not used
        "unacked",  # bytes consumed by the application and not yet credited back
        "queue",  # deque of bytes waiting for credit, or None
        "queued",  # total bytes in queue
        "end_pending",  # FIN to send once the queue drains
        "paused",  # send_data returned False; WriteResumed owed
        "sink",  # who takes this stream's DATA as it is decoded (set_sink), or None: events
    )

    def __init__(self, stream_id: int, recv_window: int) -> None:
        self.id = stream_id
        self.accepted = False
        self.local_open = True
        self.remote_open = True
        self.send_window = INITIAL_STREAM_WINDOW
        self.recv_window = recv_window
        self.unacked = 0
        self.queue: collections.deque | None = None
        self.queued = 0
        self.end_pending = False
        self.paused = False
        self.sink = None


class Session:
    """One end of a multiplexed tunnel. See the module docstring."""

    def __init__(
        self,
        role: Role,
        flow: FlowControl = FlowControl(),
        keepalive: Keepalive = Keepalive(),
        clock: Callable[[], float] = time.monotonic,
        floods: FloodLimits = FloodLimits(),
    ) -> None:
        self.role = role
        self._flow = flow
        # The limits read per call, as plain ints (a dataclass attribute is a dict lookup).
        self._max_streams = flow.max_streams
        self._stream_window = flow.stream_window
        self._write_high = flow.write_high
        self._write_low = flow.write_low
        self._keepalive = keepalive
        self._clock = clock
        self._decoder = _codec.FrameDecoder()
        self._encoder = _codec.FrameEncoder(flow.max_frame_payload)
        self._streams: dict[int, _Stream] = {}
        self._events: collections.deque[Event] = collections.deque()
        self._next_local_id = 2 if role is Role.RELAY else 1
        self._last_local_id = 0
        self._last_peer_id = 0
        self._peer_parity = 1 if role is Role.RELAY else 0
        self._send_window = INITIAL_TUNNEL_WINDOW
        self._recv_window = flow.tunnel_window
        self._unacked = 0
        #: streams with queued data, in the order they became blocked (round-robin on credit)
        self._blocked: dict[int, None] = {}
        self._closed = False
        #: next_event() hands out nothing: closed, or input held (see ``input_held``)
        self._halt = False
        #: replies provoked while blocked went over their bound: the transport should stop reading
        self.input_held = False
        #: what the peer may make this side do for nothing (protocol/floods.py)
        self._guard = FloodGuard(floods, clock())
        self._local_goaway = False
        self._remote_goaway = False
        self._last_received = clock()
        self._ping_sent_at: float | None = None
        self._stream_update_at = max(1, int(flow.stream_window * flow.window_update_ratio))
        self._tunnel_update_at = max(1, int(flow.tunnel_window * flow.window_update_ratio))
        grow = flow.tunnel_window - INITIAL_TUNNEL_WINDOW
        if grow > 0:
            self._encoder.window(CONNECTION_STREAM, grow)

    # ------------------------------------------------------------------ introspection

    @property
    def closed(self) -> bool:
        """True once the tunnel failed or was closed; no more events come."""
        return self._closed

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def draining(self) -> bool:
        """True once either side sent GOAWAY: no new streams may be opened."""
        return self._local_goaway or self._remote_goaway

    def send_buffered(self, stream_id):
        """Bytes queued in the session for a stream, waiting for credit."""
        stream = self._streams.get(stream_id)
        return stream.queued if stream is not None else 0

    def has_stream(self, stream_id):
        return stream_id in self._streams

    def set_sink(self, stream_id, sink):
        """Hand this stream's DATA to ``sink.on_data(data, False)`` as it is decoded.

        The data path's shortcut: a DATA frame then costs no event object and no dispatch.
        Only DATA that carries bytes and no END takes it; everything else about the stream
        (its end, a reset, WriteResumed, ...) still comes from ``next_event()``, in order,
        since frames are decoded only while no event is waiting. The sink owes
        ``consumed()`` exactly as for a ``DataReceived``. A stream that is gone has no sink.
        """
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.sink = sink

    @property
    def frames_received(self) -> int:
        return self._decoder.frames

    @property
    def frames_sent(self) -> int:
        return self._encoder.frames

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        """Hand over bytes read from the tunnel; b"" means the byte stream ended."""
        if self._closed:
            return
        self._last_received = self._clock()
        if data:
            self._decoder.feed(data)
        else:
            self._connection_lost("the tunnel's byte stream ended")

    def get_buffer(self, sizehint):
        """For BufferedProtocol.get_buffer: read straight into the decoder's buffer."""
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        """For BufferedProtocol.buffer_updated."""
        self._last_received = self._clock()
        self._decoder.buffer_updated(nbytes)

    def connection_lost(self, reason: str = "the tunnel connection was lost") -> None:
        """The transport is gone: every stream is reset and a TunnelFailed event follows."""
        if not self._closed:
            self._connection_lost(reason)

    def next_event(self):
        """The next event, or None when more input is needed (or input is held: ``input_held``)."""
        events = self._events
        while not events:
            if self._halt:
                return None
            try:
                frame = self._decoder.next_frame()
            except FrameError as exc:
                self._fail(exc.code, str(exc.args[0]) if exc.args else "malformed frame")
                continue
            if frame is None:
                return None
            try:
                self._handle(frame)
            except FrameError as exc:
                self._fail(exc.code, str(exc.args[0]) if exc.args else "malformed frame")
        return events.popleft()

    def data_to_send(self):
        """Everything encoded since the last call, as one buffer; b"" when nothing."""
        return self._encoder.take()

    @property
    def pending_output(self) -> int:
        """Bytes encoded and not yet taken by data_to_send()."""
        return self._encoder.pending

    def output_blocked(self, blocked: bool) -> None:
        """The transport's write buffer went above its high mark (True) or below its low mark (False).

        While blocked, replies the peer provokes are counted; beyond
        ``FloodLimits.reply_bytes_while_blocked`` the session holds its input
        (``input_held``: next_event() returns None, the transport stops reading) until
        the buffer drains. After False the caller resumes reading and calls next_event()
        again: frames already buffered are handed out then.
        """
        self._guard.output_blocked(blocked)
        if not blocked and self.input_held:
            self.input_held = False
            self._halt = self._closed

    # ------------------------------------------------------------------ keepalive

    def tick(self) -> float:
        """Run keepalive; call periodically. Returns seconds until it wants to run again."""
        if self._closed:
            return self._keepalive.interval
        now = self._clock()
        idle = now - self._last_received
        if idle >= self._keepalive.timeout:
            self._fail(ErrorCode.PEER_DEAD, f"nothing received from the peer for {idle:.1f} s")
            return self._keepalive.interval
        if idle >= self._keepalive.interval and self._ping_sent_at is None:
            self.ping()
        return min(self._keepalive.interval, max(0.05, self._keepalive.timeout - idle))

    def ping(self) -> None:
        """Send a PING now; the answer comes as PongReceived."""
        self._ping_sent_at = self._clock()
        self._encoder.ping(os.urandom(8))

    # ------------------------------------------------------------------ output: tunnel

    def send_control(self, message: dict) -> None:
        """Send a CONTROL message (a JSON object with a ``type`` key)."""
        self._check_open()
        self._encoder.control(orjson.dumps(message))

    def send_datagram(self, flow_id: int, data: bytes) -> None:
        """Send one datagram of a UDP flow (not flow-controlled)."""
        self._check_open()
        self._encoder.datagram(flow_id, data)

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "draining") -> None:
        """Refuse new streams from now on; existing ones may finish."""
        if self._closed or self._local_goaway:
            return
        self._local_goaway = True
        self._encoder.goaway(self._last_peer_id, code, reason)

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "closing") -> None:
        """End the tunnel: GOAWAY, every stream reset locally, session closed."""
        if self._closed:
            return
        if not self._local_goaway:
            self._local_goaway = True
            self._encoder.goaway(self._last_peer_id, code, reason)
        self._terminate(code, reason)

    # ------------------------------------------------------------------ output: streams

    def open_stream(self, meta: dict) -> int:
        """Open a stream with the given OPEN metadata; returns its id."""
        self._check_open()
        if self.draining:
            raise SessionError("the tunnel is draining; open the stream on another tunnel")
        if len(self._streams) >= self._max_streams:
            raise SessionError(f"the tunnel already holds {len(self._streams)} streams (its limit)")
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise SessionError("stream ids of this tunnel are used up; open a new tunnel")
        self._next_local_id += 2
        self._last_local_id = stream_id
        self._streams[stream_id] = _Stream(stream_id, self._stream_window)
        self._encoder.open(stream_id, orjson.dumps(meta))
        self._grow_stream_window(stream_id)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Answer OPEN_OK: the target is connected."""
        stream = self._stream_for_app(stream_id)
        stream.accepted = True
        self._guard.accepted += 1
        self._encoder.open_ok(stream_id)
        stream.recv_window += self._grow_stream_window(stream_id)

    def reject_stream(self, stream_id: int, code: int, reason: str) -> None:
        """Answer OPEN_FAIL; the stream is gone.

        A refusal that cost no work (PROTOCOL_ERROR, REFUSED_STREAM, UNKNOWN_APP,
        TARGET_NOT_ALLOWED) counts against the peer's unwanted-stream budget.
        """
        self._stream_for_app(stream_id)
        self._encoder.open_fail(stream_id, code, reason)
        self._remove(stream_id)
        self._replied(ERROR_FRAME_SIZE + len(reason))
        if code in UNWANTED_REFUSALS and not self._is_local(stream_id):
            self._flood(self._guard.unwanted(self._last_received))

    def send_data(self, stream_id, data, end=False):
        """Send bytes on a stream; returns False when the caller should stop producing.

        What the windows do not allow yet is queued (copied) in the session and sent as
        credit arrives. After False, a WriteResumed event says when to go on.
        """
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            raise SessionError(f"stream {stream_id} is closed for sending")
        if self._closed:
            raise SessionError("the tunnel is closed")
        size = len(data)
        if stream.queued == 0:
            allowed = min(size, stream.send_window, self._send_window)
            if allowed == size:
                if size:
                    stream.send_window -= size
                    self._send_window -= size
                    self._encoder.data(stream_id, data, end)
                elif end:
                    self._encoder.data(stream_id, b"", True)
                if end:
                    self._local_end(stream)
                return True
            if allowed > 0:
                stream.send_window -= allowed
                self._send_window -= allowed
                self._encoder.data(stream_id, data[:allowed], False)
                data = data[allowed:]
                size -= allowed
        if size:
            if stream.queue is None:
                stream.queue = collections.deque()
            # A memoryview of our own copy, so the partial sends of _flush_stream slice it for free.
            # (Never an empty one: it holds nothing, and the peer counts empty DATA as idle frames.)
            stream.queue.append(memoryview(bytes(data)))
            stream.queued += size
        self._blocked[stream_id] = None
        if end:
            stream.end_pending = True
        if stream.queued > self._write_high:
            stream.paused = True
            return False
        return True

    def end_stream(self, stream_id):
        """Half-close: we send no more bytes (after what is queued)."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open or stream.end_pending:
            return
        if stream.queued:
            stream.end_pending = True
        else:
            self._encoder.fin(stream_id)
            self._local_end(stream)

    def reset_stream(self, stream_id, code, reason):
        """Abort a stream both ways; queued bytes are dropped."""
        if stream_id not in self._streams or self._closed:
            return
        self._encoder.rst(stream_id, code, reason)
        self._remove(stream_id)

    def consumed(self, stream_id, nbytes):
        """The application handed on ``nbytes`` of received DATA: credit them back."""
        if nbytes <= 0 or self._closed:
            return
        self._unacked += nbytes
        if self._unacked >= self._tunnel_update_at:
            self._encoder.window(CONNECTION_STREAM, self._unacked)
            self._recv_window += self._unacked
            self._unacked = 0
        stream = self._streams.get(stream_id)
        if stream is None or not stream.remote_open:
            return
        stream.unacked += nbytes
        if stream.unacked >= self._stream_update_at:
            self._encoder.window(stream_id, stream.unacked)
            stream.recv_window += stream.unacked
            stream.unacked = 0

    # ------------------------------------------------------------------ frame handling

    def _handle(self, frame):
        kind = frame.type
        stream_id = frame.stream_id
        if kind == _DATA:
            self._on_data(stream_id, frame.payload, frame.flags & _END)
        elif kind == _WINDOW:
            self._on_window(stream_id, parse_window(frame.payload))
        elif kind == _OPEN:
            self._on_open(stream_id, frame.payload)
        elif kind == _OPEN_OK:
            stream = self._known(stream_id, local=True)
            if stream is not None:
                if stream.accepted:
                    raise FrameError(f"second OPEN_OK for stream {stream_id}", ErrorCode.PROTOCOL_ERROR)
                stream.accepted = True
                self._events.append(StreamAccepted(stream_id))
        elif kind == _OPEN_FAIL:
            code, reason = parse_error_payload(frame.payload)
            stream = self._known(stream_id, local=True)
            if stream is not None:
                self._remove(stream_id)
                self._events.append(StreamRejected(stream_id, code, reason))
        elif kind == _FIN:
            stream = self._known(stream_id)
            if stream is not None:
                if stream.remote_open:
                    self._remote_end(stream)
                else:
                    self._stream_error(stream_id, ErrorCode.STREAM_CLOSED, f"second FIN on stream {stream_id}")
        elif kind == _RST:
            code, reason = parse_error_payload(frame.payload)
            stream = self._known(stream_id)
            if stream is not None:
                if not stream.accepted and not self._is_local(stream_id):
                    # Opened by the peer and reset before we accepted it: rapid reset.
                    if self._flood(self._guard.unwanted(self._last_received)):
                        return
                self._remove(stream_id)
                self._events.append(StreamReset(stream_id, code, reason))
        elif kind == _PING:
            if self._flood(self._guard.ping(self._last_received)):
                return
            self._encoder.pong(frame.payload)
            self._replied(PONG_SIZE)
        elif kind == _PONG:
            if self._ping_sent_at is not None:
                self._events.append(PongReceived(self._clock() - self._ping_sent_at))
                self._ping_sent_at = None
            else:
                self._idle_frame("PONG without a PING")
        elif kind == _DATAGRAM:
            if stream_id not in self._streams:
                # Dropped by the owner and counted; a few may cross a flow's RST, a flood brings nothing.
                if self._idle_frame("DATAGRAM for a flow that is not open"):
                    return
            self._events.append(DatagramReceived(stream_id, frame.payload))
        elif kind == _CONTROL:
            if self._flood(self._guard.control(self._last_received)):
                return
            message = self._decode_json(frame.payload, "CONTROL")
            if not isinstance(message.get("type"), str):
                raise FrameError("CONTROL message without a string 'type'", ErrorCode.PROTOCOL_ERROR)
            self._events.append(ControlReceived(message))
        elif kind == _GOAWAY:
            guard = self._guard
            guard.goaways_in += 1
            if guard.goaways_in > 2 and self._idle_frame("GOAWAY after GOAWAY"):  # a drain, then the close: more is noise
                return
            last_stream_id, code, reason = parse_goaway(frame.payload)
            self._on_goaway(last_stream_id, code, reason)

    def _on_data(self, stream_id, payload, end):
        size = len(payload)
        if size > self._recv_window:
            raise FrameError(f"DATA of {size} bytes on stream {stream_id} exceeds the tunnel window of {self._recv_window}", ErrorCode.FLOW_CONTROL_ERROR)
        self._recv_window -= size
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_seen(stream_id)
            # Crossed with our RST: drop it, but keep the tunnel's credit flowing. (Not an idle
            # frame when it carries bytes: a cancelled download may cross a window's worth, and
            # the bytes are bounded by the tunnel window; an empty one brings nothing.)
            if size:
                self.consumed(stream_id, size)
            else:
                self._idle_frame("empty DATA")
            return
        if not stream.remote_open:
            self.consumed(stream_id, size)
            self._stream_error(stream_id, ErrorCode.STREAM_CLOSED, f"DATA on stream {stream_id} after its FIN")
            return
        if not stream.accepted and self._is_local(stream_id):
            self.consumed(stream_id, size)
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, f"DATA on stream {stream_id} before OPEN_OK")
            return
        if size > stream.recv_window:
            raise FrameError(f"DATA of {size} bytes on stream {stream_id} exceeds its window of {stream.recv_window}", ErrorCode.FLOW_CONTROL_ERROR)
        stream.recv_window -= size
        sink = stream.sink
        if sink is not None and size and not end:
            sink.on_data(payload, False)
            return
        if size or end:
            self._events.append(DataReceived(stream_id, payload, bool(end)))
        else:
            self._idle_frame("empty DATA")
            return
        if end:
            self._remote_end(stream, notify=False)

    def _on_window(self, stream_id, increment):
        guard = self._guard
        guard.windows_in += 1
        if guard.windows_in > guard.window_allowance and self._flood(
            guard.window_flood(self._encoder.frames, (self._last_peer_id + 1) >> 1)
        ):
            return
        if stream_id == CONNECTION_STREAM:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise FrameError("the tunnel send window overflowed 2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
            if self._blocked:
                self._flush_blocked()
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_seen(stream_id)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, ErrorCode.FLOW_CONTROL_ERROR, f"the send window of stream {stream_id} overflowed")
            return
        if stream.queued:
            self._flush_stream(stream)

    def _on_open(self, stream_id, payload):
        if stream_id & 1 != self._peer_parity:
            raise FrameError(f"OPEN with stream id {stream_id} of the wrong parity", ErrorCode.PROTOCOL_ERROR)
        if stream_id <= self._last_peer_id:
            raise FrameError(f"OPEN with stream id {stream_id} not above the last one ({self._last_peer_id})", ErrorCode.PROTOCOL_ERROR)
        self._last_peer_id = stream_id
        if self._local_goaway:
            self._refuse_open(stream_id, ErrorCode.REFUSED_STREAM, "the connector is draining")
            return
        if len(self._streams) >= self._max_streams:
            self._refuse_open(
                stream_id, ErrorCode.REFUSED_STREAM, f"the tunnel holds {len(self._streams)} streams (its limit)"
            )
            return
        try:
            meta = self._decode_json(payload, "OPEN")
        except FrameError as exc:
            self._refuse_open(stream_id, ErrorCode.PROTOCOL_ERROR, str(exc.args[0]))
            return
        # The peer may send DATA right after OPEN: it lands within the initial window.
        stream = _Stream(stream_id, INITIAL_STREAM_WINDOW)
        self._streams[stream_id] = stream
        self._events.append(StreamOpened(stream_id, meta))

    def _on_goaway(self, last_stream_id, code, reason):
        self._remote_goaway = True
        self._events.append(GoAwayReceived(last_stream_id, code, reason))
        for stream_id in [s for s in self._streams if self._is_local(s) and s > last_stream_id]:
            self._remove(stream_id)
            self._events.append(StreamRejected(stream_id, ErrorCode.REFUSED_STREAM, f"peer is going away: {reason}"))

    # ------------------------------------------------------------------ flood limits

    @property
    def flood(self) -> str | None:
        """The name of the flood limit that ended the tunnel, or None."""
        return self._guard.flood

    @property
    def reply_bytes(self) -> int:
        """Bytes of replies (PONG, OPEN_FAIL, RST) the peer provoked so far."""
        return self._guard.reply_bytes

    def _refuse_open(self, stream_id, code, reason):
        self._encoder.open_fail(stream_id, code, reason)
        self._replied(ERROR_FRAME_SIZE + len(reason))
        self._flood(self._guard.unwanted(self._last_received))

    def _replied(self, nbytes):
        """A reply the peer provoked was encoded: hold input once too many pile up behind a full buffer."""
        if self._guard.replied(nbytes):
            self.input_held = True
            self._halt = True

    def _idle_frame(self, what):
        """A frame that brings no work; True when it ended the tunnel."""
        # Streams opened either way so far, from the highest ids (ids only grow, by 2).
        seen = (self._last_local_id + self._last_peer_id + 1) >> 1
        return self._flood(self._guard.idle_frame(self._last_received, seen, what))

    def _flood(self, reason):
        """A flood limit ran out (``reason``): GOAWAY ENHANCE_YOUR_CALM and the tunnel ends. True
        when the tunnel is closed (by this flood or before), so the frame is not handled further."""
        if reason is not None and not self._closed:
            self._fail(ErrorCode.ENHANCE_YOUR_CALM, reason)
        return self._closed

    # ------------------------------------------------------------------ helpers

    def _decode_json(self, payload, what):
        try:
            value = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise FrameError(f"{what} payload is not valid JSON: {exc}", ErrorCode.PROTOCOL_ERROR) from None
        if not isinstance(value, dict):
            raise FrameError(f"{what} payload is not a JSON object", ErrorCode.PROTOCOL_ERROR)
        return value

    def _is_local(self, stream_id):
        return stream_id & 1 != self._peer_parity

    def _check_seen(self, stream_id):
        """A frame for a stream we do not hold: fine if it existed once, fatal if never opened."""
        last = self._last_local_id if self._is_local(stream_id) else self._last_peer_id
        if stream_id > last:
            raise FrameError(f"frame for stream {stream_id}, which was never opened", ErrorCode.PROTOCOL_ERROR)

    def _known(self, stream_id, local=False):
        stream = self._streams.get(stream_id)
        if stream is None:
            self._check_seen(stream_id)
            self._idle_frame("a frame for a closed stream")
            return None
        if local and not self._is_local(stream_id):
            raise FrameError(f"OPEN_OK/OPEN_FAIL for stream {stream_id}, which the peer opened", ErrorCode.PROTOCOL_ERROR)
        return stream

    def _stream_for_app(self, stream_id):
        stream = self._streams.get(stream_id)
        if stream is None:
            raise SessionError(f"stream {stream_id} is not open")
        if self._closed:
            raise SessionError("the tunnel is closed")
        return stream

    def _check_open(self):
        if self._closed:
            raise SessionError("the tunnel is closed")

    def _grow_stream_window(self, stream_id):
        """Grant the peer the configured stream window beyond the initial one; returns the grant."""
        grow = self._stream_window - INITIAL_STREAM_WINDOW
        if grow > 0:
            self._encoder.window(stream_id, grow)
            return grow
        return 0

    def _flush_stream(self, stream):
        queue = stream.queue
        while queue and stream.send_window > 0 and self._send_window > 0:
            chunk = queue[0]
            allowed = min(len(chunk), stream.send_window, self._send_window)
            if allowed < len(chunk):
                self._encoder.data(stream.id, chunk[:allowed], False)
                queue[0] = chunk[allowed:]
            else:
                queue.popleft()
                self._encoder.data(stream.id, chunk, False)
            stream.send_window -= allowed
            self._send_window -= allowed
            stream.queued -= allowed
        if stream.queued == 0:
            self._blocked.pop(stream.id, None)
            stream.queue = None
            if stream.end_pending:
                stream.end_pending = False
                self._encoder.fin(stream.id)
                self._local_end(stream)
        if stream.paused and stream.queued <= self._write_low:
            stream.paused = False
            self._events.append(WriteResumed(stream.id))

    def _flush_blocked(self):
        for stream_id in list(self._blocked):
            if self._send_window <= 0:
                break
            stream = self._streams.get(stream_id)
            if stream is None:
                self._blocked.pop(stream_id, None)
            else:
                self._flush_stream(stream)

    def _local_end(self, stream):
        stream.local_open = False
        if not stream.remote_open:
            self._remove(stream.id)

    def _remote_end(self, stream, notify=True):
        stream.remote_open = False
        if notify:
            self._events.append(StreamEnded(stream.id))
        if not stream.local_open:
            self._remove(stream.id)

    def _remove(self, stream_id):
        self._streams.pop(stream_id, None)
        self._blocked.pop(stream_id, None)

    def _stream_error(self, stream_id, code, reason):
        """The peer broke a rule for one stream: reset it both ways, the tunnel lives on."""
        self._encoder.rst(stream_id, code, reason)
        self._replied(ERROR_FRAME_SIZE + len(reason))
        self._remove(stream_id)
        self._events.append(StreamReset(stream_id, code, reason))

    def _fail(self, code, reason):
        """The peer broke the protocol: tell it why, then end everything."""
        self._local_goaway = True
        self._encoder.goaway(self._last_peer_id, code, reason)
        self._terminate(code, reason)

    def _connection_lost(self, reason):
        try:
            self._decoder.eof()
        except FrameError as exc:
            reason = f"{reason} ({exc.args[0]})"
        self._terminate(ErrorCode.CONNECTION_RESET if self._streams else ErrorCode.NO_ERROR, reason)

    def _terminate(self, code, reason):
        self._closed = True
        self._halt = True
        for stream_id in list(self._streams):
            self._events.append(StreamReset(stream_id, code, reason))
        self._streams.clear()
        self._blocked.clear()
        self._events.append(TunnelFailed(code, reason))
