"""A pipe: one TCP socket relayed over one tunnel stream, both ways, with half-close.

Sockets are read into one preallocated buffer shared by every pipe of the process
(BufferedProtocol): each read is copied into the session's outgoing frame batch before
``buffer_updated`` returns, so no pipe needs a buffer of its own and an idle stream
costs a few hundred bytes, not a read buffer. Backpressure runs both ways:
the socket stops being read while the stream's credit is used up, and bytes from the
tunnel are credited back only while the socket's write buffer is below its high mark,
so a user who never reads holds the far sender at the stream window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from backhaul.config import FlowControl
from backhaul.protocol.constants import ErrorCode, error_name
from backhaul.protocol.mux import SessionError
from backhaul.transport.sockets import set_nodelay
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.stream")


class _PipeCore:
    """Everything of a ``Pipe`` (below): a cdef class once compiled, with C fields
    (ext/backhaul/transport/_pipe_c.pxd); ``Pipe`` adds asyncio's Protocol base in Python."""

    __slots__ = (
        "flow",
        "labels",
        "on_done",
        "tunnel",
        "stream_id",
        "transport",
        "bytes_up",
        "bytes_down",
        "started",
        "result",
        "code",
        "started_stream",
        "_buffer",
        "_owed",
        "_write_paused",
        "_socket_eof",
        "_stream_eof",
        "_held",
    )

    def __init__(
        self, flow: FlowControl, labels: dict, buffer: memoryview, on_done: Callable[["Pipe"], None] | None = None
    ) -> None:
        self.flow = flow
        #: what the stream is, for its log line: app, client, target, request id
        self.labels = labels
        self.on_done = on_done
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.transport: asyncio.Transport | None = None
        self.bytes_up = 0  # socket -> tunnel
        self.bytes_down = 0  # tunnel -> socket
        self.started = time.monotonic()
        self.result: str | None = None
        #: how the stream ended, as a wire ErrorCode (NO_ERROR: completed)
        self.code = ErrorCode.NO_ERROR
        self._buffer = buffer  # shared by every pipe of the process; only valid inside buffer_updated
        self._owed = 0  # bytes from the tunnel written while the socket was paused; credited on resume
        self._write_paused = False  # the socket's write buffer is above its high mark
        self._socket_eof = False  # the socket sent EOF (FIN sent once the stream is started)
        self._stream_eof = False  # the peer ended the stream and we shut our write side
        #: bytes read before the stream was accepted; not committed anywhere yet (at most one read,
        #: since reading pauses on the first one: uvloop starts reading right after connection_made)
        self._held: bytearray | None = None
        self.started_stream = False

    # ------------------------------------------------------------------ socket side

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        transport.set_write_buffer_limits(self.flow.write_high, self.flow.write_low)

    def get_buffer(self, sizehint):
        return self._buffer

    def buffer_updated(self, nbytes):
        if self.result is not None:
            return
        self.bytes_up += nbytes
        if not self.started_stream:
            if self._held is None:
                self._held = bytearray()
            self._held += self._buffer[:nbytes]
            self.transport.pause_reading()
            return
        try:
            keep_reading = self.tunnel.send(self.stream_id, self._buffer[:nbytes])
        except SessionError as exc:
            self.finish(f"stream gone: {exc}", abort=True, code=ErrorCode.INTERNAL_ERROR)
            return
        if not keep_reading:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._socket_eof = True
        if self.result is None and self.started_stream:
            self.tunnel.end(self.stream_id)
            self._maybe_done()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.result is None:
            reason = f"socket error: {exc}" if exc else "socket closed before the stream ended"
            code = ErrorCode.CONNECTION_RESET if exc else ErrorCode.CANCEL
            if self.tunnel is not None and self.stream_id:
                self.tunnel.reset(self.stream_id, code, reason)
            self.finish(reason, code=code)

    def pause_writing(self):
        self._write_paused = True

    def resume_writing(self):
        self._write_paused = False
        if self._owed and self.result is None:
            self.tunnel.consumed(self.stream_id, self._owed)
        self._owed = 0

    # ------------------------------------------------------------------ tunnel side

    def start(self) -> None:
        """The stream is accepted: send what was held, then relay freely."""
        self.started_stream = True
        held, self._held = self._held, None
        keep_reading = True
        if held:
            keep_reading = self.tunnel.send(self.stream_id, held)
        if self._socket_eof:
            self.tunnel.end(self.stream_id)
            self._maybe_done()
        elif keep_reading:
            self.transport.resume_reading()

    def on_accepted(self) -> None:
        self.start()

    def on_rejected(self, code: int, reason: str) -> None:
        self.finish(f"open refused: {error_name(code)}: {reason}", abort=True, code=code)

    def on_data(self, data, end):
        size = len(data)
        if size:
            self.bytes_down += size
            self.transport.write(data)
            if self._write_paused:
                self._owed += size
            else:
                self.tunnel.consumed(self.stream_id, size)
        if end:
            self.on_end()

    def on_end(self) -> None:
        self._stream_eof = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_done()

    def on_reset(self, code: int, reason: str) -> None:
        self.finish(f"stream reset: {error_name(code)}: {reason}", abort=True, code=code)

    def on_write_resumed(self) -> None:
        if self.result is None and not self._socket_eof:
            self.transport.resume_reading()

    # ------------------------------------------------------------------ end

    def _maybe_done(self) -> None:
        if self._socket_eof and self._stream_eof:
            self.finish("completed")
            self.transport.close()

    def finish(self, result: str, abort: bool = False, code: int = ErrorCode.NO_ERROR) -> None:
        """Record how the stream ended (once: ``result`` in words, ``code`` for metrics), log it,
        and close the socket if asked."""
        if self.result is not None:
            return
        self.result = result
        self.code = code
        if abort and self.transport is not None:
            self.transport.abort()
        log.info(
            "stream ended",
            extra={
                **self.labels,
                "stream": self.stream_id,
                "tunnel": self.tunnel.name if self.tunnel else None,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "seconds": round(time.monotonic() - self.started, 4),
                "result": result,
            },
        )
        if self.on_done is not None:
            self.on_done(self)


class Pipe(_PipeCore, asyncio.BufferedProtocol):
    """Relays between ``transport`` (a TCP socket) and ``stream_id`` on ``tunnel``.

    ``buffer`` is the process's shared read buffer (see the module docstring).
    """

    __slots__ = ()
