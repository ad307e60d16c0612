"""The HTTP edge's connection state machine, sans-I/O: reader and stream events in, actions out.

Theory of operation. One user connection is one :class:`ExchangeMachine`. It is fed the
user's bytes (:meth:`~ExchangeMachine.receive`, parsed by a
:class:`~backhaul.relay.http.reader.RequestReader` it owns), the events of the tunnel stream
of the moment (its :class:`BackendLink`: accepted, rejected, data, end, reset), the gate's
answers and the timer running out. It does no I/O and reads no clock but the one it is
given: what it wants done it appends to :attr:`~ExchangeMachine.actions`, a flat list of
``kind, value`` pairs (no tuple per action) that the connection
(:mod:`backhaul.relay.http.connection`) carries out in order and clears.

The machine is in one :class:`State` at a time and moves only along :data:`TRANSITIONS`
(``state -> step -> next state``); a step the table does not hold is a bug and raises.

- IDLE: no request under way; the timer waits for a head (header_timeout, or
  keepalive_timeout between requests).
- GATING: an ``--preauth oidc`` app's gate looks at the head.
- OPENING: the request waits for its stream's OPEN_OK. Nothing of it is committed yet, so
  a retryable refusal (relay.opening.Opening.retryable, or a reset on a tunnel that died)
  offers it to another connector.
- FORWARDING: the request goes to the backend and its response back (the timer: the
  backend's answer or its 100, or the body clock while a body is read).
- DISCARDING: the edge answered itself; what is left of the request is read and dropped.
- UPGRADED: after a 101 both directions are raw bytes.
- CLOSED: the connection closes (or is gone); nothing more is read or answered.

Requests are answered strictly in order: while one is under way the reader's events of
the next wait in its deque and reading is paused, so at most one read of them is held. A
kept-alive stream serves the next request to the same app (and user); a request of
``RETRY_METHODS`` that found that stream closed before anything of it was answered is
sent again on a new one. The connection closes after an answer when either side says so,
when an HTTP/1.0 body is delimited by the close, when an answer came before the whole
request, or when the relay drains.
"""

from __future__ import annotations

import enum
import logging

from backhaul.config import HttpLimits
from backhaul.protocol.constants import ErrorCode, error_name
from backhaul.relay.http import heads, translate, writer
from backhaul.relay.http.actions import (
    ABORT, CLOSE, COUNT, DONE, END_STREAM, FORGET_STREAM, GATE, HALF_CLOSE, LOG, OPEN, REOPEN, RESET_STREAM, SEND,
    WRITE, WRITE_EOF,
)
from backhaul.relay.http.pacing import P_QUEUE, P_TUNNEL, P_UPGRADE, T_BODY, T_HEAD, T_IDLE, T_NONE, T_RESPONSE, Pacing
from backhaul.relay.http.reader import BODY, CHUNKED, END, HEAD, UPGRADE, HttpError, Request, RequestReader, ResponseReader
from backhaul.relay.opening import Opening
from backhaul.relay.preauth.contract import Allow, Respond


class State(enum.IntEnum):
    IDLE = 0
    GATING = 1
    OPENING = 2
    FORWARDING = 3
    DISCARDING = 4
    UPGRADED = 5
    CLOSED = 6


class Step(enum.IntEnum):
    GATE = 0  # the app is gated: ask the gate
    OPEN = 1  # a new stream is opened for the request
    REUSE = 2  # the kept-alive stream takes the request
    ACCEPT = 3  # the stream's OPEN_OK came
    RETRY = 4  # the stream was refused or turned out closed; another is opened
    ANSWER = 5  # the edge answers the request itself
    FINISH = 6  # the exchange is complete
    SWITCH = 7  # the backend answered 101
    CLOSE = 8  # the connection closes


IDLE, GATING, OPENING, FORWARDING, DISCARDING, UPGRADED, CLOSED = State

