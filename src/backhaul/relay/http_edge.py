"""The relay's HTTP edge: published HTTP apps reached by host name (the application proxy).

One user connection is one :class:`HttpConnection` (an asyncio.Protocol: ``data_received``
feeds a :class:`~backhaul.relay.http.reader.RequestReader`). Its requests are routed by
Host to an HTTP app, and each app it talks to gets one tunnel stream, opened at the first
request and kept for the next ones, so the connector's connection to the backend lives
as long as the user's. The edge parses the backend's responses too (a
:class:`~backhaul.relay.http.reader.ResponseReader`): to translate their headers and to
know where each ends.

Requests are answered strictly in order, one at a time: while one is with the backend,
the events of pipelined requests after it wait in the reader's deque and the socket is
not read, so at most one read of them is held. Bodies stream both ways under the tunnel's
flow control exactly as :mod:`backhaul.transport.pipe` does for TCP: reading pauses
when the stream pushes back, and bytes from the tunnel are credited back only while the
user's socket takes them. After a 101, both directions are piped raw.

Nothing reaches a connector before the request is routed (and, for an app published with
``--preauth oidc``, allowed by the gate), and nothing of a request is committed before its
stream is accepted, so a refused open is retried on another connector. Every request has
an id (``<connection id>.<n>``): the backend gets it as X-Request-Id, the edge's own
answers show it, and the stream's OPEN carries the id of the request that opened it, so
the connector's log line for the stream has the connection id in it.

One timer per connection covers every wait, each bounded by an HttpLimits field: the
head (header_timeout), the idle keep-alive (keepalive_timeout), the backend's answer or
its 100 (response_timeout), and the request body (body_timeout, body_min_rate): the body
clock counts only the time the edge spends reading the user's socket for a body, so
backpressure from the tunnel never counts against the client.

Streams are counted in the relay's metrics as the TCP edge counts its pipes (opened, open
latency, bytes each way, how they ended), by app: each stream carries a
:class:`_StreamFigures`, one per stream as the user sees it, so an open retried on another
connector is counted once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import ssl
from typing import Callable, Sequence

from backhaul.config import FlowControl, HttpLimits
from backhaul.relay.accept import TlsListener
from backhaul.relay.admission import Admission, Refused
from backhaul.relay.body_clock import BodyClock
from backhaul.protocol.constants import RETRYABLE_OPEN_FAILURES, ErrorCode, error_name
from backhaul.protocol.mux import SessionError, stream_meta
from backhaul.relay.http import translate as translate
from backhaul.relay.http import writer as writer
from backhaul.relay.http.reader import (
    BODY,
    CHUNKED,
    END,
    HEAD,
    LENGTH,
    NO_BODY,
    UPGRADE,
    HttpError,
    Request,
    RequestReader,
    Response,
    ResponseReader,
)
from backhaul.relay.metrics import RelayMetrics
from backhaul.relay.opening import StreamOpener
from backhaul.relay.preauth.contract import IDENTITY_HEADER_PREFIX, Allow, RequestHead, Respond
from backhaul.relay.routing import NoRoute
from backhaul.transport.sockets import reuseport_socket, set_nodelay
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.relay.http")

#: How many connectors one request's stream is offered to before the user gets 502.
OPEN_ATTEMPTS = 3
#: Requests resent on a new stream when a kept-alive backend connection turns out closed.
RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
#: Event kind for a request the reader refused (kept in order with the reader's events).
_REFUSED = -1

# Why reading the user's socket is paused (bits; reading resumes when none is left).
_P_QUEUE = 1  # events of a request wait for the exchange before it
_P_TUNNEL = 2  # the tunnel stream pushes back
_P_UPGRADE = 4  # bytes after an Upgrade head wait for the backend's 101

# What an exchange is doing.
_ROUTING, _GATING, _OPENING, _FORWARDING, _DISCARDING = range(5)

# What the connection's timer is for.
_T_NONE, _T_IDLE, _T_HEAD, _T_RESPONSE, _T_BODY = range(5)


class _Exchange:
    """One request and its response."""

    __slots__ = (
        "request", "id", "route", "state", "user", "extra", "tried", "started", "reused", "retried",
        "body_sent", "request_done", "response_started", "response_done", "rechunk", "close_after",
        "upgrade_rest", "status", "external_base", "external_host", "backend_closes", "figures", "continued",
    )

    def __init__(self, request: Request, request_id: str) -> None:
        self.request = request
        self.id = request_id
        self.route: translate.Route | None = None
        self.state = _ROUTING
        self.user: str | None = None
        self.extra: tuple[tuple[bytes, bytes], ...] = ()
        self.tried: list[Tunnel] = []
        self.started = time.monotonic()
        self.reused = False  # sent on a stream an earlier request opened
        self.retried = False
        self.body_sent = False
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.rechunk = False  # the user gets the body chunked (the backend's framing differs)
        self.close_after = False
        self.upgrade_rest = b""
        self.status = 0
        self.external_base = b""
        self.external_host = b""
        self.backend_closes = False  # the app closes its connection after this response
        self.figures: _StreamFigures | None = None  # of the stream this request is opening
        # The client may be expected to send the body: it did not ask for 100-continue, or
        # the backend's 100 came, or the body started anyway. Until then the body clock
        # does not run (the client waits for the backend, as it was told it may). HTTP/1.0
        # has no 100: its expectation is ignored (RFC 9110, 10.1.1).
        self.continued = not (request.expect_continue and request.version == "1.1")


class _StreamFigures:
    """What RelayMetrics reads of one user stream (the attributes a Pipe has)."""

    __slots__ = ("labels", "started", "bytes_up", "bytes_down", "code")

    def __init__(self, app: str) -> None:
        self.labels = {"app": app}
        self.started = time.monotonic()
        self.bytes_up = 0  # user to app, request heads as sent to the app
        self.bytes_down = 0
        self.code = ErrorCode.NO_ERROR


class _Stream:
    """One tunnel stream of a user connection: the endpoint its tunnel reports to.

    A connection drops its stream when it moves to another app or is done; a dropped
    stream only returns credit for what still arrives, until the tunnel forgets it.
    """

    __slots__ = ("conn", "tunnel", "id", "route", "user", "figures", "accepted", "remote_done", "local_done")

    def __init__(
        self, conn: "HttpConnection", tunnel: Tunnel, route: translate.Route, user: str | None, figures: _StreamFigures
    ) -> None:
        self.conn: HttpConnection | None = conn
        self.tunnel = tunnel
        self.id = 0
        self.route = route
        self.user = user
        self.figures = figures
        self.accepted = False
        self.remote_done = False
        self.local_done = False

    @property
    def usable(self) -> bool:
        return self.accepted and not self.remote_done and not self.local_done and not self.tunnel.closed

    def on_accepted(self) -> None:
        self.accepted = True
        if self.conn is not None:
            self.conn._stream_accepted(self)
        else:
            self.tunnel.reset(self.id, ErrorCode.CANCEL, "the user connection is gone")

    def on_rejected(self, code: int, reason: str) -> None:
        self.remote_done = self.local_done = True
        if self.conn is not None:
            self.conn._stream_rejected(self, code, reason)

    def on_data(self, data: bytes, end: bool) -> None:
        if self.conn is not None:
            self.conn._stream_data(self, data, end)
            return
        if data:
            self.tunnel.consumed(self.id, len(data))
        if end:
            self.remote_done = True

    def on_end(self) -> None:
        self.remote_done = True
        if self.conn is not None:
            self.conn._stream_ended(self)

    def on_reset(self, code: int, reason: str) -> None:
        self.remote_done = self.local_done = True
        if self.conn is not None:
            self.conn._stream_reset(self, code, reason)

    def on_write_resumed(self) -> None:
        if self.conn is not None:
            self.conn._set_paused(_P_TUNNEL, False)

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

    def __init__(self, edge: "HttpEdge", scheme: str, release_slot: Callable[[], None] | None = None) -> None:
        self.edge = edge
        self.scheme = scheme
        #: frees this connection's place in the worker's descriptor budget (relay.admission), once
        self._release_slot = release_slot
        self.limits = edge.limits
        self.metrics = edge.metrics
        self.transport: asyncio.Transport | None = None
        self.client_ip = "?"
        self.client = "?"
        self.conn_id = secrets.token_hex(8)
        self.reader = RequestReader(edge.limits)
        self.events = self.reader.events
        self.ex: _Exchange | None = None
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened = time.monotonic()
        self._admitted = False
        self._closing = False
        self._paused = 0
        self._reading_paused = False
        self._pumping = False
        self._stream: _Stream | None = None
        self._resp: ResponseReader | None = None
        self._upgraded = False
        self._user_eof = False
        self._write_paused = False
        self._owed = 0
        # One timer handle per connection: re-arming moves a deadline (a float), and a new
        # handle is made only when the deadline comes before the pending one.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._timer_kind = _T_NONE
        self._gate_task: asyncio.Task | None = None
        self._host: tuple[bytes, str] = (b"", "")  # the last Host header and its host name
        # The body clock (see _body_sync): it runs only while the edge reads the user's
        # socket for a body it waits for, and counts only that time ("active" seconds).
        self._body = BodyClock(self.limits)
        self._dropped_logged = False  # headers dropped for their "_" are logged once a connection
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ user socket

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0]
            self.client = f"{peer[0]}:{peer[1]}"
        refusal = self.edge.admit(self)
        if refusal is not None:
            status, message = refusal
            self.reader.close()
            self._closing = True
            transport.write(writer.local_response(status, message, self.conn_id, close=True))
            transport.close()
            return
        self._admitted = True
        set_nodelay(transport)
        flow = self.edge.flow
        transport.set_write_buffer_limits(flow.write_high, flow.write_low)
        self._arm(self.limits.header_timeout, _T_HEAD)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._upgraded:
            self._send(data)
            return
        if self._closing:
            return
        if self._timer_kind == _T_IDLE:
            self._arm(self.limits.header_timeout, _T_HEAD)
        try:
            self.reader.feed(data)
        except HttpError as exc:
            self.events.append((_REFUSED, exc))
        self._pump()

    def eof_received(self) -> bool:
        self._user_eof = True
        if self._upgraded:
            stream = self._stream
            if stream is not None:
                stream.end()
                if stream.remote_done:
                    self._close()
            return True
        events = self.events
        if (self.ex is not None and self.ex.request_done and not events) or (events and events[-1][0] == END):
            # A client may half-close once its requests are sent; it still gets the answers,
            # then the connection closes.
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._release_slot is not None:
            # The socket is closed by now: its place in the budget is free, whatever follows.
            self._release_slot()
            self._release_slot = None
        self._closing = True
        self._cancel_timer()
        if self._gate_task is not None:
            self._gate_task.cancel()
            self._gate_task = None
        busy = self._upgraded or (self.ex is not None and self.ex.state != _DISCARDING)
        self._drop_stream(graceful=not busy, reason="the user closed the connection")
        self.reader.close()
        self.events.clear()
        if self._admitted:
            self.edge.release(self)
            log.info(
                "http connection closed",
                extra={
                    "client": self.client,
                    "conn": self.conn_id,
                    "requests": self.requests,
                    "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out,
                    "seconds": round(time.monotonic() - self.opened, 3),
                    "error": str(exc) if exc else None,
                },
            )

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        stream = self._stream
        if self._owed and stream is not None:
            stream.tunnel.consumed(stream.id, self._owed)
        self._owed = 0

    # ------------------------------------------------------------------ helpers

    def _write(self, data: bytes) -> None:
        if data and not self.transport.is_closing():
            self.bytes_out += len(data)
            self.transport.write(data)

    def _set_paused(self, reason: int, on: bool) -> None:
        paused = (self._paused | reason) if on else (self._paused & ~reason)
        self._paused = paused
        if paused and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
            if self._body.running:
                self._body_sync()
        elif not paused and self._reading_paused and not self._closing:
            self._reading_paused = False
            self.transport.resume_reading()
            self._body_sync()

    def _arm(self, seconds: float, kind: int) -> None:
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        self._timer_kind = kind
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._timed_out)
            self._timer_at = deadline

    def _cancel_timer(self) -> None:
        self._timer_kind = _T_NONE
        if self._closing and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._closing or self._timer_kind == _T_NONE:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._timed_out)
            self._timer_at = self._deadline
            return
        kind, self._timer_kind = self._timer_kind, _T_NONE
        if kind == _T_IDLE and not self.reader.mid_head:
            self._close()
        elif kind in (_T_IDLE, _T_HEAD):
            self._refuse(HttpError(408, f"the request head did not arrive within {self.limits.header_timeout:g} s"))
        elif kind == _T_RESPONSE:
            ex = self.ex
            if ex is not None and not ex.response_started:
                self._drop_stream(graceful=False, reason="the backend did not answer in time")
                self._local(504, f"the app did not answer within {self.limits.response_timeout:g} s", close=True)
        elif kind == _T_BODY and self._body.running:
            self._body_check(self._loop.time())

    # ------------------------------------------------------------------ the body clock

    def _body_sync(self) -> None:
        """Start or stop the body clock as the connection's state asks.

        It runs while a request body is outstanding and the edge is reading the user's
        socket for it: not while reading is paused (the tunnel pushes back, or earlier
        events wait: a slow backend is not a slow client), not before a client that asked
        for 100-continue got it, and not once a response has started (an early answer
        ends the exchange by the existing rules: the connection closes after it).
        """
        ex = self.ex
        want = (
            ex is not None
            and ex.continued
            and not ex.response_started
            and self.reader.mid_body
            and not self._reading_paused
            and not self._closing
        )
        clock = self._body
        if want == clock.running:
            return
        now = self._loop.time()
        if not want:
            clock.pause(now)
            if self._timer_kind == _T_BODY:
                self._timer_kind = _T_NONE
            return
        clock.run(now, ex, self.reader.body_start)
        self._body_check(now)

    def _body_check(self, now: float) -> None:
        """Look at the body's progress (relay/body_clock.py): time it out, or look again later."""
        rule, value = self._body.look(now, self.reader.body_bytes)
        if rule is None:
            self._arm(value, _T_BODY)
        else:
            self._body_timed_out(rule, self._body.received(self.reader.body_bytes), value)

    def _body_timed_out(self, rule: str, received: int, active: float) -> None:
        ex = self.ex
        limits = self.limits
        if rule == "body_timeout":
            reason = f"no byte of the request body came for {limits.body_timeout:g} s"
        else:
            reason = (
                f"the request body came slower than {limits.body_min_rate} bytes/s "
                f"({received} bytes in {active:.1f} s)"
            )
        self.edge.count("http_body_timeouts")
        log.info(
            "request body timed out",
            extra={
                "client": self.client,
                "id": ex.id,
                "app": ex.route.app.name if ex.route else None,
                "rule": rule,
                "bytes": received,
                "seconds": round(active, 3),
            },
        )
        # Nothing of a response has started (the clock stops when one does): the user
        # gets 408, the stream to the connector is reset, and so is the backend connection.
        self._drop_stream(graceful=False, reason="the request body timed out")
        self._local(408, reason, close=True)

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        self.transport.close()

    def _abort(self, reason: str) -> None:
        log.info("http connection aborted", extra={"client": self.client, "conn": self.conn_id, "reason": reason})
        self._closing = True
        self._cancel_timer()
        self._drop_stream(graceful=False, reason=reason)
        self.transport.abort()

    # ------------------------------------------------------------------ requests

    def _pump(self) -> None:
        """Act on the reader's events in order, as far as the current exchange allows."""
        if self._pumping:
            return
        self._pumping = True
        try:
            events = self.events
            while events and not self._closing:
                kind, value = events[0]
                ex = self.ex
                if kind == HEAD:
                    if ex is not None:
                        break
                    events.popleft()
                    self._begin(value)
                elif kind == _REFUSED:
                    if ex is not None and ex.request_done:
                        break  # a later request's problem: answer the current one first
                    events.popleft()
                    self._refuse(value)
                elif ex is None:
                    raise AssertionError(f"request event {kind} outside of an exchange")
                elif ex.state == _DISCARDING:
                    events.popleft()
                    if kind == END:
                        ex.request_done = True
                        self._exchange_done()
                elif ex.state != _FORWARDING:
                    break
                else:
                    events.popleft()
                    if kind == BODY:
                        ex.body_sent = True
                        if not ex.continued:
                            self._continued(ex)  # it did not wait for the 100
                        self._send(writer.chunk(value) if ex.request.framing == CHUNKED else value)
                    elif kind == END:
                        self._request_end(ex)
                    elif kind == UPGRADE:
                        ex.upgrade_rest = value
                        self._set_paused(_P_UPGRADE, True)
        finally:
            self._pumping = False
        if (self.events or self._paused & _P_QUEUE) and not self._closing:
            self._set_paused(_P_QUEUE, bool(self.events))
        self._body_sync()

    def _refuse(self, error: HttpError) -> None:
        """Answer a request the reader refused (or that timed out) and close."""
        log.info(
            "http request refused",
            extra={"client": self.client, "conn": self.conn_id, "status": error.status, "reason": error.reason},
        )
        self.edge.count("http_refused")
        ex = self.ex
        if ex is not None and (ex.response_started or ex.state == _FORWARDING):
            # The request was already on its way: its body turned out malformed.
            self._abort(f"malformed request body: {error.reason}")
            return
        request_id = ex.id if ex is not None else f"{self.conn_id}.{self.requests + 1}"
        self._write(writer.local_response(error.status, error.reason, request_id, close=True))
        self._drop_stream(graceful=False, reason="malformed request")
        self._close()

    def _begin(self, request: Request) -> None:
        self._timer_kind = _T_NONE
        ex = self.ex = _Exchange(request, f"{self.conn_id}.{self.requests + 1}")
        target = request.target
        try:
            host = request.host
            if not target.startswith(b"/"):
                if target[:8].lower().startswith((b"http://", b"https://")):
                    # absolute-form: its authority replaces Host (RFC 9112, 3.2.2), for
                    # routing and for a --keep-host app's backend alike
                    host, request.target = translate.absolute_form(target)
                    request.host = host
                elif not (target == b"*" and request.method == "OPTIONS"):
                    raise HttpError(400, "the request-target must be a path")
            if host is None:
                raise HttpError(400, "the request names no host")
            if host == self._host[0]:
                name = self._host[1]
            else:
                name = translate.split_host(host)
                self._host = (host, name)
        except HttpError as exc:
            self._local(exc.status, exc.reason, close=True)
            return
        ex.external_host = name.encode("ascii")
        ex.external_base = self.scheme.encode("ascii") + b"://" + host
        route = self.edge.routes.get(name)
        if route is None:
            self._local(404, f"no app is published at {name}")
            return
        ex.route = route
        if route.app.preauth == "oidc":
            gate = self.edge.gate
            if gate is None:
                log.warning("oidc app without a gate refused", extra={"app": route.app.name, "id": ex.id})
                self._local(503, "pre-authentication is not configured on this relay")
                return
            ex.state = _GATING
            head = self._request_head(request, name)
            self._gate_task = self._loop.create_task(gate.check(route.app, head))
            self._gate_task.add_done_callback(lambda task, ex=ex: self._gated(ex, task))
            return
        self._forward(ex)

    def _request_head(self, request: Request, host: str) -> RequestHead:
        prefix = IDENTITY_HEADER_PREFIX
        underscores = self.limits.underscore_headers
        headers = []
        for name, value in request.headers:
            key = name.decode("latin-1").lower()
            if "_" in key and (not underscores or translate.reserved(key.replace("_", "-").encode("latin-1"))):
                continue  # what the backend will not get either
            if not key.startswith(prefix):
                headers.append((key, value.decode("latin-1")))
        return RequestHead(
            method=request.method,
            target=request.target.decode("latin-1"),
            headers=tuple(headers),
            scheme=self.scheme,
            host=host,
            client=self.client_ip,
        )

    def _gated(self, ex: _Exchange, task: asyncio.Task) -> None:
        self._gate_task = None
        if task.cancelled() or self._closing or self.ex is not ex:
            return
        error = task.exception()
        if error is not None:
            log.error("pre-authentication failed", extra={"app": ex.route.app.name, "id": ex.id}, exc_info=error)
            self._local(503, "pre-authentication failed; try again later", close=True)
            self._pump()
            return
        decision = task.result()
        try:
            if isinstance(decision, Allow):
                extra = []
                for name, value in decision.headers:
                    raw_name, raw_value = name.encode("ascii"), value.encode("utf-8")
                    if not name.lower().startswith(IDENTITY_HEADER_PREFIX):
                        raise writer.UnsafeHeader(f"identity header {name!r} lacks the prefix {IDENTITY_HEADER_PREFIX!r}")
                    writer.check_header(raw_name, raw_value)
                    extra.append((raw_name, raw_value))
                ex.extra = tuple(extra)
                ex.user = decision.user
                self._forward(ex)
            elif isinstance(decision, Respond):
                headers = []
                for name, value in decision.headers:
                    raw_name, raw_value = name.encode("ascii"), value.encode("utf-8")
                    writer.check_header(raw_name, raw_value)
                    headers.append((raw_name, raw_value))
                self._local(decision.status, "", headers=headers, body=decision.body)
            else:
                raise TypeError(f"the gate answered {decision!r}, not Allow or Respond")
        except (UnicodeError, writer.UnsafeHeader, TypeError) as exc:
            log.error("pre-authentication answered something unusable", extra={"id": ex.id, "error": str(exc)})
            self._local(503, "pre-authentication failed; try again later", close=True)
        self._pump()

    def _local(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        headers: list[tuple[bytes, bytes]] | tuple = (),
        body: bytes | None = None,
    ) -> None:
        """Answer the current request from the edge."""
        ex = self.ex
        request = ex.request
        # A body the edge did not read (and a client waiting for 100 may never send) leaves
        # the connection in an unknown state: close it.
        close = (
            close
            or self.edge.closing
            or not request.keep_alive
            or request.upgrade
            or (request.has_body and not ex.request_done)
        )
        ex.status = status
        ex.response_started = ex.response_done = True
        self._write(
            writer.local_response(
                status, message, ex.id, close=close, headers=headers, body=body, head_only=request.method == "HEAD"
            )
        )
        log.log(
            logging.WARNING if status >= 500 else logging.INFO,
            "http request answered by the edge",
            extra={
                "client": self.client,
                "id": ex.id,
                "host": ex.external_host.decode("ascii", "replace"),
                "app": ex.route.app.name if ex.route else None,
                "status": status,
                "reason": message,
            },
        )
        self.edge.count("http_edge_answers")
        if close:
            ex.close_after = True
            self._exchange_done()
            return
        ex.state = _DISCARDING
        if ex.request_done:
            self._exchange_done()

    # ------------------------------------------------------------------ streams

    def _forward(self, ex: _Exchange) -> None:
        stream = self._stream
        if stream is not None and (stream.route is not ex.route or stream.user != ex.user or not stream.usable):
            self._drop_stream(graceful=True, reason="another app")
            stream = None
        if stream is None:
            self._open(ex)
        else:
            ex.reused = True
            self._send_head(ex)

    def _open(self, ex: _Exchange) -> None:
        ex.state = _OPENING
        app = ex.route.app
        extra = {"user": ex.user} if ex.user is not None else {}
        tried = ex.tried
        if not tried:  # not a retry of a refused open: a new stream
            ex.figures = _StreamFigures(app.name)
            if self.metrics is not None:
                self.metrics.stream_started(ex.figures)
        no_route = None
        while len(tried) < OPEN_ATTEMPTS:
            try:
                tunnel = self.edge.registry.pick(app.group, tried, app=app.name)
            except NoRoute as exc:
                no_route = exc
                break
            tried.append(tunnel)
            stream = _Stream(self, tunnel, ex.route, ex.user, ex.figures)
            try:
                stream.id = tunnel.open(stream_meta(app.name, app.target, "http", self.client, ex.id, **extra), stream)
            except SessionError:
                continue
            self._stream = stream
            return
        self.edge.count("http_no_connector")
        self._stream_done(ex.figures, ErrorCode.REFUSED_STREAM)
        if no_route is not None and no_route.unreachable:
            self._local(502, str(no_route))
        elif tried:
            self._local(502, f"no connector of group {app.group!r} could take the request; try again")
        else:
            self._local(502, f"no connector of group {app.group!r} is active, so the app cannot be reached")

    def _stream_accepted(self, stream: _Stream) -> None:
        if stream is not self._stream:
            stream.end()
            return
        if self.metrics is not None:
            self.metrics.stream_accepted(stream.figures)
        self._resp = ResponseReader(self.limits)
        ex = self.ex
        if ex is None or ex.state != _OPENING:
            return
        self._send_head(ex)
        self._pump()

    def _stream_rejected(self, stream: _Stream, code: int, reason: str) -> None:
        if stream is not self._stream:
            return
        self._stream = None
        stream.conn = None
        ex = self.ex
        retry = code in RETRYABLE_OPEN_FAILURES and ex is not None and ex.state == _OPENING
        if not retry:
            self._stream_done(stream.figures, code)
        if ex is None or ex.state != _OPENING:
            return
        if retry:
            log.info(
                "stream open refused, retrying on another connector",
                extra={"id": ex.id, "code": error_name(code), "reason": reason},
            )
            self._open(ex)
        else:
            status = 504 if code == ErrorCode.CONNECT_TIMEOUT else 502
            self._local(status, f"the connector could not reach the app: {reason}")
        self._pump()

    def _send_head(self, ex: _Exchange) -> None:
        request = ex.request
        route = ex.route
        dropped: list[bytes] = []
        headers = translate.request_headers(
            route,
            request,
            client_ip=self.client_ip,
            scheme=self.scheme,
            request_id=ex.id,
            extra=ex.extra,
            underscores=bool(self.limits.underscore_headers),
            dropped=dropped,
        )
        if dropped and not self._dropped_logged:
            # Once a connection: a client that sends them sends them with every request.
            self._dropped_logged = True
            log.info(
                "request headers with '_' in their name dropped",
                extra={
                    "client": self.client,
                    "id": ex.id,
                    "app": route.app.name,
                    "headers": [name.decode("latin-1") for name in dropped[:10]],
                },
            )
        if request.framing == LENGTH:
            headers.append((b"Content-Length", str(request.length).encode("ascii")))
        elif request.framing == CHUNKED:
            headers.append((b"Transfer-Encoding", b"chunked"))
        self._resp.expect(request.method == "HEAD", request.upgrade)
        ex.state = _FORWARDING
        self._send(writer.request_head(request.method, translate.request_target(route, request.target), headers))
        if ex.request_done or not ex.continued:
            # The backend has response_timeout to answer, or to say 100 to a client that waits for it.
            self._arm(self.limits.response_timeout, _T_RESPONSE)

    def _send(self, data) -> None:
        stream = self._stream
        if stream is None or stream.local_done:
            return
        try:
            keep_reading = stream.tunnel.send(stream.id, data)
        except SessionError as exc:
            self._stream_failed(f"the stream is gone: {exc}")
            return
        stream.figures.bytes_up += len(data)
        if not keep_reading:
            self._set_paused(_P_TUNNEL, True)

    def _continued(self, ex: _Exchange) -> None:
        """The client of an ``Expect: 100-continue`` may send its body now: the body clock
        takes over from the backend's response_timeout."""
        ex.continued = True
        if self._timer_kind == _T_RESPONSE and not ex.request_done:
            self._timer_kind = _T_NONE

    def _request_end(self, ex: _Exchange) -> None:
        if ex.request.framing == CHUNKED:
            self._send(writer.LAST_CHUNK)
        ex.request_done = True
        if ex.response_done:
            self._exchange_done()
        elif not ex.response_started:
            self._arm(self.limits.response_timeout, _T_RESPONSE)

    def _drop_stream(self, graceful: bool, reason: str) -> None:
        stream = self._stream
        if stream is None:
            return
        self._stream = None
        self._resp = None
        stream.conn = None
        if self._owed:
            stream.tunnel.consumed(stream.id, self._owed)
            self._owed = 0
        if graceful and stream.accepted:
            stream.end()
            self._stream_done(stream.figures, ErrorCode.NO_ERROR)
        else:
            stream.reset(reason)
            self._stream_done(stream.figures, ErrorCode.CANCEL)

    def _stream_done(self, figures: _StreamFigures, code: int) -> None:
        """Count a stream out of the metrics; a code it was reset with stays its code."""
        if figures.code == ErrorCode.NO_ERROR:
            figures.code = code
        if self.metrics is not None:
            self.metrics.stream_done(figures)

    def _can_retry(self, ex: _Exchange) -> bool:
        return (
            ex.reused
            and not ex.retried
            and not ex.body_sent
            and not ex.response_started
            and ex.request_done
            and not ex.request.has_body
            and not ex.request.upgrade
            and ex.request.method in RETRY_METHODS
        )

    def _stream_failed(self, reason: str, status: int = 502) -> None:
        """The current stream ended or broke without a complete answer to the current request."""
        ex = self.ex
        self._drop_stream(graceful=False, reason=reason)
        if self._upgraded:
            self._abort(reason)
        elif ex is None or ex.state != _FORWARDING:
            return
        elif self._can_retry(ex):
            # The kept-alive backend connection was closed as the request went out: nothing
            # of it was answered, and it is safe to send again.
            log.info("kept-alive backend connection was closed; resending", extra={"id": ex.id, "reason": reason})
            ex.retried = True
            ex.reused = False
            ex.tried.clear()  # a new stream, counted anew
            self._open(ex)
        elif not ex.response_started:
            self._local(status, f"the app's connection failed: {reason}", close=True)
        else:
            self._abort(f"the app's response was cut: {reason}")

    def _stream_reset(self, stream: _Stream, code: int, reason: str) -> None:
        if stream is not self._stream:
            return
        ex = self.ex
        if not stream.accepted and ex is not None and ex.state == _OPENING:
            # The tunnel died before the target answered: nothing is committed yet.
            self._stream_rejected(stream, ErrorCode.PEER_DEAD, reason)
            return
        stream.figures.code = code
        self._stream_failed(f"{error_name(code)}: {reason}")
        self._pump()

    def _stream_ended(self, stream: _Stream) -> None:
        if stream is not self._stream:
            return
        if self._upgraded:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            if self._user_eof or not self.transport.can_write_eof():
                self._close()
            return
        ex = self.ex
        resp = self._resp
        if ex is not None and ex.state == _FORWARDING and resp is not None:
            try:
                resp.eof()
            except HttpError as exc:
                self._stream_failed(exc.reason)
                self._pump()
                return
            self._drain_response(ex)
            if self.ex is ex and not self._closing:
                self._stream_failed("the app closed the connection without answering")
                self._pump()
                return
        if self._stream is stream:
            self._drop_stream(graceful=True, reason="the app closed the connection")

    # ------------------------------------------------------------------ responses

    def _stream_data(self, stream: _Stream, data: bytes, end: bool) -> None:
        size = len(data)
        if size:
            stream.figures.bytes_down += size
            if self._upgraded:
                self._write(data)
            else:
                ex = self.ex
                resp = self._resp
                if ex is None or ex.state != _FORWARDING or resp is None:
                    self._stream_failed("the app sent bytes no request asked for")
                    self._pump()
                else:
                    try:
                        resp.feed(data)
                    except HttpError as exc:
                        self._drain_response(ex)
                        log.warning("bad response from the app", extra={"id": ex.id, "reason": exc.reason})
                        self._stream_failed(exc.reason)
                        self._pump()
                    else:
                        self._drain_response(ex)
            if self._write_paused and self._stream is stream:
                self._owed += size
            else:
                stream.tunnel.consumed(stream.id, size)
        if end:
            stream.on_end()

    def _drain_response(self, ex: _Exchange) -> None:
        events = self._resp.events
        out: list[bytes] = []
        while events:
            kind, value = events.popleft()
            if kind == BODY:
                out.append(writer.chunk(value) if ex.rechunk else value)
            elif kind == HEAD:
                self._response_head(ex, value, out)
            elif kind == END:
                if ex.rechunk:
                    out.append(writer.LAST_CHUNK)
                data = b"".join(out)
                if data and not self.transport.is_closing():
                    self.bytes_out += len(data)
                    self.transport.write(data)
                out.clear()
                ex.response_done = True
                if events:
                    self._drop_stream(graceful=False, reason="the app sent more than one response")
                if not ex.request_done:
                    # The app answered before the request was complete: the rest of the
                    # request has nowhere to go.
                    ex.close_after = True
                    self._drop_stream(graceful=False, reason="answered before the request was complete")
                self._exchange_done()
                return
            elif kind == UPGRADE:
                self._write(b"".join(out))
                out.clear()
                self._switch(ex, value)
                return
        if out:
            self._write(b"".join(out))

    def _response_head(self, ex: _Exchange, response: Response, out: list[bytes]) -> None:
        request = ex.request
        http11 = request.version == "1.1"
        if response.interim:
            if response.status == 100 and not ex.continued:
                self._continued(ex)
                self._body_sync()
            if http11:
                headers = translate.response_headers(
                    ex.route, response, external_base=ex.external_base, external_host=ex.external_host
                )
                out.append(writer.response_head(response.status, response.reason, headers))
            return
        if self._timer_kind == _T_RESPONSE:
            self._cancel_timer()
        ex.response_started = True
        if self._body.running:
            self._body_sync()  # an early answer: the body is no longer waited for
        ex.status = response.status
        headers = translate.response_headers(
            ex.route,
            response,
            external_base=ex.external_base,
            external_host=ex.external_host,
            keep_length=response.framing == NO_BODY,
        )
        close = (
            ex.close_after
            or not request.keep_alive
            or self.edge.closing
            or (request.upgrade and response.status != 101)
            # an answer before the whole request: what is left of the request has nowhere to go
            or not ex.request_done
            or (self._user_eof and not self.events)
        )
        if response.framing == LENGTH:
            headers.append((b"Content-Length", str(response.length).encode("ascii")))
        elif response.framing != NO_BODY:
            if http11:
                ex.rechunk = True
                headers.append((b"Transfer-Encoding", b"chunked"))
            else:
                close = True
        if response.status != 101:
            if close:
                ex.close_after = True
                headers.append((b"Connection", b"close"))
            elif not http11:
                headers.append((b"Connection", b"keep-alive"))
        ex.backend_closes = not response.keep_alive
        out.append(writer.response_head(response.status, response.reason, headers))

    def _switch(self, ex: _Exchange, rest: bytes) -> None:
        """The app answered 101: from now on both directions are piped raw."""
        self._upgraded = True
        self._resp = None
        self.ex = None
        self.requests += 1
        self._cancel_timer()
        self.reader.close()
        self.events.clear()
        self._write(rest)
        if ex.upgrade_rest:
            self._send(ex.upgrade_rest)
        log.info("http connection upgraded", extra={"client": self.client, "id": ex.id, "app": ex.route.app.name})
        self._set_paused(_P_QUEUE | _P_UPGRADE, False)

    def _exchange_done(self) -> None:
        ex = self.ex
        self.ex = None
        self.requests += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "http request",
                extra={
                    "id": ex.id,
                    "client": self.client,
                    "method": ex.request.method,
                    "host": ex.external_host.decode("ascii", "replace"),
                    "status": ex.status,
                    "seconds": round(time.monotonic() - ex.started, 4),
                },
            )
        if ex.close_after or self._closing or (self._user_eof and not self.events):
            self._close()
            return
        stream = self._stream
        if stream is not None and (ex.backend_closes or not stream.usable):
            # The next request opens a new stream (and the connector a new connection).
            self._drop_stream(graceful=True, reason="the app closes its connection")
        if self.reader.mid_head:
            self._arm(self.limits.header_timeout, _T_HEAD)
        else:
            self._arm(self.limits.keepalive_timeout, _T_IDLE)
        if self.events:
            self._pump()
        elif self._paused & _P_QUEUE:
            self._set_paused(_P_QUEUE, False)


