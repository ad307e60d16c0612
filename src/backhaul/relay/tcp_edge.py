"""The relay's TCP edge: a published TCP app's port, where each user connection becomes a stream.

Nothing a user sends goes up a tunnel until a connector has accepted the stream (the
pipe holds its first read and stops reading). That keeps the open retryable: when a
connector refuses or vanishes before OPEN_OK, nothing of the user's bytes has been
committed, so the open is tried again on another connector.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from backhaul.config import FlowControl
from backhaul.protocol.constants import RETRYABLE_OPEN_FAILURES, ErrorCode, error_name
from backhaul.protocol.mux import SessionError, stream_meta
from backhaul.relay.admission import Admission, Refused
from backhaul.relay.metrics import RelayMetrics
from backhaul.relay.routing import NoRoute, TunnelRegistry
from backhaul.transport.pipe import Pipe
from backhaul.transport.sockets import reuseport_socket
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.relay.edge")

#: How many connectors one user connection is offered to before it is refused.
OPEN_ATTEMPTS = 3


class UserPipe(Pipe):
    """A user's connection to a TCP app; opens its stream through the app's group."""

    __slots__ = ("app", "registry", "stats", "metrics", "admission", "_tried", "_accepted")

    def __init__(
        self, app, registry: TunnelRegistry, flow: FlowControl, buffer: memoryview, stats: dict, metrics: RelayMetrics | None = None
    ) -> None:
        labels = {"app": app.name, "target": app.target, "id": secrets.token_hex(8)}
        super().__init__(flow, labels, buffer, on_done=metrics.stream_done if metrics is not None else None)
        self.metrics = metrics
        self.app = app
        self.registry = registry
        self.stats = stats
        self._tried: list[Tunnel] = []  # tunnels offered this stream, so a retry goes elsewhere
        self._accepted = False  # a connector has connected the target: no retry after this
        #: the worker's connection budget this connection counts in (released when it closes)
        self.admission: Admission | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.labels["client"] = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.stats["connections"] = self.stats.get("connections", 0) + 1
        if self.metrics is not None:
            self.metrics.stream_started(self)
        self._open()

    def _open(self) -> None:
        reason = None
        while len(self._tried) < OPEN_ATTEMPTS:
            try:
                tunnel = self.registry.pick(self.app.group, self._tried, app=self.app.name)
            except NoRoute as exc:
                reason = str(exc)
                break
            self._tried.append(tunnel)
            meta = stream_meta(
                self.app.name, self.app.target, "tcp", self.labels["client"], self.labels["id"]
            )
            try:
                self.stream_id = tunnel.open(meta, self)
            except SessionError:
                continue
            self.tunnel = tunnel
            return
        self.stats["refused"] = self.stats.get("refused", 0) + 1
        self.finish(
            reason or f"no active connector in group {self.app.group!r} could take the stream",
            abort=False,
            code=ErrorCode.REFUSED_STREAM,
        )
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.admission is not None:
            self.admission.release()
            self.admission = None

    def on_accepted(self) -> None:
        self._accepted = True
        if self.metrics is not None:
            self.metrics.stream_accepted(self)
        super().on_accepted()

    def on_rejected(self, code: int, reason: str) -> None:
        if code in RETRYABLE_OPEN_FAILURES and self.result is None:
            log.info(
                "stream open refused, retrying on another connector",
                extra={**self.labels, "code": error_name(code), "reason": reason},
            )
            self.tunnel = None
            self.stream_id = 0
            self._open()
            return
        self.stats["failed"] = self.stats.get("failed", 0) + 1
        self.finish(f"open refused by the connector: {error_name(code)}: {reason}", code=code)
        self.transport.close()

    def on_reset(self, code: int, reason: str) -> None:
        if not self._accepted and self.tunnel is not None and self.tunnel.session.closed:
            # The tunnel died before the target answered: nothing is committed yet. (The session
            # resets its streams before the tunnel hears it has failed, so ask the session.)
            self.on_rejected(ErrorCode.PEER_DEAD, reason)
            return
        super().on_reset(code, reason)


class TcpApp:
    """One published TCP app's listener in this worker."""

    def __init__(self, app, server: asyncio.AbstractServer) -> None:
        self.app = app
        self.server = server

    @classmethod
    async def start(
        cls, app, host: str, registry: TunnelRegistry, flow: FlowControl, buffer: memoryview, stats: dict,
        metrics: RelayMetrics | None = None, admission: Admission | None = None,
    ) -> "TcpApp":
        loop = asyncio.get_running_loop()
        sock = reuseport_socket(host, app.port)

        def accept() -> asyncio.Protocol:
            # A plain TCP accept calls connection_made right after this, and connection_lost
            # follows every connection_made: the pipe releases what it takes here.
            if admission is None:
                return UserPipe(app, registry, flow, buffer, stats, metrics)
            if not admission.admit("tcp_app"):
                return Refused()
            pipe = UserPipe(app, registry, flow, buffer, stats, metrics)
            pipe.admission = admission
            return pipe

        server = await loop.create_server(accept, sock=sock, backlog=4096)
        log.info("tcp app listening", extra={"app": app.name, "port": app.port, "target": app.target})
        return cls(app, server)

    async def stop(self) -> None:
        self.server.close()
        log.info("tcp app stopped", extra={"app": self.app.name, "port": self.app.port})
