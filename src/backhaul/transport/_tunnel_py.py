"""The tunnel transport: binds one mux ``Session`` to one TLS connection.

It only moves buffers: bytes from the socket go into the session's decoder buffer
(``get_buffer``/``buffer_updated``), session events are handed to the stream pipes
and to the owner (relay or connector), and everything the session encoded during
one loop iteration goes out in a single ``transport.write``.

The session decides about floods; the tunnel only carries out its decisions. It tells
the session when the TLS write buffer goes above ``FlowControl.tunnel_write_high`` and
below ``tunnel_write_low``; when the session holds its input (a peer provoked too many
replies while that buffer was full, see protocol/mux.py "Floods") the tunnel stops
reading the connection, and reads again once the buffer drained. A tunnel the session
ends for a flood (ENHANCE_YOUR_CALM) is logged at warning level with the limit, and every
closing tunnel is aborted if its last bytes have not left after
``FlowControl.tunnel_close_timeout`` (``flood_close_timeout`` after a flood, with reading
stopped at once): a peer that never reads cannot keep it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from backhaul.config import FlowControl
from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode, error_name
from backhaul.transport.endpoints import StreamEndpoint, TunnelOwner
from backhaul.transport.sockets import set_nodelay

log = logging.getLogger("backhaul.tunnel")


class _TunnelCore:
    """Everything of a ``Tunnel`` (below): a cdef class once compiled, whose fields are C fields
    (ext/backhaul/transport/_tunnel_c.pxd). A cdef class cannot derive from asyncio's Protocol
    classes, so ``Tunnel`` adds that base in Python."""

    def __init__(
        self, session: mux.Session, owner: TunnelOwner, name: str = "tunnel", flow: FlowControl = FlowControl()
    ) -> None:
        self.session = session
        self.owner = owner
        self.name = name
        self.endpoints: dict[int, StreamEndpoint] = {}
        #: DATA that arrived for a stream the owner has not accepted yet (its target is still
        #: connecting); bounded by the stream's initial window, since no credit is returned for it
        self._early: dict[int, list] = {}
        self._flow = flow
        #: encoded bytes that are written at once rather than at the end of the loop turn
        self._flush_at = flow.tunnel_write_low
        #: the TLS transport's write buffer is above its high mark
        self.write_paused = False
        #: endpoints that stopped reading their socket because of that; resumed together
        self._stalled: set[StreamEndpoint] = set()
        #: streams whose end waits in the session's queue for credit: the session closes them
        #: without an event, so they are looked at after each batch of input
        self._ending: set[int] = set()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.opened_at = time.monotonic()
        self.rtt: float | None = None
        self.closed = False
        #: the connection itself is gone (connection_lost ran): whatever was queued has left or never will
        self.lost = False
        #: streams that were still open when the tunnel ended (reset with it)
        self.streams_lost = 0
        self.bytes_in = 0
        self.bytes_out = 0
        #: who is at the other end, for log lines (the relay sets the connector id; None on a connector)
        self.peer_id: str | None = None
        #: what the tunnel's owner keeps about it, set by the owner when it makes the tunnel
        #: (relay: its routing.TunnelRecord; connector: its slot's record); never read here
        self.info: Any = None
        self._loop = asyncio.get_event_loop()
        self._flush_scheduled = False
        self._keepalive: asyncio.TimerHandle | None = None
        #: reading is paused because the session holds its input (a reply flood behind a full buffer)
        self._reading_held = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self._dispatch = {
            mux.DataReceived: self._on_data,
            mux.StreamEnded: self._on_ended,
            mux.WriteResumed: self._on_write_resumed,
            mux.StreamAccepted: self._on_accepted,
            mux.StreamRejected: self._on_rejected,
            mux.StreamReset: self._on_reset,
            mux.StreamOpened: self._on_opened,
            mux.ControlReceived: self._on_control,
            mux.GoAwayReceived: self._on_goaway,
            mux.DatagramReceived: self._on_datagram,
            mux.PongReceived: self._on_pong,
            mux.TunnelFailed: self._on_failed,
        }

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        set_nodelay(transport)
        transport.set_write_buffer_limits(self._flow.tunnel_write_high, self._flow.tunnel_write_low)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._keepalive = self._loop.call_later(self.session.tick(), self._run_keepalive)
        self.owner.tunnel_up(self)
        self.flush()

    def get_buffer(self, sizehint):
        return self.session.get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        self.bytes_in += nbytes
        self.session.buffer_updated(nbytes)
        self._process()

    def eof_received(self) -> bool:
        self.session.receive_data(b"")
        self._process()
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        self.session.output_blocked(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.session.output_blocked(False)
        if self._reading_held and not self.closed:
            # Frames read before the hold are still in the session's buffer: hand them out now.
            self._reading_held = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
            self._loop.call_soon(self._process)
        self.flush()
        stalled, self._stalled = self._stalled, set()
        for endpoint in stalled:
            endpoint.on_write_resumed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        if not self.session.closed:
            self.session.connection_lost(f"tunnel connection lost: {exc}" if exc else "tunnel connection closed")
        self._process()
        self._stop()

    # ------------------------------------------------------------------ API for pipes and owners

    def send(self, stream_id, data, end=False):
        """Queue bytes on a stream; False means: pause the socket until on_write_resumed."""
        keep_going = self.session.send_data(stream_id, data, end)
        if end:
            self._forget_if_closed(stream_id)
        if self.session.pending_output >= self._flush_at:
            # Hand the batch over now, not at the end of the loop turn (libuv may read 32 socket
            # buffers in one): the TLS transport SSL_writes all it is given into its output BIO at
            # once, and that buffer keeps its largest size for good.
            self.flush()
        else:
            self.schedule_flush()
        if self.write_paused:
            endpoint = self.endpoints.get(stream_id)
            if endpoint is not None:
                self._stalled.add(endpoint)
                return False
        return keep_going

    def end(self, stream_id: int) -> None:
        self.session.end_stream(stream_id)
        self._forget_if_closed(stream_id)
        self.schedule_flush()

    def reset(self, stream_id: int, code: int, reason: str) -> None:
        self._stalled.discard(self.endpoints.pop(stream_id, None))
        self.session.reset_stream(stream_id, code, reason)
        self.schedule_flush()

    def consumed(self, stream_id, nbytes):
        self.session.consumed(stream_id, nbytes)
        self.schedule_flush()

    def open(self, meta: dict, endpoint: StreamEndpoint) -> int:
        """Open a stream whose events go to ``endpoint``; raises mux.SessionError if it cannot."""
        stream_id = self.session.open_stream(meta)
        self.endpoints[stream_id] = endpoint
        self.session.set_sink(stream_id, endpoint)
        self.schedule_flush()
        return stream_id

    def accept(self, stream_id: int, endpoint: StreamEndpoint) -> None:
        self.endpoints[stream_id] = endpoint
        self.session.accept_stream(stream_id)
        self.schedule_flush()
        for data, end in self._early.pop(stream_id, ()):
            endpoint.on_data(data, end)
        # From now on DATA goes straight from the session to the endpoint (no event per frame);
        # after the early bytes, so the endpoint sees them in order.
        self.session.set_sink(stream_id, endpoint)

    def reject(self, stream_id: int, code: int, reason: str) -> None:
        self.endpoints.pop(stream_id, None)
        self._early.pop(stream_id, None)
        self.session.reject_stream(stream_id, code, reason)
        self.schedule_flush()

    def control(self, message: dict) -> None:
        if not self.session.closed:
            self.session.send_control(message)
            self.schedule_flush()

    def datagram(self, flow_id: int, data) -> bool:
        """Send one datagram of a UDP flow; False (nothing sent) while the tunnel is backed up or closed.

        Datagrams are not flow-controlled, so the TLS write buffer's high mark is their
        bound: above it they are dropped, as a full router queue would.
        """
        if self.write_paused or self.session.closed:
            return False
        self.session.send_datagram(flow_id, data)
        self.schedule_flush()
        return True

    def goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "draining") -> None:
        self.session.goaway(code, reason)
        self.flush()

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "closing") -> None:
        """Close the tunnel: GOAWAY to the peer, streams reset, connection closed."""
        if self.closed:
            return
        self.session.close(code, reason)
        self._process()

    @property
    def load(self) -> int:
        """How busy the tunnel is, for least-loaded routing."""
        return self.session.active_streams

    @property
    def usable(self) -> bool:
        return not self.closed and not self.session.closed and not self.session.draining

    def schedule_flush(self):
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self):
        self._flush_scheduled = False
        if self.write_paused and not self.session.closed:
            return  # resume_writing() flushes: above the high mark nothing more goes into the TLS BIO
        data = self.session.data_to_send()
        # Once the transport is closing the session has reset every stream and logged why;
        # what is left (at most a GOAWAY) has nowhere to go.
        if data and self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(data)
            self.transport.write(data)

    # ------------------------------------------------------------------ internals

    def _process(self):
        session = self.session
        dispatch = self._dispatch
        # Whatever the endpoints send while events are handed out goes in the one write below
        # (flush() clears the flag), so their schedule_flush() calls need no callback of their own.
        self._flush_scheduled = True
        try:
            while (event := session.next_event()) is not None:
                dispatch[type(event)](event)
            if session.input_held and not self._reading_held:
                self._hold_reading()
            if self._ending:
                for stream_id in list(self._ending):
                    self._forget_if_closed(stream_id)
        finally:
            self.flush()

    def _hold_reading(self) -> None:
        """The peer provoked too many replies while our write buffer was full: let TCP hold it."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self._reading_held = True
        self.transport.pause_reading()
        log.info(
            "tunnel reading paused: the peer sends and does not read",
            extra={"tunnel": self.name, "connector": self.peer_id, "peer": self.peer,
                   "reply_bytes": self.session.reply_bytes},
        )

    def _forget_if_closed(self, stream_id):
        """Drop the endpoint of a stream the session has closed both ways."""
        if not self.session.has_stream(stream_id):
            self._ending.discard(stream_id)
            self._stalled.discard(self.endpoints.pop(stream_id, None))
        elif self.session.send_buffered(stream_id):
            self._ending.add(stream_id)
        else:
            # Open the other way: the peer's end comes as an event and is looked at then.
            self._ending.discard(stream_id)

    def _run_keepalive(self) -> None:
        if self.closed:
            return
        delay = self.session.tick()
        self._process()
        if not self.closed:
            self._keepalive = self._loop.call_later(delay, self._run_keepalive)

    def _abort(self) -> None:
        """The peer did not take our last bytes within tunnel_close_timeout: drop the connection."""
        self._abort_timer = None
        if self.transport is not None and not self.lost:
            if self.session.flood is None:
                log.info("closing tunnel aborted: the peer did not read its last bytes", extra={"tunnel": self.name, "peer": self.peer})
            self.transport.abort()

    def _stop(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def _on_data(self, event: mux.DataReceived) -> None:
        endpoint = self.endpoints.get(event.stream_id)
        if endpoint is not None:
            endpoint.on_data(event.data, event.end)
            if event.end:
                self._forget_if_closed(event.stream_id)
        elif self.session.has_stream(event.stream_id):
            self._early.setdefault(event.stream_id, []).append((event.data, event.end))
        else:
            self.session.consumed(event.stream_id, len(event.data))

    def _on_ended(self, event: mux.StreamEnded) -> None:
        endpoint = self.endpoints.get(event.stream_id)
        if endpoint is not None:
            endpoint.on_end()
            self._forget_if_closed(event.stream_id)
        elif self.session.has_stream(event.stream_id):
            self._early.setdefault(event.stream_id, []).append((b"", True))

    def _on_write_resumed(self, event: mux.WriteResumed) -> None:
        endpoint = self.endpoints.get(event.stream_id)
        if endpoint is not None:
            endpoint.on_write_resumed()

    def _on_accepted(self, event: mux.StreamAccepted) -> None:
        endpoint = self.endpoints.get(event.stream_id)
        if endpoint is not None:
            endpoint.on_accepted()

    def _on_rejected(self, event: mux.StreamRejected) -> None:
        endpoint = self.endpoints.pop(event.stream_id, None)
        if endpoint is not None:
            endpoint.on_rejected(event.code, event.reason)

    def _on_reset(self, event: mux.StreamReset) -> None:
        self._early.pop(event.stream_id, None)
        if self.session.closed:
            self.streams_lost += 1
        endpoint = self.endpoints.pop(event.stream_id, None)
        self._stalled.discard(endpoint)
        if endpoint is not None:
            endpoint.on_reset(event.code, event.reason)

    def _on_opened(self, event: mux.StreamOpened) -> None:
        self.owner.stream_opened(self, event.stream_id, event.meta)

    def _on_control(self, event: mux.ControlReceived) -> None:
        self.owner.control_received(self, event.message)

    def _on_goaway(self, event: mux.GoAwayReceived) -> None:
        self.owner.goaway_received(self, event.code, event.reason)

    def _on_datagram(self, event: mux.DatagramReceived) -> None:
        self.owner.datagram_received(self, event.flow_id, event.data)

    def _on_pong(self, event: mux.PongReceived) -> None:
        self.rtt = event.rtt

    def _on_failed(self, event: mux.TunnelFailed) -> None:
        if self.closed:
            return
        self.closed = True
        self.flush()
        fields = {
            "tunnel": self.name,
            "peer": self.peer,
            "code": error_name(event.code),
            "reason": event.reason,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(time.monotonic() - self.opened_at, 3),
        }
        if self.session.flood is not None:
            log.warning(
                "tunnel closed for a flood",
                extra={**fields, "connector": self.peer_id, "limit": self.session.flood},
            )
        else:
            log.info("tunnel closed", extra=fields)
        if self.transport is not None:
            if event.code == ErrorCode.PEER_DEAD:
                self.transport.abort()
            elif self.session.flood is not None:
                # Not close(): a TLS close reads (and discards) until the peer's close_notify, so the
                # flooding peer would keep us decrypting. Stop reading, give the GOAWAY a moment, abort.
                if not self._reading_held and not self.transport.is_closing():
                    self.transport.pause_reading()
                self._abort_timer = self._loop.call_later(self._flow.flood_close_timeout, self._abort)
            else:
                self.transport.close()
                if not self.lost:
                    self._abort_timer = self._loop.call_later(self._flow.tunnel_close_timeout, self._abort)
        self._stop()
        self.owner.tunnel_down(self, event.code, event.reason)


class Tunnel(_TunnelCore, asyncio.BufferedProtocol):
    """One tunnel connection. ``session`` is its state machine; ``endpoints`` its streams."""