#: Where each step leads from each state; anything else is a bug.
TRANSITIONS: dict[State, dict[Step, State]] = {
    IDLE: {Step.GATE: GATING, Step.OPEN: OPENING, Step.REUSE: FORWARDING, Step.ANSWER: DISCARDING, Step.CLOSE: CLOSED},
    GATING: {Step.OPEN: OPENING, Step.REUSE: FORWARDING, Step.ANSWER: DISCARDING, Step.CLOSE: CLOSED},
    OPENING: {Step.ACCEPT: FORWARDING, Step.RETRY: OPENING, Step.ANSWER: DISCARDING, Step.CLOSE: CLOSED},
    FORWARDING: {
        Step.FINISH: IDLE, Step.SWITCH: UPGRADED, Step.RETRY: OPENING, Step.ANSWER: DISCARDING, Step.CLOSE: CLOSED,
    },
    DISCARDING: {Step.FINISH: IDLE, Step.CLOSE: CLOSED},
    UPGRADED: {Step.CLOSE: CLOSED},
    CLOSED: {Step.CLOSE: CLOSED},
}

# The steps as plain names: an Enum member read off its class costs a lookup each time.
_GATE, _OPEN, _REUSE, _ACCEPT, _RETRY, _ANSWER, _FINISH, _SWITCH, _CLOSE = Step

# The link's stream.
L_NONE, L_OPENING, L_OPEN = range(3)

#: Requests resent on a new stream when a kept-alive backend connection turns out closed.
RETRY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class Exchange:
    """One request and its response."""

    __slots__ = (
        "request", "id", "route", "user", "extra", "started", "reused", "retried", "body_sent", "request_done",
        "response_started", "response_done", "rechunk", "close_after", "upgrade_rest", "status", "external_base",
        "external_host", "backend_closes", "continued",
    )

    def __init__(self, request: Request, request_id: str, started: float) -> None:
        self.request = request
        self.id = request_id
        self.route: translate.Route | None = None
        self.user: str | None = None
        self.extra: tuple[tuple[bytes, bytes], ...] = ()
        self.started = started  # (for the DEBUG line of each request: 0.0 when not traced)
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
        # The client may be expected to send the body: it did not ask for 100-continue, or
        # the backend's 100 came, or the body started anyway. Until then the body clock
        # does not run (the client waits for the backend, as it was told it may). HTTP/1.0
        # has no 100: its expectation is ignored (RFC 9110, 10.1.1).
        self.continued = not (request.expect_continue and request.version == "1.1")

    @property
    def can_retry(self) -> bool:
        """Nothing of the request reached the app's answer, and sending it again is safe."""
        request = self.request
        return (
            self.reused
            and not self.retried
            and not self.body_sent
            and not self.response_started
            and self.request_done
            and not request.has_body
            and not request.upgrade
            and request.method in RETRY_METHODS
        )


