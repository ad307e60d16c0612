"""The HTTP edge's connection state machine, sans-I/O: reader and stream events in, actions out.

Theory of operation. One user connection is one :class:`ExchangeMachine`. It is fed the
user's bytes (:meth:`~ExchangeMachine.receive`, parsed by a
:class:`~backhaul.relay.http.reader.RequestReader` it owns), the events of the tunnel stream
of the moment (its :class:`~backhaul.relay.http.link.BackendLink`: accepted, rejected, data, end, reset), the gate's
answers and the timer running out. It does no I/O and reads no clock but the one it is
given: what it wants done it appends to :attr:`~ExchangeMachine.actions`, a flat list of
``kind, value`` pairs (no tuple per action) that the connection
(:mod:`backhaul.relay.http.connection`) carries out in order and clears.

The machine is in one :class:`~backhaul.relay.http.states.State` at a time and moves only
along :data:`~backhaul.relay.http.states.TRANSITIONS`
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

One source, two builds: run as plain Python this module is the pure twin; Cython compiles
the very same file (ext/backhaul/relay/http/_exchange_c.py is a symlink to it) with the
types of ext/backhaul/relay/http/_exchange_c.pxd (ExchangeMachine a cdef class, its
per-request steps C calls). ``backhaul.relay.http.exchange`` picks one. The machine's
parts (router, link, messages, pacing) stay Python: they run once a request or less and
call the machine through its public methods and fields.
"""

from __future__ import annotations

import logging

import cython

from backhaul.config import HttpLimits
from backhaul.relay.http import writer
from backhaul.relay.http.actions import ABORT, CLOSE, COUNT, DONE, LOG, SEND, WRITE
from backhaul.relay.http.link import BackendLink
from backhaul.relay.http.messages import Messages
from backhaul.relay.http.pacing import P_QUEUE, P_TUNNEL, P_UPGRADE, T_BODY, T_HEAD, T_IDLE, T_NONE, T_RESPONSE, Pacing
from backhaul.relay.http.reader import BODY, CHUNKED, END, HEAD, UPGRADE, HttpError, RequestReader
from backhaul.relay.http.router import Router
from backhaul.relay.http.states import (
    CLOSED, DISCARDING, FORWARDING, IDLE, L_NONE, S_ANSWER, S_CLOSE, S_FINISH, TRANSITIONS, UPGRADED, Exchange,
    Step,
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

    def move(self, step):  # (Step)
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

    @cython.wraparound(True)  # (events[-1]: the build turns wraparound off, and a deque needs it)
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
        self.move(S_CLOSE)
        self.pacing.timer = T_NONE
        self.link.drop(graceful=not busy, reason="the user closed the connection")
        self.reader.close()
        self.events.clear()

    def pushback(self, on: bool) -> None:
        """The tunnel stream pushes back (or takes bytes again)."""
        self.pacing.set_paused(P_TUNNEL, on)

    def abort(self, reason: str) -> None:
        """Drop the connection now (its app changed, or the user's request broke mid-way)."""
        self.move(S_CLOSE)
        self.pacing.timer = T_NONE
        self.link.drop(graceful=False, reason=reason)
        self.actions.extend((ABORT, reason))

    def close(self):
        self.move(S_CLOSE)
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

    def pump(self):
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

    def _refuse(self, error):  # (HttpError)
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
        self.move(S_ANSWER)
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

    def continued(self, ex):  # (Exchange)
        """The client of an ``Expect: 100-continue`` may send its body now: the body clock
        takes over from the backend's response_timeout."""
        ex.continued = True
        if self.pacing.timer == T_RESPONSE and not ex.request_done:
            self.pacing.timer = T_NONE

    def _request_end(self, ex):  # (Exchange)
        if ex.request.framing == CHUNKED:
            self.actions.extend((SEND, writer.LAST_CHUNK))
        ex.request_done = True
        if ex.response_done:
            self.exchange_done()
        elif not ex.response_started:
            pacing = self.pacing
            pacing.timer = T_RESPONSE
            pacing.due = self.limits.response_timeout

    def exchange_done(self):
        ex = self.ex
        self.ex = None
        self.requests += 1
        if self.trace:
            self.actions.extend((DONE, ex))
        if self.state is CLOSED:
            return
        self.move(S_FINISH)
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
