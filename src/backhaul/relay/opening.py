"""How every edge of the relay opens a tunnel stream, and the contract the worker runs edges by.

Theory of operation. A user's TCP connection, UDP flow or HTTP request becomes one tunnel
stream to a connector of its app's group. The edge holds the user's bytes until the
connector answers OPEN_OK, so until then nothing is committed and the open may be offered
to another connector:

- an OPEN_FAIL whose code is in ``RETRYABLE_OPEN_FAILURES`` (the connector is full,
  draining, failing, or its tunnel died) is retried;
- an RST before OPEN_OK on a tunnel whose session has closed is the same thing as a
  PEER_DEAD refusal: the session resets its streams before the tunnel hears it failed,
  so :meth:`Opening.lost_with_tunnel` asks the session;
- a stream is offered to at most ``attempts`` tunnels (connectors first, see
  ``TunnelRegistry.pick``), then the edge refuses the user with the reason.

A stream is opened on a tunnel of this worker when the group has a usable one (a local
tunnel is always preferred); when it has none left to try, on a relay-to-relay link to a
node that holds the group's tunnels (``StreamOpener.peers``, relay.peering): a link is a
``Tunnel`` too, speaking the same protocol, so an edge cannot tell and needs no change. The
far node opens the stream on one of its own tunnels (relay.bridge) and answers as a
connector would, so its refusals are retried by the same rules, and ``attempts`` counts
links and tunnels alike. A stream opened for a peer (``forward=False``) is only ever offered
to local tunnels: streams are forwarded at most once, so they cannot loop.

With several nodes there is a moment when no node has a route: the node holding a group's
tunnels died, and its connectors have not yet dialed another one, or this node's next poll
has not yet seen where they went. A stream that finds no route at all then is not refused at
once: ``CannotOpen.retry_after`` tells the edge to try again shortly, for at most
``PeeringLimits.route_wait`` from the stream's start, while the user's bytes wait unsent
(only when the store lists other nodes, and only while every tunnel the stream was offered
is dead: a live connector's refusal is final as before).

An :class:`Opening` is the per-stream part: the tunnels tried, the metric hooks of the
stream as the user sees it (one stream however many opens it took). A
:class:`StreamOpener` is the per-worker part every edge shares: the registry, the peer
links, the attempt count, the metrics.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Protocol

from backhaul.config import PeeringLimits
from backhaul.errors import ConfigError
from backhaul.protocol.constants import RETRYABLE_OPEN_FAILURES
from backhaul.protocol.mux import SessionError, stream_meta
from backhaul.relay.routing import NoRoute, TunnelRecord, TunnelRegistry

if TYPE_CHECKING:
    from backhaul.relay.metrics import RelayMetrics
    from backhaul.transport.tunnel import StreamEndpoint, Tunnel

log = logging.getLogger("backhaul.relay.edge")

#: How many tunnels one user stream is offered to before the user is refused.
OPEN_ATTEMPTS = 3

# How far an Opening's metric hooks have counted its stream.
_NEW, _STARTED, _ACCEPTED, _DONE = range(4)


class Edge(Protocol):
    """What the worker runs each kind of user-facing listener by (TCP apps, UDP apps, HTTP)."""

    async def start(self) -> None:
        """Bind what the edge serves from the start (the HTTP ports; app edges bind in set_apps)."""

    async def set_apps(self, apps: list) -> None:
        """Serve exactly these apps (all of the store's; the edge keeps its own kind)."""

    async def stop(self) -> None:
        """Stop accepting users and close what the edge holds."""


async def reconcile_listeners(running: dict, apps: list, proto: str, start: Callable[[Any], Awaitable[Any]]) -> None:
    """Bring ``running`` (app name -> a listener with ``.app`` and ``async stop()``) in line
    with the ``proto`` apps among ``apps``: what changed or went is stopped, what is new is
    started by ``start(app)``. An app whose port cannot be bound is logged and left out (the
    next reload tries again); the others are served."""
    wanted = {app.name: app for app in apps if app.proto == proto}
    for name, listener in list(running.items()):
        if wanted.get(name) != listener.app:
            await listener.stop()
            del running[name]
    for name, app in wanted.items():
        if name not in running:
            try:
                running[name] = await start(app)
            except (ConfigError, OSError) as exc:
                log.error(f"cannot start {proto} app", extra={"app": name, "port": app.port, "error": str(exc)})


class PeerRoutes(Protocol):
    """What the opener asks of the worker's relay-to-relay links (relay.peering.PeerLinks)."""

    def pick(self, group: str, exclude: list) -> "Tunnel | None":
        """A link to a node holding a usable tunnel of ``group``, not one in ``exclude``; None if none."""

    #: whether the store lists other nodes (where a route may turn up while a stream waits)
    clustered: bool


class StreamFigures(Protocol):
    """What RelayMetrics reads of one user stream (a Pipe has these attributes)."""

    labels: dict
    started: float
    bytes_up: int
    bytes_down: int
    code: int


class CannotOpen(Exception):
    """No tunnel took the stream; ``str()`` is a reason a user or operator can act on."""

    def __init__(self, reason: str, unreachable: bool = False, attempted: int = 0, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        #: the group has usable tunnels, but their connectors reported the app's origin down
        self.unreachable = unreachable
        #: how many tunnels were offered the stream and refused or failed it
        self.attempted = attempted
        #: seconds after which the edge should call ``Opening.open`` again, since a route may
        #: appear by then (a connector re-homing between nodes); 0: the refusal is final
        self.retry_after = retry_after


class Opening:
    """One user stream's way to a connector: which tunnels were tried, which one holds it."""

    __slots__ = (
        "opener", "app", "proto", "client", "stream_label", "extra", "figures", "forward", "tried", "tunnel", "counted",
        "route_deadline",
    )

    def __init__(
        self, opener: "StreamOpener", app, proto: str, client: str, stream_label: str, extra: dict, figures,
        forward: bool = True,
    ) -> None:
        self.opener = opener  # the worker's shared part
        self.app = app  # the store's App record the stream is for
        self.proto = proto  # "tcp", "udp" or "http": how the connector serves the stream
        self.client = client  # the user's address, as the connector logs it
        self.stream_label = stream_label  # the id the connector's log line carries (request id for HTTP)
        self.extra = extra  # more OPEN metadata (the signed-in user of an HTTP app)
        self.figures = figures  # what the metrics count of the stream, or None (not counted)
        #: may go through a peer node (False: a stream a peer forwarded here, local tunnels only)
        self.forward = forward
        self.tried: list[Tunnel] = []  # tunnels and links offered this stream, so a retry goes elsewhere
        self.tunnel: Tunnel | None = None  # the tunnel of the open under way or accepted
        #: how far the metrics have counted the stream (_NEW, _STARTED, _ACCEPTED, _DONE): each
        #: hook counts once per user stream, whatever retries, failovers or late events follow
        self.counted = _NEW
        #: until when a stream with no route at all waits for one (0: it never waits, as
        #: with one node, where no other node's connectors can turn up)
        peers = opener.peers
        self.route_deadline = opener.clock() + opener.route_wait if forward and peers is not None and peers.clustered else 0.0

    def open(self, endpoint: "StreamEndpoint") -> int:
        """Open the stream on the next tunnel; returns its stream id, or raises CannotOpen."""
        app = self.app
        opener = self.opener
        registry = opener.registry
        peers = opener.peers if self.forward else None
        unreachable = False
        while len(self.tried) < opener.attempts:
            try:
                tunnel = registry.pick(app.group, self._local_tried() if peers is not None else self.tried, app=app.name)
            except NoRoute as exc:
                # No local tunnel left to try: a node that holds one of the group's, if any.
                tunnel = peers.pick(app.group, self.tried) if peers is not None else None
                if tunnel is None:
                    unreachable = exc.unreachable
                    if not unreachable:
                        retry = self._route_retry()
                        if retry:
                            raise CannotOpen(str(exc), False, len(self.tried), retry) from None
                    if not self.tried or unreachable:
                        raise CannotOpen(str(exc), unreachable, len(self.tried)) from None
                    break
            self.tried.append(tunnel)
            meta = stream_meta(app.name, app.target, self.proto, self.client, self.stream_label, **self.extra)
            try:
                stream_id = tunnel.open(meta, endpoint)
            except SessionError:
                continue  # the tunnel closed or is draining since the registry looked: the next one
            self.tunnel = tunnel
            return stream_id
        self.tunnel = None
        raise CannotOpen(
            f"no connector of group {app.group!r} could take the stream; try again",
            unreachable,
            len(self.tried),
        )

    def _route_retry(self) -> float:
        """Seconds until the next try of a stream that found no route, or 0: it has waited
        its ``route_wait``, or a tunnel it was offered is alive and refused it (a full or
        draining connector is a refusal to pass on, not a route still to come). The tunnels
        tried stay tried, so the stream is still offered to at most ``attempts``."""
        left = self.route_deadline - self.opener.clock()
        if left <= 0 or not all(t.session.closed for t in self.tried):
            return 0.0
        return min(self.opener.route_retry, left)

    def _local_tried(self) -> list:
        """The tunnels of this worker among those tried (routing knows nothing of links)."""
        return [t for t in self.tried if isinstance(t.info, TunnelRecord)]

    @staticmethod
    def retryable(code: int) -> bool:
        """Whether an OPEN_FAIL with ``code`` may be offered to another connector."""
        return code in RETRYABLE_OPEN_FAILURES

    def lost_with_tunnel(self, accepted: bool) -> bool:
        """Whether an RST of the stream is its tunnel dying before OPEN_OK (a retryable refusal)."""
        return not accepted and self.tunnel is not None and self.tunnel.session.closed

    def restart(self, exclude: Iterable["Tunnel"] = ()) -> None:
        """Start the tries over (a flow whose tunnel went away, a request resent on a new
        stream), skipping ``exclude``."""
        self.tried = list(exclude)
        self.tunnel = None

    # ------------------------------------------------------------------ metric hooks

    def started(self) -> None:
        if self.counted != _NEW:
            return
        self.counted = _STARTED
        metrics = self.opener.metrics
        if metrics is not None and self.figures is not None:
            metrics.stream_started(self.figures)

    def accepted(self) -> None:
        """Count the first OPEN_OK (the open latency); a flow accepted again after a failover is not."""
        if self.counted != _STARTED:
            return
        self.counted = _ACCEPTED
        metrics = self.opener.metrics
        if metrics is not None and self.figures is not None:
            metrics.stream_accepted(self.figures)

    def done(self, code: int | None = None) -> None:
        """Count the stream out (once); ``code`` becomes its end code unless it already has one."""
        if self.counted in (_NEW, _DONE):
            return
        self.counted = _DONE
        figures = self.figures
        if figures is None:
            return
        if code is not None and not figures.code:
            figures.code = code
        metrics = self.opener.metrics
        if metrics is not None:
            metrics.stream_done(figures)


class StreamOpener:
    """The part of opening streams every edge of one worker shares."""

    __slots__ = ("registry", "metrics", "attempts", "peers", "route_wait", "route_retry", "clock")

    def __init__(
        self,
        registry: TunnelRegistry,
        metrics: "RelayMetrics | None" = None,
        attempts: int = OPEN_ATTEMPTS,
        peers: PeerRoutes | None = None,
        limits: PeeringLimits = PeeringLimits(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry  # the worker's live tunnels by connector and group
        self.metrics = metrics  # the worker's figures (None: not counted, as in unit tests)
        self.attempts = attempts  # tunnels (and peer links) one stream is offered to
        #: the worker's links to other relay nodes (None: one node, or no node certificate)
        self.peers = peers
        #: how long a stream with no route waits for one, and how often it looks (PeeringLimits)
        self.route_wait = limits.route_wait
        self.route_retry = limits.route_retry
        self.clock = clock  # monotonic seconds (a fake one in unit tests)

    def begin(
        self, app, proto: str, client: str, stream_label: str, figures=None, forward: bool = True, **extra
    ) -> Opening:
        """The opening of one user stream; counted as started in the metrics when ``figures`` is given.

        ``forward=False``: a stream a peer node forwarded here, offered to local tunnels only.
        """
        opening = Opening(self, app, proto, client, stream_label, extra, figures, forward)
        opening.started()
        return opening