class ExchangeMachine:
    """One user connection's requests, in order, as a state machine (see the module's text).

    ``site`` is what the machine reads of its edge: ``routes`` (host name -> Route),
    ``closing`` (the relay drains) and ``gate`` (None: gated apps are refused).
    """

    __slots__ = (
        "limits", "site", "scheme", "conn_id", "client_ip", "client", "clock", "can_write_eof", "reader", "events",
        "actions", "state", "ex", "router", "link", "messages", "pacing", "requests", "user_eof", "upgraded", "refusal",
        "trace", "_pumping",
    )

    def __init__(
        self, limits: HttpLimits, site, *, scheme: str, conn_id: str, client_ip: str, client: str, clock,
        can_write_eof: bool = True, trace: bool = True,
    ) -> None:
        self.limits = limits
        self.site = site
        self.scheme = scheme
        self.conn_id = conn_id
        self.client_ip = client_ip
        self.client = client
        self.clock = clock  # seconds, monotonic: the connection's loop time
        self.can_write_eof = can_write_eof  # the user's transport can half-close (not TLS)
        self.trace = trace  # say DONE for each request (the connection logs them at DEBUG)
        self.reader = RequestReader(limits)
        self.events = self.reader.events
        self.actions: list = []
        self.state = IDLE
        self.ex: Exchange | None = None
        self.router = Router(self)  # request heads to apps
        self.link = BackendLink(self)  # the tunnel stream of the moment
        self.messages = Messages(self)  # what goes out on it and comes back
        self.pacing = Pacing(self, limits)  # reading the user's socket, and the timer
        self.requests = 0
        self.user_eof = False
        self.upgraded = False  # a 101 switched the connection to raw bytes (it stays so once CLOSED)
        self.refusal: HttpError | None = None  # the reader refused what follows the queued events
        self._pumping = False
        self.pacing.arm(limits.header_timeout, T_HEAD)

    def move(self, step: Step) -> None:
        try:
            state = self.state = TRANSITIONS[self.state][step]
        except KeyError:
            raise AssertionError(f"the HTTP exchange cannot {step.name} in state {self.state.name}") from None
        if state is CLOSED:
            self.pacing.closed = True

    def log(self, level: int, message: str, extra: dict, exc_info=None) -> None:
        self.actions.extend((LOG, (level, message, extra, exc_info)))

    # ------------------------------------------------------------------ the user's side

    def receive(self, data) -> None:
        """Bytes from the user."""
        state = self.state
        if state is UPGRADED:
            self.actions.extend((SEND, data))
            return
        if state is CLOSED or self.refusal is not None:
            return
        pacing = self.pacing
        if pacing.timer == T_IDLE:
            pacing.timer = T_HEAD
            pacing.due = self.limits.header_timeout
        try:
            self.reader.feed(data)
        except HttpError as exc:
            self.refusal = exc
        self.pump()

    def receive_eof(self) -> bool:
        """The user half-closed; True: keep the connection for the answers still owed."""
        self.user_eof = True
        if self.state is UPGRADED:
            self.link.half_close()
            return True
        ex = self.ex
        events = self.events
        # A client may half-close once its requests are sent; it still gets the answers,
        # then the connection closes.
        return (ex is not None and ex.request_done and not events) or bool(events and events[-1][0] == END)

    def connection_lost(self) -> None:
        busy = self.upgraded or (self.ex is not None and self.state is not DISCARDING)
        self.move(_CLOSE)
        self.pacing.timer = T_NONE
        self.link.drop(graceful=not busy, reason="the user closed the connection")
        self.reader.close()
        self.events.clear()

    def pushback(self, on: bool) -> None:
        """The tunnel stream pushes back (or takes bytes again)."""
        self.pacing.set_paused(P_TUNNEL, on)

    def abort(self, reason: str) -> None:
        """Drop the connection now (its app changed, or the user's request broke mid-way)."""
        self.move(_CLOSE)
        self.pacing.timer = T_NONE
        self.link.drop(graceful=False, reason=reason)
        self.actions.extend((ABORT, reason))

    def close(self) -> None:
        self.move(_CLOSE)
        self.pacing.timer = T_NONE
        self.actions.extend((CLOSE, None))

    def uses(self, route) -> bool:
        """Whether the connection's stream or request is for ``route``."""
        link = self.link
        return (link.state != L_NONE and link.route is route) or (self.ex is not None and self.ex.route is route)

    def close_if_idle(self) -> None:
        """The relay drains: close now unless a request or an upgrade is under way."""
        if self.state is IDLE:
            self.close()

    def pump(self) -> None:
        """Act on the reader's events in order, as far as the current exchange allows."""
        if self._pumping:
            return
        self._pumping = True
        try:
            events = self.events
            while self.state is not CLOSED:
                ex = self.ex
                if not events:
                    if self.refusal is not None and not (ex is not None and ex.request_done):
                        # (else a later request's problem: answer the current one first)
                        error, self.refusal = self.refusal, None
                        self._refuse(error)
                    break
                kind, value = events[0]
                state = self.state
                if kind == HEAD:
                    if ex is not None:
                        break
                    events.popleft()
                    self.router.begin(value)
                elif ex is None:
                    raise AssertionError(f"request event {kind} outside of an exchange")
                elif state is DISCARDING:
                    events.popleft()
                    if kind == END:
                        ex.request_done = True
                        self.exchange_done()
                elif state is not FORWARDING:
                    break
                else:
                    events.popleft()
                    if kind == BODY:
                        ex.body_sent = True
                        if not ex.continued:
                            self.continued(ex)  # it did not wait for the 100
                        self.actions.extend((SEND, writer.chunk(value) if ex.request.framing == CHUNKED else value))
                    elif kind == END:
                        self._request_end(ex)
                    elif kind == UPGRADE:
                        ex.upgrade_rest = value
                        self.pacing.set_paused(P_UPGRADE, True)
        finally:
            self._pumping = False
        if self.state is not CLOSED:
            queued = bool(self.events) or self.refusal is not None
            if queued or self.pacing.paused & P_QUEUE:
                self.pacing.set_paused(P_QUEUE, queued)
        if self.pacing.body.running or self.reader.mid_body:  # (else the body clock has nothing to do)
            self.pacing.body_sync()

    def _refuse(self, error: HttpError) -> None:
        """Answer a request the reader refused (or whose head timed out) and close."""
        self.log(
            logging.INFO, "http request refused",
            {"client": self.client, "conn": self.conn_id, "status": error.status, "reason": error.reason},
        )
        self.actions.extend((COUNT, "http_refused"))
        ex = self.ex
        if ex is not None and (ex.response_started or self.state is FORWARDING):
            # The request was already on its way: its body turned out malformed.
            self.abort(f"malformed request body: {error.reason}")
            return
        request_id = ex.id if ex is not None else f"{self.conn_id}.{self.requests + 1}"
        self.actions.extend((WRITE, writer.local_response(error.status, error.reason, request_id, close=True)))
        self.link.drop(graceful=False, reason="malformed request")
        self.close()

    def answer(self, status: int, message: str, *, close: bool = False, headers=(), body: bytes | None = None) -> None:
        """Answer the current request from the edge."""
        ex = self.ex
        request = ex.request
        self.move(_ANSWER)
        # A body the edge did not read (and a client waiting for 100 may never send) leaves
        # the connection in an unknown state: close it.
        close = (
            close
            or self.site.closing
            or not request.keep_alive
            or request.upgrade
            or (request.has_body and not ex.request_done)
        )
        ex.status = status
        ex.response_started = ex.response_done = True
        self.actions.extend((
            WRITE,
            writer.local_response(
                status, message, ex.id, close=close, headers=headers, body=body, head_only=request.method == "HEAD"
            ),
        ))
        self.log(
            logging.WARNING if status >= 500 else logging.INFO,
            "http request answered by the edge",
            {
                "client": self.client,
                "id": ex.id,
                "host": ex.external_host.decode("ascii", "replace"),
                "app": ex.route.app.name if ex.route else None,
                "status": status,
                "reason": message,
            },
        )
        self.actions.extend((COUNT, "http_edge_answers"))
        if close:
            ex.close_after = True
            self.exchange_done()
        elif ex.request_done:
            self.exchange_done()

    def continued(self, ex: Exchange) -> None:
        """The client of an ``Expect: 100-continue`` may send its body now: the body clock
        takes over from the backend's response_timeout."""
        ex.continued = True
        if self.pacing.timer == T_RESPONSE and not ex.request_done:
            self.pacing.timer = T_NONE

    def _request_end(self, ex: Exchange) -> None:
        if ex.request.framing == CHUNKED:
            self.actions.extend((SEND, writer.LAST_CHUNK))
        ex.request_done = True
        if ex.response_done:
            self.exchange_done()
        elif not ex.response_started:
            pacing = self.pacing
            pacing.timer = T_RESPONSE
            pacing.due = self.limits.response_timeout

    def exchange_done(self) -> None:
        ex = self.ex
        self.ex = None
        self.requests += 1
        if self.trace:
            self.actions.extend((DONE, ex))
        if self.state is CLOSED:
            return
        self.move(_FINISH)
        if ex.close_after or (self.user_eof and not self.events):
            self.close()
            return
        link = self.link
        if link.state != L_NONE and (ex.backend_closes or not link.usable):
            # The next request opens a new stream (and the connector a new connection).
            link.drop(graceful=True, reason="the app closes its connection")
        pacing = self.pacing
        if self.reader.mid_head:
            pacing.timer = T_HEAD
            pacing.due = self.limits.header_timeout
        else:
            pacing.timer = T_IDLE
            pacing.due = self.limits.keepalive_timeout
        if self.events or self.refusal is not None:
            self.pump()
        elif self.pacing.paused & P_QUEUE:
            self.pacing.set_paused(P_QUEUE, False)

    # ------------------------------------------------------------------ time

    def timed_out(self) -> None:
        """The timer ran out (the connection calls this at the deadline Pacing.due last set)."""
        pacing = self.pacing
        kind, pacing.timer = pacing.timer, T_NONE
        if self.state is CLOSED:
            return
        limits = self.limits
        if kind == T_IDLE and not self.reader.mid_head:
            self.close()
        elif kind == T_IDLE or kind == T_HEAD:
            self._refuse(HttpError(408, f"the request head did not arrive within {limits.header_timeout:g} s"))
        elif kind == T_RESPONSE:
            ex = self.ex
            if ex is not None and not ex.response_started:
                self.link.drop(graceful=False, reason="the backend did not answer in time")
                self.answer(504, f"the app did not answer within {limits.response_timeout:g} s", close=True)
        elif kind == T_BODY and pacing.body.running:
            pacing.body_check(self.clock())


