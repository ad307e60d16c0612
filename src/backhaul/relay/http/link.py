"""The exchange machine's backend link: the connection's tunnel stream of the moment and its events."""

from __future__ import annotations

import logging

from backhaul.protocol.constants import ErrorCode, error_name
from backhaul.relay.http import translate
from backhaul.relay.http.actions import (
    COUNT, END_STREAM, FORGET_STREAM, HALF_CLOSE, OPEN, REOPEN, RESET_STREAM, WRITE, WRITE_EOF,
)
from backhaul.relay.http.reader import HttpError, ResponseReader
from backhaul.relay.http.states import (
    CLOSED, FORWARDING, L_NONE, L_OPEN, L_OPENING, OPENING, S_ACCEPT, S_OPEN, S_RETRY, S_REUSE, UPGRADED,
    Exchange, Step,
)
from backhaul.relay.opening import Opening


class BackendLink:
    """The connection's tunnel stream of the moment (at most one) and the response coming back on it.

    The stream is opened at a request for an app and kept for the next requests to the same
    app and user, so the connector's connection to the backend lives as long as the user's.
    """

    __slots__ = ("m", "state", "route", "user", "remote_done", "local_done", "resp")

    def __init__(self, machine) -> None:
        self.m = machine  # the ExchangeMachine this part belongs to (it holds the connection's state)
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
            self._open(ex, S_OPEN, OPEN)
        else:
            ex.reused = True
            self.m.move(S_REUSE)
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
            m.move(S_ACCEPT)
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
            self._open(ex, S_RETRY, REOPEN)
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
            self._open(ex, S_RETRY, OPEN)  # a new stream, counted anew
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
