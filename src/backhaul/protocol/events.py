"""The events a tunnel session (``mux.Session``) hands out from ``next_event()``.

Each is a small slotted object; the transport dispatches on its type. ``mux`` re-exports
them, so callers name them ``mux.DataReceived`` and so on.
"""

from __future__ import annotations


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)


class StreamOpened(Event):
    """The peer opened a stream; answer with ``accept_stream`` or ``reject_stream``."""

    __slots__ = ("stream_id", "meta")

    def __init__(self, stream_id: int, meta: dict) -> None:
        self.stream_id = stream_id
        self.meta = meta


class StreamAccepted(Event):
    """The peer accepted a stream we opened (its target is connected)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamRejected(Event):
    """A stream we opened was refused; nothing of it reached the target."""

    __slots__ = ("stream_id", "code", "reason")

    def __init__(self, stream_id: int, code: int, reason: str) -> None:
        self.stream_id = stream_id
        self.code = code
        self.reason = reason


class DataReceived(Event):
    """Bytes for a stream. Call ``consumed(stream_id, len(data))`` once they are handed on."""

    __slots__ = ("stream_id", "data", "end")

    def __init__(self, stream_id: int, data: bytes, end: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.end = end


class StreamEnded(Event):
    """The peer will send no more bytes on the stream (half-close)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset(Event):
    """The peer aborted the stream, or the session did because the tunnel failed."""

    __slots__ = ("stream_id", "code", "reason")

    def __init__(self, stream_id: int, code: int, reason: str) -> None:
        self.stream_id = stream_id
        self.code = code
        self.reason = reason


class WriteResumed(Event):
    """The stream's send queue fell below the low mark: the caller may read its socket again."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class PongReceived(Event):
    """Our PING was answered after ``rtt`` seconds."""

    __slots__ = ("rtt",)

    def __init__(self, rtt: float) -> None:
        self.rtt = rtt


class GoAwayReceived(Event):
    """The peer drains: it accepts no new streams; ours above ``last_stream_id`` were refused."""

    __slots__ = ("last_stream_id", "code", "reason")

    def __init__(self, last_stream_id: int, code: int, reason: str) -> None:
        self.last_stream_id = last_stream_id
        self.code = code
        self.reason = reason


class ControlReceived(Event):
    """A CONTROL message (a JSON object with a ``type`` key)."""

    __slots__ = ("message",)

    def __init__(self, message: dict) -> None:
        self.message = message


class DatagramReceived(Event):
    """One UDP datagram of a flow."""

    __slots__ = ("flow_id", "data")

    def __init__(self, flow_id: int, data: bytes) -> None:
        self.flow_id = flow_id
        self.data = data


class TunnelFailed(Event):
    """The tunnel is over: a protocol violation, a dead peer, or the byte stream ended."""

    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
