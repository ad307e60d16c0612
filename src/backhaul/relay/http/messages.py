"""The exchange machine's messages: request heads to the backend, responses back to the user."""

from __future__ import annotations

import logging

from backhaul.relay.http import heads, writer
from backhaul.relay.http.actions import SEND, WRITE
from backhaul.relay.http.pacing import P_QUEUE, P_UPGRADE, T_NONE, T_RESPONSE
from backhaul.relay.http.reader import BODY, END, HEAD, UPGRADE
from backhaul.relay.http.states import S_SWITCH, Exchange


class Messages:
    """What goes out on the link and comes back: the request head as the backend gets it,
    and the backend's responses as the user gets them (translated, rechunked, the close
    decision said in the head), up to a 101 that switches the connection to raw bytes."""

    __slots__ = ("m", "_dropped_logged")

    def __init__(self, machine) -> None:
        self.m = machine  # the ExchangeMachine this part belongs to (it holds the connection's state)
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
        m.move(S_SWITCH)
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