class Router:
    """What becomes of a request head: routed by Host to an app, answered by the edge, or
    first shown to the gate (an app published with ``--preauth oidc``)."""

    __slots__ = ("m", "_host")

    def __init__(self, machine: "ExchangeMachine") -> None:
        self.m = machine
        self._host: tuple[bytes, str] = (b"", "")  # the last Host header and its host name

    def begin(self, request: Request) -> None:
        """A request head, in its turn: route it by Host, then gate it or forward it."""
        m = self.m
        m.pacing.timer = T_NONE
        ex = m.ex = Exchange(request, f"{m.conn_id}.{m.requests + 1}", m.clock() if m.trace else 0.0)
        try:
            host = request.host
            if host is None or not request.target.startswith(b"/"):
                host = heads.authority(request)  # (an absolute-form target, or no Host)
            if host == self._host[0]:
                name = self._host[1]
            else:
                name = translate.split_host(host)
                self._host = (host, name)
        except HttpError as exc:
            m.answer(exc.status, exc.reason, close=True)
            return
        ex.external_host = name.encode("ascii")
        ex.external_base = m.scheme.encode("ascii") + b"://" + host
        route = m.site.routes.get(name)
        if route is None:
            m.answer(404, f"no app is published at {name}")
            return
        ex.route = route
        if route.app.preauth == "oidc":
            if m.site.gate is None:
                m.log(logging.WARNING, "oidc app without a gate refused", {"app": route.app.name, "id": ex.id})
                m.answer(503, "pre-authentication is not configured on this relay")
                return
            m.move(_GATE)
            head = heads.gate_head(request, name, m.scheme, m.client_ip, bool(m.limits.underscore_headers))
            m.actions.extend((GATE, (ex, head)))
            return
        m.link.forward(ex)

    def gate_answered(self, ex: Exchange, decision) -> None:
        """The gate's Allow or Respond for ``ex`` (ignored unless ``ex`` still waits for it)."""
        m = self.m
        if m.state is not GATING or m.ex is not ex:
            return
        try:
            if isinstance(decision, Allow):
                ex.extra = heads.identity_headers(decision)
                ex.user = decision.user
                m.link.forward(ex)
            elif isinstance(decision, Respond):
                m.answer(decision.status, "", headers=heads.respond_headers(decision), body=decision.body)
            else:
                raise TypeError(f"the gate answered {decision!r}, not Allow or Respond")
        except (UnicodeError, writer.UnsafeHeader, TypeError) as exc:
            m.log(logging.ERROR, "pre-authentication answered something unusable", {"id": ex.id, "error": str(exc)})
            m.answer(503, "pre-authentication failed; try again later", close=True)
        m.pump()

    def gate_failed(self, ex: Exchange, error: BaseException) -> None:
        m = self.m
        if m.state is not GATING or m.ex is not ex:
            return
        m.log(logging.ERROR, "pre-authentication failed", {"app": ex.route.app.name, "id": ex.id}, error)
        m.answer(503, "pre-authentication failed; try again later", close=True)
        m.pump()


