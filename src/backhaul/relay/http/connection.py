"""One user connection to the HTTP edge: the asyncio Protocol that carries out what its state machine asks.

:class:`HttpConnection` owns the socket, the one timer, the tunnel stream's endpoint and
the credit it owes; everything it decides is :class:`~backhaul.relay.http.exchange.ExchangeMachine`'s.
Each entry (``data_received``, a stream event, the timer, the gate's answer) feeds the
machine and then :meth:`HttpConnection.run` performs the machine's actions in order; an
action that reports back (a send that failed, an open that found no tunnel) feeds the
machine again, and the actions that adds are performed in the same run.

Bodies stream both ways under the tunnel's flow control exactly as
:mod:`backhaul.transport.pipe` does for TCP: reading pauses when the stream pushes back,
and bytes from the tunnel are credited back only while the user's socket takes them.

Streams are counted in the relay's metrics as the TCP edge counts its pipes (opened, open
latency, bytes each way, how they ended), by app: each stream carries a
:class:`StreamFigures`, one per stream as the user sees it, so an open retried on another
connector is counted once (relay.opening).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Callable

from backhaul.protocol.constants import ErrorCode
from backhaul.protocol.mux import SessionError
from backhaul.relay.http import actions as A
from backhaul.relay.http import writer
from backhaul.relay.http.actions import SEND, WRITE
from backhaul.relay.http.exchange import ExchangeMachine
from backhaul.relay.http.pacing import T_NONE
from backhaul.relay.http.states import CLOSED, OPENING, Exchange
from backhaul.relay.opening import CannotOpen, Opening
from backhaul.transport.sockets import set_nodelay

if TYPE_CHECKING:
    from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.relay.http")


def _log_request(ex: Exchange, client: str, now: float) -> None:
    """One DEBUG line per request (the machine says DONE only when that level is on)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "http request",
            extra={
                "id": ex.id,
                "client": client,
                "method": ex.request.method,
                "host": ex.external_host.decode("ascii", "replace"),
                "status": ex.status,
                "seconds": round(now - ex.started, 4),
            },
        )


class StreamFigures:
    """What RelayMetrics reads of one user stream (relay.opening.StreamFigures)."""

    __slots__ = ("labels", "started", "bytes_up", "bytes_down", "code")

    def __init__(self, app: str) -> None:
        self.labels = {"app": app}
        self.started = time.monotonic()
        self.bytes_up = 0  # user to app, request heads as sent to the app
        self.bytes_down = 0
        self.code = ErrorCode.NO_ERROR


