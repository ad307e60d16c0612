"""Where a connector worker's tunnels live: one group of slots per address, re-homed as nodes come and go.

The worker learns the relay nodes that are up from every hello and config pull
(``learn``). After every event that may change the picture (a node list, a hello, a
GOAWAY from the relay, a tunnel down, a failed dial) ``TunnelHomes`` asks
``nodes.plan`` which addresses to hold, dials a new group (``slots.TunnelSlots``) for
each one it lacks and retires the groups the plan lets go. A group that lost its node
counts a strike against that node (``nodes.NodeStrikes``), which keeps it out of the
choice for a while. With no node list, or a list of one, the only group is the enrolled
address's: a connector of a one-node service runs exactly as before.

The agent sees one set of tunnels (``tunnels``) and hands every tunnel event here;
events go on to the group that dialed the tunnel (``tunnel.info.home``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from typing import Callable

from backhaul import tlsconfig
from backhaul.config import ClusterSettings, Rehoming
from backhaul.connector import nodes
from backhaul.connector.settings import ConnectorSettings
from backhaul.connector.slots import TunnelSlots
from backhaul.connector.state import ConnectorState
from backhaul.protocol.constants import ALPN_TUNNEL
from backhaul.transport.tunnel import Tunnel, TunnelOwner

log = logging.getLogger("backhaul.connector")


class TunnelHomes:
    """The tunnel groups of one connector worker and the node list they follow (see the module docstring)."""

    def __init__(
        self,
        settings: Callable[[], ConnectorSettings],
        state: ConnectorState,
        owner: TunnelOwner,
        stopping: asyncio.Event,
        rehoming: Rehoming = Rehoming(),
        cluster: ClusterSettings = ClusterSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._owner = owner
        self._stopping = stopping
        self._rehoming = rehoming
        self._cluster = cluster
        self._clock = clock
        self._connector_id = state.connector_id
        self.enrolled = nodes.Target(state.host, state.port, state.host)
        self._ssl: ssl.SSLContext | None = None
        self._numbers = itertools.count()
        #: the groups held, by address
        self.groups: dict[nodes.Address, TunnelSlots] = {}
        #: groups retired, until their last tunnel has closed
        self._leaving: list[TunnelSlots] = []
        #: the up nodes, as the last hello or config pull listed them
        self.nodes: list[nodes.NodeAddress] = []
        self._strikes = nodes.NodeStrikes(rehoming.avoid, cluster.max_nodes)
        self._started = False
        self._closing = False
        self._planning = False

    def use_credentials(self, state: ConnectorState) -> None:
        """Tunnels dialed from now on present ``state``'s certificate; open ones carry on."""
        self._ssl = tlsconfig.connector_context(state, ALPN_TUNNEL, self._settings().tls)

    # ------------------------------------------------------------------ what the worker asks

    def _all(self) -> list[TunnelSlots]:
        return [*self.groups.values(), *self._leaving]

    @property
    def tunnels(self) -> set[Tunnel]:
        """Every tunnel connected now, in every group (leaving ones included)."""
        out: set[Tunnel] = set()
        for group in self._all():
            out |= group.tunnels
        return out

    def answered(self) -> list[Tunnel]:
        return [t for group in self._all() for t in group.answered()]

    def streams_open(self) -> int:
        return sum(group.streams_open() for group in self._all())

    def held_nodes(self) -> list[str]:
        """HOST:PORT of every address held (what `connector status` could show; logs say it)."""
        return [f"{host}:{port}" for host, port in self.groups]

    def fallback_urls(self) -> list[str]:
        """Control API URLs to try when the enrolled address fails: nodes of the last list,
        best ranked first, the enrolled address left out; at most ``fallback_nodes``."""
        ranked = [n for n in nodes.rank(self._connector_id, self.nodes) if n.address != self.enrolled.address]
        return [n.url for n in ranked[: self._rehoming.fallback_nodes]]

    def start(self) -> None:
        self._started = True
        self.replan()

    def resize(self) -> None:
        """The tunnel count changed (SIGHUP): every group follows it."""
        for group in self.groups.values():
            group.resize()

    def learn(self, raw: object, source: str) -> None:
        """A node list arrived (a hello's or the config's ``nodes``); None: the relay said none."""
        if self._learn(raw, source):
            self.replan()

    def _learn(self, raw: object, source: str) -> bool:
        listed = nodes.parse_nodes(raw, self._cluster.max_nodes, source)
        if listed is None or listed == self.nodes:
            return False
        log.info(
            "relay nodes learned",
            extra={"source": source, "nodes": [f"{n.id}={n.host}:{n.port}" for n in listed]},
        )
        self.nodes = listed
        return True

    def close(self) -> None:
        """No more dialing anywhere."""
        self._closing = True
        for group in self._all():
            group.close()

    # ------------------------------------------------------------------ tunnel events

    def up(self, tunnel: Tunnel) -> None:
        tunnel.info.home.up(tunnel)

    def down(self, tunnel: Tunnel) -> None:
        tunnel.info.home.down(tunnel)

    def hello(self, tunnel: Tunnel, message: dict) -> None:
        """The relay answered on ``tunnel``; its hello may name the node and list the nodes."""
        node = message.get("node")
        node = node if isinstance(node, str) else None
        if node is not None:
            self._strikes.clear(node)
        try:
            workers = max(1, int(message.get("workers", 1)))
        except (TypeError, ValueError):
            workers = 1
        # One decision once the hello and its list are both taken in, not one for each.
        planning, self._planning = self._planning, True
        try:
            self._learn(message.get("nodes"), "hello")
            tunnel.info.home.hello(tunnel, message.get("worker"), workers, node)
        finally:
            self._planning = planning
        self.replan()

    def goaway(self, tunnel: Tunnel) -> None:
        tunnel.info.home.goaway(tunnel)

    def rotate(self, tunnel: Tunnel, send: bool) -> None:
        """``tunnel``'s keys are due (slots.TunnelSlots.rotate): a successor is dialed at once."""
        tunnel.info.home.rotate(tunnel, send)

    # ------------------------------------------------------------------ decisions

    def replan(self) -> None:
        """Hold what ``nodes.plan`` says: new groups dialed, groups it lets go retired."""
        if not self._started or self._closing or self._stopping.is_set() or self._planning:
            return
        self._planning = True
        try:
            self._replan()
        finally:
            self._planning = False

    def _replan(self) -> None:
        now = self._clock()
        listed = {n.address: n for n in self.nodes}
        views = {address: group.view(self._rehoming.failed_dials) for address, group in self.groups.items()}
        for address, view in views.items():
            group = self.groups[address]
            node = listed.get(address)
            if view.lost and not group.struck and node is not None and len(self.nodes) > 1:
                group.struck = True
                until = self._strikes.strike(node.id, now)
                log.warning(
                    "relay node lost; moving to another",
                    extra={"node": node.id, "relay": f"{node.host}:{node.port}", "avoid_for": round(until - now, 1)},
                )
        decided = nodes.plan(
            self._connector_id,
            self._settings().relay_nodes,
            self.nodes,
            self.enrolled,
            views,
            self._strikes.avoided(now),
        )
        for address in decided.retire:
            group = self.groups.pop(address)
            log.info("tunnels to a relay address retired", extra={"relay": f"{address[0]}:{address[1]}"})
            group.leave()
            self._leaving.append(group)
        for target in decided.hold:
            if target.address not in self.groups:
                group = TunnelSlots(
                    self._settings,
                    self._connector_id,
                    target,
                    self._owner,
                    self._stopping,
                    lambda: self._ssl,
                    self._numbers,
                    self._room,
                    self.replan,
                )
                self.groups[target.address] = group
                node = listed.get(target.address)
                log.info(
                    "tunnels to a relay address",
                    extra={"relay": f"{target.host}:{target.port}", "node": node.id if node else None},
                )
                group.start()
        self._leaving = [group for group in self._leaving if not group.finished]

    def _room(self) -> bool:
        """Whether the worker may dial one more slot: ``max_slots`` counts every group's."""
        used = sum(group.live() for group in self.groups.values()) + sum(len(g.tunnels) for g in self._leaving)
        return used < self._settings().max_slots
