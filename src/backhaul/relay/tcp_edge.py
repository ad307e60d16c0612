"""The relay's TCP edge: published TCP apps' ports, where each user connection becomes a stream.

Nothing a user sends goes up a tunnel until a connector has accepted the stream (the
pipe holds its first read and stops reading). That keeps the open retryable: when a
connector refuses or vanishes before OPEN_OK, nothing of the user's bytes has been
committed, so the open is tried again on another connector (relay.opening says which
refusals are retried, on how many tunnels).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from backhaul.config import FlowControl
from backhaul.protocol.constants import ErrorCode, error_name
from backhaul.relay.admission import Admission, Refused
from backhaul.relay.metrics import RelayMetrics
from backhaul.relay.opening import CannotOpen, Opening, StreamOpener, reconcile_listeners
from backhaul.transport.pipe import Pipe
from backhaul.transport.sockets import reuseport_socket

log = logging.getLogger("backhaul.relay.edge")


def _stream_done(pipe: "UserPipe") -> None:
    """The pipe's on_done: its stream counted out of the metrics."""
    if pipe.opening is not None:
        pipe.opening.done()


class UserPipe(Pipe):
    """A user's connection to a TCP app; opens its stream through the app's group."""

    __slots__ = ("app", "opener", "metrics", "opening", "admission", "_accepted", "_route_wait")

    def __init__(
        self, app, opener: StreamOpener, flow: FlowControl, buffer: memoryview, metrics: RelayMetrics
    ) -> None:
        labels = {"app": app.name, "target": app.target, "id": secrets.token_hex(8)}
        super().__init__(flow, labels, buffer, on_done=_stream_done)
        self.app = app
        self.opener = opener
        self.metrics = metrics
        self.opening: Opening | None = None  # made when the connection is (it names the client)
        self._accepted = False  # a connector has connected the target: no retry after this
        #: the worker's connection budget this connection counts in (released when it closes)
        self.admission: Admission | None = None
        #: the next try of an open that found no route yet (relay.opening: a connector re-homing)
        self._route_wait: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        labels = self.labels
        labels["client"] = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.metrics.count("connections")
        self.opening = self.opener.begin(self.app, "tcp", labels["client"], labels["id"], figures=self)
        self._open()

    def _open(self) -> None:
        self._route_wait = None
        if self.result is not None:
            return  # the user went away while the stream waited for a route
        try:
            self.stream_id = self.opening.open(self)
        except CannotOpen as exc:
            if exc.retry_after:
                self._route_wait = asyncio.get_running_loop().call_later(exc.retry_after, self._open)
                return
            self.metrics.count("refused")
            if exc.unreachable or not exc.attempted:
                reason = str(exc)  # routing's own words: no active connector, or none reaches the app
            else:
                reason = f"no active connector in group {self.app.group!r} could take the stream"
            self.finish(reason, abort=False, code=ErrorCode.REFUSED_STREAM)
            self.transport.close()
            return
        self.tunnel = self.opening.tunnel

    def connection_lost(self, exc: Exception | None) -> None:
        if self._route_wait is not None:
            self._route_wait.cancel()
            self._route_wait = None
        super().connection_lost(exc)
        if self.admission is not None:
            self.admission.release()
            self.admission = None

    def on_accepted(self) -> None:
        self._accepted = True
        self.opening.accepted()
        super().on_accepted()

    def on_rejected(self, code: int, reason: str) -> None:
        if self.opening.retryable(code) and self.result is None:
            log.info(
                "stream open refused, retrying on another connector",
                extra={**self.labels, "code": error_name(code), "reason": reason},
            )
            self.tunnel = None
            self.stream_id = 0
            self._open()
            return
        self.metrics.count("failed")
        self.finish(f"open refused by the connector: {error_name(code)}: {reason}", code=code)
        self.transport.close()

    def on_reset(self, code: int, reason: str) -> None:
        if self.opening.lost_with_tunnel(self._accepted):
            # The tunnel died before the target answered: nothing is committed yet.
            self.on_rejected(ErrorCode.PEER_DEAD, reason)
            return
        super().on_reset(code, reason)


class TcpApp:
    """One published TCP app's listener in this worker."""

    def __init__(self, app, server: asyncio.AbstractServer) -> None:
        self.app = app
        self.server = server

    @classmethod
    async def start(cls, app, edge: "TcpEdge") -> "TcpApp":
        loop = asyncio.get_running_loop()
        sock = reuseport_socket(edge.host, app.port)
        opener, flow, buffer, metrics, admission = edge.opener, edge.flow, edge.buffer, edge.metrics, edge.admission

        def accept() -> asyncio.Protocol:
            # A plain TCP accept calls connection_made right after this, and connection_lost
            # follows every connection_made: the pipe releases what it takes here.
            if admission is None:
                return UserPipe(app, opener, flow, buffer, metrics)
            if not admission.admit("tcp_app"):
                return Refused()
            pipe = UserPipe(app, opener, flow, buffer, metrics)
            pipe.admission = admission
            return pipe

        server = await loop.create_server(accept, sock=sock, backlog=4096)
        log.info("tcp app listening", extra={"app": app.name, "port": app.port, "target": app.target})
        return cls(app, server)

    async def stop(self) -> None:
        self.server.close()
        log.info("tcp app stopped", extra={"app": self.app.name, "port": self.app.port})


class TcpEdge:
    """Every published TCP app's listener of this worker (a relay.opening.Edge).

    Connections already made outlive their app's listener: a changed or removed app stops
    taking users, and its streams end on their own.
    """

    def __init__(
        self,
        opener: StreamOpener,
        host: str,
        flow: FlowControl,
        buffer: memoryview,
        metrics: RelayMetrics,
        admission: Admission | None = None,
    ) -> None:
        self.opener = opener
        self.host = host  # the address every app port is bound on
        self.flow = flow
        #: the read buffer every user socket of this process is read into (see transport.pipe)
        self.buffer = buffer
        self.metrics = metrics
        #: the worker's connection budget (None: not counted, as in unit tests)
        self.admission = admission
        self.apps: dict[str, TcpApp] = {}

    async def start(self) -> None:
        """Nothing to bind before the apps are known (set_apps binds their ports)."""

    async def set_apps(self, apps: list) -> None:
        """Listen on exactly the TCP apps among ``apps``: a changed app's listener is started again."""
        await reconcile_listeners(self.apps, apps, "tcp", lambda app: TcpApp.start(app, self))

    async def stop(self) -> None:
        for running in list(self.apps.values()):
            await running.stop()
        self.apps.clear()
