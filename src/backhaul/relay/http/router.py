"""The exchange machine's router: a request head routed by Host, answered by the edge, or gated."""

from __future__ import annotations

import logging

from backhaul.relay.http import heads, translate, writer
from backhaul.relay.http.actions import GATE
from backhaul.relay.http.pacing import T_NONE
from backhaul.relay.http.reader import HttpError, Request
from backhaul.relay.http.states import GATING, S_GATE, Exchange
from backhaul.relay.preauth.contract import Allow, Respond


class Router:
    """What becomes of a request head: routed by Host to an app, answered by the edge, or
    first shown to the gate (an app published with ``--preauth oidc``)."""

    __slots__ = ("m", "_host")

    def __init__(self, machine) -> None:
        self.m = machine  # the ExchangeMachine this part belongs to (it holds the connection's state)
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
            m.move(S_GATE)
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
