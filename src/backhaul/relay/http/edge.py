"""The relay's HTTP edge: published HTTP apps reached by host name (the application proxy).

:class:`HttpEdge` binds the worker's HTTP(S) listeners, admits each user connection (the
worker's descriptor budget, the edge's connection caps in total and per client address)
and keeps the host name -> app table the connections route by. A user connection is one
:class:`~backhaul.relay.http.connection.HttpConnection` over its
:class:`~backhaul.relay.http.exchange.ExchangeMachine`; the edge talks to it only through
its public methods (``uses``, ``abort``, ``close_if_idle``).

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
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Sequence

from backhaul.config import FlowControl, HttpLimits
from backhaul.relay.accept import TlsListener
from backhaul.relay.admission import Admission, Refused
from backhaul.relay.http import translate
from backhaul.relay.http.connection import HttpConnection
from backhaul.relay.metrics import RelayMetrics
from backhaul.relay.opening import StreamOpener
from backhaul.transport.sockets import reuseport_socket

log = logging.getLogger("backhaul.relay.http")


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
        #: how user streams reach a connector (relay.opening)
        self.opener = opener
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
                "https", ssl_context, admission, lambda _tls, slot: HttpConnection(self, scheme, slot.release)
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
                if conn.uses(route):
                    conn.abort(f"app {route.app.name!r} was changed or deleted")

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
            conn.close_if_idle()