class BackendLink:
    """The connection's tunnel stream of the moment (at most one) and the response coming back on it.

    The stream is opened at a request for an app and kept for the next requests to the same
    app and user, so the connector's connection to the backend lives as long as the user's.
    """

    __slots__ = ("m", "state", "route", "user", "remote_done", "local_done", "resp")

    def __init__(self, machine: ExchangeMachine) -> None:
        self.m = machine
        self.state = L_NONE
        self.route: translate.Route | None = None
        self.user: str | None = None
        self.remote_done = False
        self.local_done = False
        self.resp: ResponseReader | None = None  # the backend's responses, from OPEN_OK on

    @property
    def usable(self) -> bool:
        return self.state == L_OPEN and not self.remote_done and not self.local_done

    def forward(self, ex: Exchange) -> None:
        """Send the routed (and allowed) request: on the kept-alive stream, or on a new one."""
        if self.state != L_NONE and (self.route is not ex.route or self.user != ex.user or not self.usable):
            self.drop(graceful=True, reason="another app")
        if self.state == L_NONE:
            self._open(ex, _OPEN, OPEN)
        else:
            ex.reused = True
            self.m.move(_REUSE)
            self.m.messages.send_head(ex)

    def _open(self, ex: Exchange, step: Step, action: int) -> None:
        self.m.move(step)
        self.state = L_OPENING
        self.route = ex.route
        self.user = ex.user
        self.remote_done = self.local_done = False
        self.m.actions.extend((action, ex))

    def drop(self, graceful: bool, reason: str) -> None:
        """Let the stream go: with its FIN when ``graceful`` and it was accepted, else reset."""
        if self.state == L_NONE:
            return
        accepted = self.state == L_OPEN
        self.state = L_NONE
        self.resp = None
        if graceful and accepted:
            self.m.actions.extend((END_STREAM, None))
        else:
            self.m.actions.extend((RESET_STREAM, reason))

    def half_close(self) -> None:
        """The upgraded user half-closed: so does the stream; both done, the connection closes."""
        if self.state == L_NONE:
            return
        self.local_done = True
        self.m.actions.extend((HALF_CLOSE, None))
        if self.remote_done:
            self.m.close()

    # ------------------------------------------------------------------ stream events

    def open_failed(self, error) -> None:
        """No tunnel took the stream (a relay.opening.CannotOpen)."""
        m = self.m
        self.state = L_NONE
        if m.state is not OPENING:
            return
        group = m.ex.route.app.group
        m.actions.extend((COUNT, "http_no_connector"))
        if error.unreachable:
            message = str(error)
        elif error.attempted:
            message = f"no connector of group {group!r} could take the request; try again"
        else:
            message = f"no connector of group {group!r} is active, so the app cannot be reached"
        m.answer(502, message)
        m.pump()

    def accepted(self) -> None:
        m = self.m
        self.state = L_OPEN
        self.resp = ResponseReader(m.limits)
        if m.state is OPENING:
            m.move(_ACCEPT)
            m.messages.send_head(m.ex)
            m.pump()

    def rejected(self, code: int, reason: str) -> None:
        m = self.m
        self.state = L_NONE
        self.resp = None
        retry = m.state is OPENING and Opening.retryable(code)
        if not retry:
            m.actions.extend((FORGET_STREAM, code))
        if m.state is not OPENING:
            return
        ex = m.ex
        if retry:
            m.log(
                logging.INFO, "stream open refused, retrying on another connector",
                {"id": ex.id, "code": error_name(code), "reason": reason},
            )
            self._open(ex, _RETRY, REOPEN)
        else:
            status = 504 if code == ErrorCode.CONNECT_TIMEOUT else 502
            m.answer(status, f"the connector could not reach the app: {reason}")
        m.pump()

    def reset(self, code: int, reason: str, tunnel_dead: bool) -> None:
        """The stream was reset; ``tunnel_dead``: its tunnel died (Opening.lost_with_tunnel)."""
        if self.state == L_OPENING and self.m.state is OPENING:
            # Before OPEN_OK nothing is committed: a refusal, retried when the tunnel died.
            self.rejected(ErrorCode.PEER_DEAD if tunnel_dead else code, reason)
            return
        # The stream ends with the code it was reset with.
        self.state = L_NONE
        self.resp = None
        self.m.actions.extend((FORGET_STREAM, code))
        self.failed(f"{error_name(code)}: {reason}")
        self.m.pump()

    def broken(self, reason: str) -> None:
        """Sending on the stream failed: it is gone."""
        self.remote_done = self.local_done = True
        self.failed(f"the stream is gone: {reason}")
        self.m.pump()

    def failed(self, reason: str, status: int = 502) -> None:
        """The stream ended or broke without a complete answer to the current request."""
        m = self.m
        state = m.state
        self.drop(graceful=False, reason=reason)
        if state is UPGRADED:
            m.abort(reason)
            return
        if state is not FORWARDING:
            return
        ex = m.ex
        if ex.can_retry:
            # The kept-alive backend connection was closed as the request went out: nothing
            # of it was answered, and it is safe to send again.
            m.log(logging.INFO, "kept-alive backend connection was closed; resending", {"id": ex.id, "reason": reason})
            ex.retried = True
            ex.reused = False
            self._open(ex, _RETRY, OPEN)  # a new stream, counted anew
        elif not ex.response_started:
            m.answer(status, f"the app's connection failed: {reason}", close=True)
        else:
            m.abort(f"the app's response was cut: {reason}")

    def ended(self) -> None:
        """The backend's side of the stream ended."""
        m = self.m
        if self.state == L_OPENING:
            # (the tunnel resets a stream that ends before its OPEN_OK; should one not, it is a refusal)
            self.reset(ErrorCode.PROTOCOL_ERROR, "the stream ended before it was accepted", False)
            return
        self.remote_done = True
        if m.state is UPGRADED:
            if m.can_write_eof:
                m.actions.extend((WRITE_EOF, None))
            if m.user_eof or not m.can_write_eof:
                m.close()
            return
        ex = m.ex
        resp = self.resp
        if m.state is FORWARDING and resp is not None:
            try:
                resp.eof()
            except HttpError as exc:
                self.failed(exc.reason)
                m.pump()
                return
            m.messages.drain(ex)
            if m.ex is ex and m.state is not CLOSED:
                self.failed("the app closed the connection without answering")
                m.pump()
                return
        if self.remote_done:  # (not when the exchange it ended let it go and opened the next)
            self.drop(graceful=True, reason="the app closed the connection")

    def data(self, data) -> None:
        """Bytes from the backend: O(1) work besides parsing them."""
        m = self.m
        if m.state is UPGRADED:
            m.actions.extend((WRITE, data))
            return
        ex = m.ex
        resp = self.resp
        if m.state is not FORWARDING or resp is None:
            self.failed("the app sent bytes no request asked for")
            m.pump()
            return
        try:
            resp.feed(data)
        except HttpError as exc:
            m.messages.drain(ex)
            m.log(logging.WARNING, "bad response from the app", {"id": ex.id, "reason": exc.reason})
            self.failed(exc.reason)
            m.pump()
        else:
            m.messages.drain(ex)

    # ------------------------------------------------------------------ the request and response

