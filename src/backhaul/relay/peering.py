"""Relay-to-relay links: how a worker reaches the connectors whose tunnels another node holds.

Theory of operation. With several relay nodes, a user may reach node A for an app whose
connectors hold tunnels only on node B. A then carries the stream over a *link*: one more
TLS connection to B's listen port, with ALPN ``backhaul-peer/1``, authenticated both ways by
the nodes' own certificates from the service CA (a node certificate names its node id,
pki.node_id_of; A checks B's host name and that the certificate names the node it meant to
dial, B accepts only a certificate that names a node). It carries the ordinary tunnel
protocol (protocol/mux.py over transport.tunnel.Tunnel): A plays the relay's part (it opens
streams), B the connector's (it accepts them, relay.bridge), so an edge opening a stream on a
link cannot tell it from a connector's tunnel (relay.opening).

:class:`PeerDirectory` says which nodes hold usable tunnels of which group and where they
are dialed; the worker fills it from the store (``group_nodes``, ``list_nodes``) on every
poll. :class:`PeerLinks` holds this worker's links: at most one dialed link per peer node,
made on the first stream that needs it. Streams may be opened on a link at once: their OPEN
frames wait in its session until the handshake is done (``LinkTunnel``), and a dial that
fails resets them as a dead tunnel does, so the edges retry them elsewhere. A node whose dial
failed or whose link was lost is not dialed again before a backoff (PeeringLimits) has passed,
so a dead node costs one failed dial per period, not one per user. Links B accepted from other
nodes are held here too, bounded by ``PeeringLimits.max_accepted``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from backhaul import pki, tlsconfig
from backhaul.config import ClusterSettings, FlowControl, Keepalive, PeeringLimits
from backhaul.errors import ConfigError
from backhaul.protocol import mux
from backhaul.protocol.constants import ErrorCode
from backhaul.relay import bridge
from backhaul.transport.sockets import parse_hostport
from backhaul.transport.tunnel import Tunnel

if TYPE_CHECKING:
    from backhaul.relay.metrics import RelayMetrics
    from backhaul.relay.opening import StreamOpener

log = logging.getLogger("backhaul.relay.peering")


def local_node_id(data_dir: str | Path) -> str | None:
    """The node id this data dir's service certificate names, or None (a data dir from before
    node ids: the relay is one node and neither dials nor accepts links)."""
    path = Path(data_dir) / "service.pem"
    if not path.is_file():
        return None
    return pki.node_id_of(pki.load_cert_file(path))


class PeerDirectory:
    """Which other nodes hold usable tunnels of each group, and the address each is dialed at."""

    def __init__(self, node_id: str, max_nodes: int = ClusterSettings.max_nodes) -> None:
        self.node_id = node_id  # this node: never a peer of itself
        self.max_nodes = max_nodes
        self._groups: dict[str, list[str]] = {}
        self._addresses: dict[str, str] = {}

    def update(self, group_nodes: dict[str, list[str]], addresses: dict[str, str]) -> None:
        """Replace what is known: ``group_nodes`` (group -> node ids holding a usable tunnel of
        it, the store's ``group_nodes``) and ``addresses`` (node id -> "HOST:PORT" its peers
        dial, the up nodes of ``list_nodes``). This node, nodes without an address and nodes
        beyond ``max_nodes`` are left out (the store lists no more; a longer list is a bug)."""
        known: dict[str, str] = {}
        for node_id, address in addresses.items():
            if node_id == self.node_id or not isinstance(address, str):
                continue
            if len(known) >= self.max_nodes:
                log.warning("more peer nodes than the limit; the others are ignored", extra={"limit": self.max_nodes})
                break
            known[node_id] = address
        self._addresses = known
        self._groups = {
            group: [n for n in nodes if n in known] for group, nodes in group_nodes.items() if any(n in known for n in nodes)
        }

    def peers_for(self, group: str) -> list[tuple[str, str]]:
        """The (node id, "HOST:PORT") of every other node holding a usable tunnel of ``group``."""
        addresses = self._addresses
        return [(node_id, addresses[node_id]) for node_id in self._groups.get(group, ())]

    def address(self, node_id: str) -> str | None:
        return self._addresses.get(node_id)

    def nodes(self) -> set[str]:
        return set(self._addresses)


class PeerLink:
    """What a worker keeps about one link: ``Tunnel.info`` of a link."""

    __slots__ = ("node_id", "address", "dialed", "listen_slot")

    def __init__(self, node_id: str, address: str | None, dialed: bool, listen_slot=None) -> None:
        self.node_id = node_id  # the node at the other end
        self.address = address  # where it was dialed (None: it dialed us)
        self.dialed = dialed  # this worker opens streams on it (False: the peer does)
        #: the listen port's place an accepted link holds (relay.accept.Slot), released when it ends
        self.listen_slot = listen_slot

    def __repr__(self) -> str:
        return f"PeerLink({self.node_id!r}, address={self.address!r}, dialed={self.dialed})"


class LinkTunnel(Tunnel):
    """A dialed link. Streams are opened on it before its connection is up: what the session
    encodes meanwhile (OPEN frames, an RST of a user who left) waits in it and goes out with
    the first flush after the handshake. Bounded: edges send no bytes before OPEN_OK and the
    session holds at most FlowControl.max_streams streams."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        # The handshake checked the CA and the host name; the certificate must also name the
        # node this link was dialed for, before any OPEN (with its user's metadata) goes out.
        want = self.info.node_id
        got = tlsconfig.peer_node_id(transport.get_extra_info("ssl_object"))
        if got != want:
            log.warning(
                "peer link closed: the node's certificate names another node",
                extra={"node": want, "certificate_node": got, "address": self.info.address},
            )
            self.transport = None
            transport.abort()  # connection_lost follows: the streams are reset, retried elsewhere
            return
        super().connection_made(transport)

    def flush(self) -> None:
        if self.transport is None:
            self._flush_scheduled = False  # not connected yet: the frames wait in the session
            return
        super().flush()