class TunnelStream:
    """One tunnel stream of a user connection: the endpoint its tunnel reports to.

    A connection detaches its stream when it moves to another app or is done; a detached
    stream only returns credit for what still arrives, until the tunnel forgets it.
    """

    __slots__ = ("conn", "tunnel", "id", "opening", "figures", "accepted", "remote_done", "local_done")

    def __init__(self, conn: "HttpConnection", opening: Opening) -> None:
        self.conn: HttpConnection | None = conn
        self.opening = opening
        self.figures: StreamFigures = opening.figures
        self.tunnel: Tunnel | None = None
        self.id = 0
        self.accepted = False
        self.remote_done = False
        self.local_done = False

    def on_accepted(self) -> None:
        self.accepted = True
        conn = self.conn
        if conn is None:
            self.tunnel.reset(self.id, ErrorCode.CANCEL, "the user connection is gone")
            return
        self.opening.accepted()
        conn.machine.link.accepted()
        conn.run()

    def on_rejected(self, code: int, reason: str) -> None:
        self.remote_done = self.local_done = True
        conn = self.conn
        if conn is not None:
            conn.machine.link.rejected(code, reason)
            conn.run()

    def on_data(self, data: bytes, end: bool) -> None:
        size = len(data)
        conn = self.conn
        if size:
            if conn is None:
                self.tunnel.consumed(self.id, size)
            else:
                self.figures.bytes_down += size
                conn.machine.link.data(data)
                conn.run()
                if conn.write_paused and conn.stream is self:
                    conn.owed += size
                else:
                    self.tunnel.consumed(self.id, size)
        if end:
            self.on_end()

    def on_end(self) -> None:
        self.remote_done = True
        conn = self.conn
        if conn is not None:
            conn.machine.link.ended()
            conn.run()

    def on_reset(self, code: int, reason: str) -> None:
        self.remote_done = self.local_done = True
        conn = self.conn
        if conn is not None:
            conn.machine.link.reset(code, reason, self.opening.lost_with_tunnel(self.accepted))
            conn.run()

    def on_write_resumed(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.machine.pushback(False)
            conn.run()

    def let_go(self, kind: int, value) -> None:
        """The connection is done with the stream (an END_STREAM, RESET_STREAM or FORGET_STREAM action)."""
        if kind == A.END_STREAM:
            self.end()
            self.opening.done(ErrorCode.NO_ERROR)
        elif kind == A.RESET_STREAM:
            self.reset(value)
            self.opening.done(ErrorCode.CANCEL)
        else:
            self.opening.done(value)  # the tunnel ended it, with that code

    def end(self) -> None:
        """Half-close our side: the backend connection is no longer needed."""
        if not self.local_done:
            self.local_done = True
            self.tunnel.end(self.id)

    def reset(self, reason: str) -> None:
        if not (self.local_done and self.remote_done):
            self.local_done = self.remote_done = True
            self.tunnel.reset(self.id, ErrorCode.CANCEL, reason)


class HttpConnection(asyncio.Protocol):
    """One user connection to the HTTP edge."""

    def __init__(self, edge, scheme: str, release_slot: Callable[[], None] | None = None) -> None:
        #: the relay.http.edge.HttpEdge: its limits, flow, opener, gate, routes, admit/release/count
        self.edge = edge
        self.scheme = scheme
        #: frees this connection's place in the worker's descriptor budget (relay.admission), once
        self._release_slot = release_slot
        self.transport: asyncio.Transport | None = None
        self.client_ip = "?"
        self.client = "?"
        self.conn_id = secrets.token_hex(8)
        self.machine: ExchangeMachine | None = None
        self.stream: TunnelStream | None = None
        self.opening: Opening | None = None  # of the stream the current request opens
        self.write_paused = False
        self.owed = 0  # credit held back while the user's socket does not take bytes
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened = time.monotonic()
        self._running = False
        self._pacing = None  # the machine's Pacing (read after every run)
        self._gate_task: asyncio.Task | None = None
        #: the next try of an open that found no route yet (relay.opening: a connector re-homing)
        self._route_wait: asyncio.TimerHandle | None = None
        # One timer handle per connection: re-arming moves a deadline (a float), and a new
        # handle is made only when the deadline comes before the pending one.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ public

    @property
    def requests(self) -> int:
        return self.machine.requests if self.machine is not None else 0

    def uses(self, route) -> bool:
        """Whether the connection's stream or current request is for ``route``."""
        return self.machine is not None and self.machine.uses(route)

    def abort(self, reason: str) -> None:
        """Drop the connection now, its stream reset (the app it uses changed or went away)."""
        if self.machine is not None and self.machine.state is not CLOSED:
            self.machine.abort(reason)
            self.run()

    def close_if_idle(self) -> None:
        """Close now unless a request or an upgrade is under way (the relay drains)."""
        if self.machine is not None:
            self.machine.close_if_idle()
            self.run()

    # ------------------------------------------------------------------ the user's socket

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0]
            self.client = f"{peer[0]}:{peer[1]}"
        refusal = self.edge.admit(self)
        if refusal is not None:
            status, message = refusal
            transport.write(writer.local_response(status, message, self.conn_id, close=True))
            transport.close()
            return
        set_nodelay(transport)
        flow = self.edge.flow
        transport.set_write_buffer_limits(flow.write_high, flow.write_low)
        self.machine = ExchangeMachine(
            self.edge.limits,
            self.edge,
            scheme=self.scheme,
            conn_id=self.conn_id,
            client_ip=self.client_ip,
            client=self.client,
            clock=self._loop.time,
            can_write_eof=transport.can_write_eof(),
            trace=log.isEnabledFor(logging.DEBUG),  # (the level is set at start)
        )
        self._pacing = self.machine.pacing
        self.run()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        machine = self.machine
        if machine is None:
            return
        machine.receive(data)
        self.run()

    def eof_received(self) -> bool:
        if self.machine is None:
            return False
        keep = self.machine.receive_eof()
        self.run()
        return keep

    def connection_lost(self, exc: Exception | None) -> None:
        if self._release_slot is not None:
            # The socket is closed by now: its place in the budget is free, whatever follows.
            self._release_slot()
            self._release_slot = None
        machine = self.machine
        if machine is None:
            return
        if self._gate_task is not None:
            self._gate_task.cancel()
            self._gate_task = None
        if self._route_wait is not None:
            self._route_wait.cancel()
            self._route_wait = None
        machine.connection_lost()
        self.run()
        self._cancel_timer()
        self.edge.release(self)
        log.info(
            "http connection closed",
            extra={
                "client": self.client,
                "conn": self.conn_id,
                "requests": machine.requests,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "seconds": round(time.monotonic() - self.opened, 3),
                "error": str(exc) if exc else None,
            },
        )

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        stream = self.stream
        if self.owed and stream is not None:
            stream.tunnel.consumed(stream.id, self.owed)
        self.owed = 0

    # ------------------------------------------------------------------ the machine's actions

    def run(self) -> None:
        """Carry out the machine's actions, in order (those they add included)."""
        if self._running:
            return  # the outer run goes on with what was added
        self._running = True
        actions = self.machine.actions
        transport = self.transport
        i = 0
        try:
            while i < len(actions):  # what the actions add is carried out in this loop too
                kind = actions[i]
                value = actions[i + 1]
                i += 2
                if kind == WRITE:
                    if not transport.is_closing():
                        self.bytes_out += len(value)
                        transport.write(value)
                elif kind == SEND:
                    self._send(value)
                else:
                    self._act(kind, value)
        finally:
            actions.clear()
            self._running = False
        pacing = self._pacing
        if pacing.due is not None:
            # Re-arming moves the deadline; a new handle is made only when it comes sooner.
            deadline = self._loop.time() + pacing.due
            pacing.due = None
            self._deadline = deadline
            if (self._timer is None or deadline < self._timer_at) and self.machine.state is not CLOSED:
                self._new_timer(deadline)

    def _send(self, data) -> None:
        stream = self.stream
        if stream is None or stream.local_done:
            return
        try:
            keep_reading = stream.tunnel.send(stream.id, data)
        except SessionError as exc:
            self.machine.link.broken(str(exc))
            return
        stream.figures.bytes_up += len(data)
        if not keep_reading:
            self.machine.pushback(True)

    def _act(self, kind: int, value) -> None:
        """The actions that come once a request or less."""
        if kind == A.DONE:
            _log_request(value, self.client, self._loop.time())
        elif kind == A.PAUSE:
            self.transport.pause_reading()
        elif kind == A.RESUME:
            self.transport.resume_reading()
        elif kind == A.OPEN:
            route = value.route
            extra = {"user": value.user} if value.user is not None else {}
            self.opening = self.edge.opener.begin(route.app, "http", self.client, value.id, StreamFigures(route.app.name), **extra)
            self._open()
        elif kind == A.REOPEN:
            self._detach()
            self._open()
        elif kind == A.END_STREAM or kind == A.RESET_STREAM or kind == A.FORGET_STREAM:
            stream = self._detach()
            if stream is not None:
                stream.let_go(kind, value)
        elif kind == A.HALF_CLOSE:
            if self.stream is not None:
                self.stream.end()
        elif kind == A.WRITE_EOF:
            self.transport.write_eof()
        elif kind == A.GATE:
            ex, head = value
            task = self._gate_task = self._loop.create_task(self.edge.gate.check(ex.route.app, head))
            task.add_done_callback(lambda task, ex=ex: self._gated(ex, task))
        elif kind == A.CLOSE:
            self._cancel_timer()
            self.transport.close()
        elif kind == A.ABORT:
            log.info("http connection aborted", extra={"client": self.client, "conn": self.conn_id, "reason": value})
            self._cancel_timer()
            self.transport.abort()
        elif kind == A.COUNT:
            self.edge.count(value)
        elif kind == A.LOG:
            level, message, extra, exc_info = value
            log.log(level, message, extra=extra, exc_info=exc_info)
        else:
            raise AssertionError(f"unknown HTTP exchange action {kind}")

    def _open(self) -> None:
        """Offer the current request's stream to the next tunnel (relay.opening)."""
        opening = self.opening
        stream = TunnelStream(self, opening)
        try:
            stream.id = opening.open(stream)
        except CannotOpen as exc:
            if exc.retry_after:
                self._route_wait = self._loop.call_later(exc.retry_after, self._open_again, opening)
                return
            opening.done(ErrorCode.REFUSED_STREAM)
            self.machine.link.open_failed(exc)
            return
        stream.tunnel = opening.tunnel
        self.stream = stream

    def _open_again(self, opening: Opening) -> None:
        """Try again to open a request's stream that found no route: unless the request has
        since ended (timed out, say) and the machine moved on."""
        self._route_wait = None
        if opening is self.opening and self.stream is None and self.machine.state is OPENING:
            self._open()
            self.run()

    def _detach(self) -> TunnelStream | None:
        """Let the current stream go its own way (it only returns credit from now on)."""
        stream = self.stream
        if stream is None:
            return None
        self.stream = None
        stream.conn = None
        if self.owed:
            stream.tunnel.consumed(stream.id, self.owed)
            self.owed = 0
        return stream

    def _gated(self, ex: Exchange, task: asyncio.Task) -> None:
        self._gate_task = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.machine.router.gate_failed(ex, error)
        else:
            self.machine.router.gate_answered(ex, task.result())
        self.run()

    # ------------------------------------------------------------------ the timer

    def _new_timer(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._timed_out)
        self._timer_at = deadline

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        machine = self.machine
        if machine.state is CLOSED or machine.pacing.timer == T_NONE:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._timed_out)
            self._timer_at = self._deadline
            return
        machine.timed_out()
        self.run()