class HttpEdge:
    """The HTTP(S) listeners of one relay worker and the host -> app table they route by."""

    def __init__(
        self,
        opener: StreamOpener,
        flow: FlowControl,
        limits: HttpLimits,
        *,
        gate=None,
        metrics: RelayMetrics | None = None,
        admission: Admission | None = None,
        listeners: Sequence[tuple[str, int, ssl.SSLContext | None]] = (),
    ) -> None:
        self.opener = opener
        self.registry = opener.registry
        #: where user streams and the edge's events are counted, or None
        self.metrics = metrics
        #: the worker's connection budget every connection counts in, or None (unit tests)
        self.admission = admission
        #: (host, port, TLS context or None for plain HTTP) bound by start()
        self.listeners = tuple(listeners)
        self.flow = flow
        self.limits = limits
        #: the pre-authentication Gate (preauth.contract.Gate), or None: oidc apps are then refused
        self.gate = gate
        self.routes: dict[str, translate.Route] = {}
        self.connections: set[HttpConnection] = set()
        self.closing = False
        self._per_client: dict[str, int] = {}
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        """Bind the edge's listeners (relay.opening.Edge)."""
        for host, port, ssl_context in self.listeners:
            await self.listen(host, port, ssl_context, self.admission)

    async def listen(self, host: str, port: int, ssl_context=None, admission=None) -> None:
        """Serve HTTP (or HTTPS with ``ssl_context``) on ``host:port``.

        With ``admission`` (the worker's relay.admission.Admission) every connection counts
        in its descriptor budget from accept until it closes, and is closed at accept once
        the budget is spent; HTTPS handshakes then run under the worker's handshake cap and
        timeout (relay.accept.TlsListener).
        """
        scheme = "https" if ssl_context is not None else "http"
        sock = reuseport_socket(host, port)
        loop = asyncio.get_running_loop()
        if admission is None:
            tls = {"ssl": ssl_context, "ssl_handshake_timeout": 10.0} if ssl_context is not None else {}
            server = await loop.create_server(lambda: HttpConnection(self, scheme), sock=sock, backlog=4096, **tls)
            self._servers.append(server)
            log.info("http edge listening", extra={"listen": f"{host}:{port}", "scheme": scheme})
            return

        if ssl_context is None:

            def accept() -> asyncio.Protocol:
                # connection_made follows at once, and connection_lost every connection_made.
                return HttpConnection(self, scheme, admission.release) if admission.admit("http") else Refused()

            server = await loop.create_server(accept, sock=sock, backlog=4096)
        else:
            listener = TlsListener(
                "https", ssl_context, admission, lambda _tls, slot: HttpConnection(self, scheme, slot.release),
                stats=self.metrics.events if self.metrics is not None else None,
            )
            server = await loop.create_server(listener, sock=sock, backlog=4096)
        self._servers.append(server)
        log.info("http edge listening", extra={"listen": f"{host}:{port}", "scheme": scheme})

    async def set_apps(self, apps) -> None:
        """Route by the HTTP apps among ``apps`` from now on; connections to changed or deleted apps are closed."""
        routes = {}
        for app in apps:
            if app.proto != "http":
                continue
            try:
                routes[app.external_host.lower()] = translate.Route(app)
            except (ValueError, UnicodeError) as exc:
                log.error("http app skipped", extra={"app": app.name, "error": str(exc)})
        old, self.routes = self.routes, routes
        for host, route in old.items():
            new = routes.get(host)
            if new is not None and new.app == route.app:
                routes[host] = route  # unchanged: keep the object the connections hold
                continue
            for conn in list(self.connections):
                stream = conn._stream
                ex = conn.ex
                if (stream is not None and stream.route is route) or (ex is not None and ex.route is route):
                    conn._abort(f"app {route.app.name!r} was changed or deleted")

    def admit(self, conn: HttpConnection) -> tuple[int, str] | None:
        """Count a new connection in, or say why it is refused."""
        limits = self.limits
        if len(self.connections) >= limits.max_connections:
            self.count("http_connections_refused")
            log.warning("http connection refused: too many connections", extra={"client": conn.client})
            return 503, "the relay is at its connection limit; try again later"
        count = self._per_client.get(conn.client_ip, 0)
        if count >= limits.max_connections_per_client:
            self.count("http_connections_refused")
            log.warning("http connection refused: too many from one address", extra={"client": conn.client})
            return 429, f"more than {limits.max_connections_per_client} connections from your address"
        self._per_client[conn.client_ip] = count + 1
        self.connections.add(conn)
        return None

    def release(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)
        count = self._per_client.get(conn.client_ip, 0) - 1
        if count > 0:
            self._per_client[conn.client_ip] = count
        else:
            self._per_client.pop(conn.client_ip, None)

    def count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.count(name)

    async def stop(self) -> None:
        """Stop listening; idle connections close now, busy ones after their current answer."""
        self.closing = True
        for server in self._servers:
            server.close()
        self._servers.clear()
        for conn in list(self.connections):
            if conn.ex is None and not conn._upgraded:
                conn._close()