@dataclasses.dataclass
class _Redial:
    """A node's dial failures in a row and when it may be dialed again."""

    failures: int = 0
    not_before: float = 0.0


class PeerLinks:
    """This worker's relay-to-relay links, both ways, and the TunnelOwner of each."""

    def __init__(
        self,
        node_id: str,
        directory: PeerDirectory,
        client_context: ssl.SSLContext,
        opener: "StreamOpener",
        flow: FlowControl = FlowControl(),
        keepalive: Keepalive = Keepalive(),
        limits: PeeringLimits = PeeringLimits(),
        metrics: "RelayMetrics | None" = None,
        deliver: Callable[[Tunnel, int, bytes], None] | None = None,
        worker: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node_id = node_id
        self.directory = directory
        self.client_context = client_context
        #: where forwarded streams are opened on local tunnels (the worker's, with its retries and metrics)
        self.opener = opener
        self.flow = flow
        self.keepalive = keepalive
        self.limits = limits
        self.metrics = metrics
        #: where a DATAGRAM received on a link goes (the worker's UdpEdge.deliver: a user's flow
        #: on a dialed link, a bridge's side on an accepted one)
        self.deliver = deliver
        self.worker = worker
        self.clock = clock
        #: this worker's apps by name (the store's as of its last reload), for forwarded streams
        self.apps: dict = {}
        #: dialed links by node id: at most one per node of the directory
        self.links: dict[str, LinkTunnel] = {}
        #: links other nodes dialed to this worker
        self.accepted: set[Tunnel] = set()
        #: the node ids the store lists (up or down), the only ones a link is accepted from;
        #: None until the worker's first poll (then any node certificate of the service CA)
        self.registered: frozenset[str] | None = None
        #: whether the store lists another node: only then may a route turn up elsewhere,
        #: so only then does a stream with none wait for one (relay.opening)
        self.clustered = False
        self._redial: dict[str, _Redial] = {}
        self._dials: set[asyncio.Task] = set()
        self._closing = False

    @classmethod
    def for_worker(cls, data_dir: Path, opener: "StreamOpener", **kwargs) -> "PeerLinks | None":
        """The links of a worker serving ``data_dir``, or None when its certificate names no node."""
        node_id = local_node_id(data_dir)
        if node_id is None:
            return None
        max_nodes = kwargs.pop("max_nodes", ClusterSettings.max_nodes)
        return cls(node_id, PeerDirectory(node_id, max_nodes), tlsconfig.peer_client_context(data_dir), opener, **kwargs)

    # ------------------------------------------------------------------ what the worker calls

    def set_apps(self, apps: list) -> None:
        """The worker's apps after a reload: forwarded streams are served from these."""
        self.apps = {app.name: app for app in apps}

    def update(
        self, group_nodes: dict[str, list[str]], addresses: dict[str, str], registered: set[str] | None = None
    ) -> None:
        """New directory contents (see PeerDirectory.update); links to nodes no longer listed
        are let go (closed when idle, drained otherwise), and drained links closed.
        ``registered``: every node id the store lists; from then on a link is accepted only
        from one of them (None: keep what was known)."""
        if registered is not None:
            self.registered = frozenset(registered)
            self.clustered = bool(self.registered - {self.node_id})
        self.directory.update(group_nodes, addresses)
        nodes = self.directory.nodes()
        for node_id in [n for n in self._redial if n not in nodes]:
            del self._redial[node_id]
        for node_id, link in list(self.links.items()):
            if node_id not in nodes:
                if link.load:
                    link.goaway(ErrorCode.NO_ERROR, "the node is no longer listed")
                else:
                    link.close(ErrorCode.NO_ERROR, "the node is no longer listed")
            elif link.session.draining and not link.load:
                # Drained (either side's GOAWAY) and idle: gone, so the node may be dialed anew
                # (a node back from a restart); nobody else closes a drained link.
                link.close(ErrorCode.NO_ERROR, "the link has drained")

    @property
    def load(self) -> int:
        """Streams on every link, both ways (a draining worker waits for them)."""
        return sum(t.load for t in self.links.values()) + sum(t.load for t in self.accepted)

    def drain(self) -> None:
        """No new streams either way; streams in flight finish (the worker is stopping)."""
        self._closing = True
        for link in [*self.links.values(), *self.accepted]:
            link.goaway(ErrorCode.NO_ERROR, "relay node shutting down")

    def close(self) -> None:
        """Close every link and cancel the dials under way."""
        self._closing = True
        for task in list(self._dials):
            task.cancel()
        for link in [*self.links.values(), *self.accepted]:
            link.close(ErrorCode.NO_ERROR, "relay node shutting down")

    # ------------------------------------------------------------------ the opener's side

    def pick(self, group: str, exclude: list) -> Tunnel | None:
        """A link to a node holding a usable tunnel of ``group`` (relay.opening.PeerRoutes):
        an up link with the fewest streams, else a new dial to a node not waiting out its
        backoff; never a node whose link is in ``exclude``. None when there is none."""
        candidates = self.directory.peers_for(group)
        if not candidates or self._closing:
            return None
        tried = {t.info.node_id for t in exclude if isinstance(t.info, PeerLink)}
        now = self.clock()
        up: list[Tunnel] = []
        dialable: list[tuple[str, str]] = []
        for node_id, address in candidates:
            if node_id in tried:
                continue
            link = self.links.get(node_id)
            if link is not None:
                if link.usable:
                    up.append(link)
                continue  # draining: no new streams until it is gone and dialed again
            redial = self._redial.get(node_id)
            if redial is None or redial.not_before <= now:
                dialable.append((node_id, address))
        if up:
            least = min(t.load for t in up)
            return random.choice([t for t in up if t.load == least])
        if dialable:
            return self._dial(*random.choice(dialable))
        return None

    def _dial(self, node_id: str, address: str) -> LinkTunnel | None:
        try:
            host, port = parse_hostport(address, f"node {node_id}'s peer address")
        except ConfigError as exc:
            log.warning("peer node with a malformed address skipped", extra={"node": node_id, "error": str(exc)})
            self._failed(node_id)
            return None
        session = mux.Session(mux.Role.RELAY, self.flow, self.keepalive)
        link = LinkTunnel(session, self, name=f"peer:{node_id}@{self.worker}", flow=self.flow)
        link.peer_id = node_id
        link.info = PeerLink(node_id, address, dialed=True)
        self.links[node_id] = link
        task = asyncio.get_running_loop().create_task(self._connect(link, host, port))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)
        self._count("peer_links_dialed")
        return link

    async def _connect(self, link: LinkTunnel, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.limits.dial_timeout
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: link, host, port, ssl=self.client_context, server_hostname=host.strip("[]"),
                    ssl_handshake_timeout=timeout,
                ),
                timeout,
            )
        except asyncio.CancelledError:
            link.connection_lost(None)
            raise
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            reason = str(exc) or type(exc).__name__
            log.warning(
                "cannot dial the peer link; its streams go elsewhere",
                extra={"node": link.info.node_id, "address": link.info.address, "error": reason},
            )
            self._count("peer_link_dials_failed")
            if not link.lost:
                link.connection_lost(exc if isinstance(exc, Exception) else None)

    def _failed(self, node_id: str) -> None:
        """Not before the backoff: a failed dial or a lost link."""
        redial = self._redial.setdefault(node_id, _Redial())
        wait = min(self.limits.redial_initial * (2 ** redial.failures), self.limits.redial_maximum)
        redial.failures = min(redial.failures + 1, 32)
        redial.not_before = self.clock() + wait

    # ------------------------------------------------------------------ the listen port's side

    def accept(self, transport: asyncio.Transport, ssl_object, slot=None) -> Tunnel | None:
        """The tunnel protocol of a link another node dialed, or None (refused, logged)."""
        peer = transport.get_extra_info("peername")
        node_id = tlsconfig.peer_node_id(ssl_object)
        if node_id is None:
            self._count("peer_links_refused")
            log.warning("peer link without a node certificate refused", extra={"peer": str(peer)})
            return None
        if self.registered is not None and node_id not in self.registered:
            self._count("peer_links_refused")
            log.warning(
                "peer link refused: its node is not in the service's nodes table (never registered, "
                "or removed with `admin node remove`)",
                extra={"node": node_id, "peer": str(peer)},
            )
            return None
        if self._closing or len(self.accepted) >= self.limits.max_accepted:
            self._count("peer_links_refused")
            log.warning(
                "peer link refused: this worker holds its limit of links or is stopping",
                extra={"node": node_id, "peer": str(peer), "limit": self.limits.max_accepted},
            )
            return None
        session = mux.Session(mux.Role.CONNECTOR, self.flow, self.keepalive)
        link = Tunnel(session, self, name=f"peer:{node_id}>{self.worker}", flow=self.flow)
        link.peer_id = node_id
        link.info = PeerLink(node_id, None, dialed=False, listen_slot=slot)
        self.accepted.add(link)
        return link

    # ------------------------------------------------------------------ TunnelOwner

    def tunnel_up(self, tunnel: Tunnel) -> None:
        record: PeerLink = tunnel.info
        if record.dialed:
            self._redial.pop(record.node_id, None)
        log.info(
            "peer link up",
            extra={"node": record.node_id, "peer": tunnel.peer, "dialed": record.dialed, "worker": self.worker},
        )

    def tunnel_down(self, tunnel: Tunnel, code: int, reason: str) -> None:
        record: PeerLink = tunnel.info
        if record.dialed:
            if self.links.get(record.node_id) is tunnel:
                del self.links[record.node_id]
            self._failed(record.node_id)
        else:
            self.accepted.discard(tunnel)
            slot, record.listen_slot = record.listen_slot, None
            if slot is not None:
                slot.release()
        if tunnel.streams_lost:
            self._count("peer_streams_lost", tunnel.streams_lost)
            log.warning(
                "peer link ended with streams on it",
                extra={"node": record.node_id, "streams": tunnel.streams_lost, "code": code, "reason": reason},
            )

    def stream_opened(self, tunnel: Tunnel, stream_id: int, meta: dict) -> None:
        if tunnel.info.dialed:
            tunnel.reject(stream_id, ErrorCode.PROTOCOL_ERROR, "streams are opened by the node that dialed the link")
            return
        bridge.serve(tunnel, stream_id, meta, self.apps, self.opener, self.metrics)

    def control_received(self, tunnel: Tunnel, message: dict) -> None:
        log.debug("control message on a peer link ignored", extra={"tunnel": tunnel.name, "type": message.get("type")})

    def goaway_received(self, tunnel: Tunnel, code: int, reason: str) -> None:
        # Tunnel.usable is False from now on: pick() leaves the link alone until it is gone.
        log.info("peer node draining its link", extra={"tunnel": tunnel.name, "reason": reason})

    def datagram_received(self, tunnel: Tunnel, flow_id: int, data: bytes) -> None:
        if self.deliver is not None:
            self.deliver(tunnel, flow_id, data)
        else:
            self._count("udp_dropped_no_flow")

    def _count(self, event: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.count(event, n)