class Messages:
    """What goes out on the link and comes back: the request head as the backend gets it,
    and the backend's responses as the user gets them (translated, rechunked, the close
    decision said in the head), up to a 101 that switches the connection to raw bytes."""

    __slots__ = ("m", "_dropped_logged")

    def __init__(self, machine: "ExchangeMachine") -> None:
        self.m = machine
        self._dropped_logged = False  # headers dropped for their "_" are logged once a connection

    def send_head(self, ex: Exchange) -> None:
        m = self.m
        request = ex.request
        dropped: list[bytes] = []
        head = heads.backend_request(
            ex.route, request, m.client_ip, m.scheme, ex.id, ex.extra, bool(m.limits.underscore_headers), dropped
        )
        if dropped:
            self._dropped(ex, dropped)
        m.link.resp.expect(request.method == "HEAD", request.upgrade)
        m.actions.extend((SEND, head))
        if ex.request_done or not ex.continued:
            # The backend has response_timeout to answer, or to say 100 to a client that waits for it.
            m.pacing.arm(m.limits.response_timeout, T_RESPONSE)

    def _dropped(self, ex: Exchange, dropped: list[bytes]) -> None:
        if not self._dropped_logged:
            # Once a connection: a client that sends them sends them with every request.
            self._dropped_logged = True
            self.m.log(
                logging.INFO, "request headers with '_' in their name dropped",
                {
                    "client": self.m.client,
                    "id": ex.id,
                    "app": ex.route.app.name,
                    "headers": [name.decode("latin-1") for name in dropped[:10]],
                },
            )

    def drain(self, ex: Exchange) -> None:
        """Turn the response reader's events into bytes for the user (one write per feed)."""
        m = self.m
        link = m.link
        events = link.resp.events
        out: list[bytes] = []
        while events:
            kind, value = events.popleft()
            if kind == BODY:
                out.append(writer.chunk(value) if ex.rechunk else value)
            elif kind == HEAD:
                self._head(ex, value, out)
            elif kind == END:
                if ex.rechunk:
                    out.append(writer.LAST_CHUNK)
                if out:
                    m.actions.extend((WRITE, b"".join(out)))
                ex.response_done = True
                if events:
                    link.drop(graceful=False, reason="the app sent more than one response")
                if not ex.request_done:
                    # The app answered before the request was complete: the rest of the
                    # request has nowhere to go.
                    ex.close_after = True
                    link.drop(graceful=False, reason="answered before the request was complete")
                m.exchange_done()
                return
            elif kind == UPGRADE:
                if out:
                    m.actions.extend((WRITE, b"".join(out)))
                self._switch(ex, value)
                return
        if out:
            m.actions.extend((WRITE, b"".join(out)))

    def _head(self, ex: Exchange, response, out: list[bytes]) -> None:
        m = self.m
        request = ex.request
        http11 = request.version == "1.1"
        if response.interim:
            if response.status == 100 and not ex.continued:
                m.continued(ex)
                m.pacing.body_sync()
            if http11:
                out.append(heads.interim_response(ex.route, response, ex.external_base, ex.external_host))
            return
        if m.pacing.timer == T_RESPONSE:
            m.pacing.timer = T_NONE
        ex.response_started = True
        if m.pacing.body.running:
            m.pacing.body_sync()  # an early answer: the body is no longer waited for
        ex.status = response.status
        close = (
            ex.close_after
            or not request.keep_alive
            or m.site.closing
            or (request.upgrade and response.status != 101)
            # an answer before the whole request: what is left of the request has nowhere to go
            or not ex.request_done
            or (m.user_eof and not m.events)
        )
        head, close, ex.rechunk = heads.user_response(
            ex.route, response, ex.external_base, ex.external_host, http11, close
        )
        if close and response.status != 101:
            ex.close_after = True
        ex.backend_closes = not response.keep_alive
        out.append(head)

    def _switch(self, ex: Exchange, rest: bytes) -> None:
        """The app answered 101: from now on both directions are piped raw."""
        m = self.m
        m.move(_SWITCH)
        m.upgraded = True
        m.link.resp = None
        m.ex = None
        m.requests += 1
        m.pacing.timer = T_NONE
        m.reader.close()
        m.events.clear()
        if rest:
            m.actions.extend((WRITE, rest))
        if ex.upgrade_rest:
            m.actions.extend((SEND, ex.upgrade_rest))
        m.log(logging.INFO, "http connection upgraded", {"client": m.client, "id": ex.id, "app": ex.route.app.name})
        m.pacing.set_paused(P_QUEUE | P_UPGRADE, False)
