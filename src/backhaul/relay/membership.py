"""A relay worker's side of the service's store: its node, the tunnels it counts, the store away.

Theory of operation. Every node registers in the store and heartbeats (worker 0 does, on an
executor thread); each worker counts its usable tunnels there, one row per (connector,
node, worker). What the rows say counts only while the node's heartbeat is fresh
(store/sql_nodes.py), so a node that dies leaves nothing falsely active.

Each poll (once a second, or when the store's change listener wakes the worker) reads the
config version, which groups' tunnels the up nodes hold, and the up nodes, on an executor
thread: a store that does not answer must not stall relaying. The first poll that fails
marks the store away (``up`` False). While it is away the worker relays with what it knows:
a connector that redials is accepted on the record last read of it (``KnownConnectors``),
and tunnels that come or go are not counted one by one. The first poll that answers again
rebuilds this worker's rows from its registry, then counting goes on as before.
"""

from __future__ import annotations

import asyncio
import logging

from backhaul.config import ClusterSettings
from backhaul.relay.known import KnownConnectors
from backhaul.relay.routing import TunnelRecord, TunnelRegistry
from backhaul.store import Connector, Node, NotFound, Store, StoreLimits
from backhaul.transport.tunnel import Tunnel

log = logging.getLogger("backhaul.relay")


class Membership:
    """One worker's dealings with the store as a node of the service (see the module docstring)."""

    def __init__(self, store: Store, node: Node, worker: int, registry: TunnelRegistry, cluster: ClusterSettings) -> None:
        self.store = store  # the worker's store (its own connections, opened after the fork)
        self.node = node  # this node as it registers (its id, the addresses it advertises)
        self.worker = worker  # this worker's index: its tunnel rows carry it
        self.registry = registry  # the worker's tunnels, counted again when the store is back
        self.cluster = cluster  # heartbeat interval, freshness of the nodes
        #: False from a failed poll until one answers again (see the module docstring)
        self.up = True
        #: the connector records last read, for tunnels accepted while the store is away
        self.known = KnownConnectors(StoreLimits().max_connectors)
        self._heartbeat: asyncio.Task | None = None

    @property
    def node_id(self) -> str:
        return self.node.id

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Forget this worker's rows of a previous run; worker 0 registers the node and heartbeats."""
        self.store.mark_worker_down(self.node_id, self.worker)
        if self.worker == 0:
            # An upsert: after the supervisor's registration, or alone (one worker, a test).
            self.store.register_node(self.node)
            self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeats(), name="backhaul-node-heartbeat")

    def stop(self) -> None:
        """A clean stop: this worker's rows go, and worker 0 says the node stopped (down at once)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        try:
            self.store.mark_worker_down(self.node_id, self.worker)
            if self.worker == 0:
                self.store.node_stopped(self.node_id)
        except Exception:
            log.exception("cannot record this worker's stop in the store; its rows stop counting once the node is stale")

    async def _heartbeats(self) -> None:
        """Keep this node fresh in the store; a failed beat is logged, never fatal."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cluster.heartbeat_interval)
            try:
                await loop.run_in_executor(None, self.store.node_heartbeat, self.node_id)
            except NotFound:
                log.warning("this node was not registered in the store any more; registering it again", extra={"node": self.node_id})
                try:
                    await loop.run_in_executor(None, self.store.register_node, self.node)
                except Exception:
                    log.exception("cannot register this node in the store; will retry", extra={"node": self.node_id})
            except Exception:
                log.exception("cannot record this node's heartbeat in the store; will retry", extra={"node": self.node_id})

    # ------------------------------------------------------------------ the poll

    async def poll(self) -> tuple[int, dict[str, list[str]], list[Node]] | None:
        """The config version, which up nodes hold which groups' tunnels, and every node the
        store lists (up or down); None while the store does not answer."""
        try:
            version, (group_nodes, nodes) = await asyncio.get_running_loop().run_in_executor(None, self._read_poll)
        except Exception as exc:
            self._lost(exc)
            return None
        if not self.up:
            self._back()
        return version, group_nodes, nodes

    def _read_poll(self) -> tuple[int, tuple[dict[str, list[str]], list[Node]]]:
        return self.store.config_version(), self.read_nodes()

    def read_nodes(self) -> tuple[dict[str, list[str]], list[Node]]:
        """Which up nodes hold which groups' tunnels, and every node listed (tunnels and
        nodes come and go without a config version, so every poll reads them)."""
        fresh = self.cluster.node_fresh
        return self.store.group_nodes(fresh), self.store.list_nodes(fresh)

    def _lost(self, exc: Exception) -> None:
        if self.up:
            self.up = False
            log.warning(
                "the store does not answer; relaying with what this worker knows, refusing connectors it has not seen",
                extra={"worker": self.worker, "error": str(exc), "connectors_known": len(self.known)},
            )

    def _back(self) -> None:
        """The store answers again: count this worker's tunnels afresh (what went up or down
        meanwhile was not recorded), then carry on as before."""
        try:
            self.store.mark_worker_down(self.node_id, self.worker)
            for tunnel in self.registry.tunnels():
                record: TunnelRecord = tunnel.info
                record.counted = False
                if tunnel.usable:
                    self.store.tunnel_changed(record.connector_id, self.node_id, self.worker, +1, tunnel.peer)
                    record.counted = True
        except Exception as exc:
            self._lost(exc)  # gone again: the next poll that answers tries again
            return
        self.up = True
        log.info("the store answers again; tunnel counts rebuilt", extra={"worker": self.worker, "tunnels": len(self.registry.tunnels())})

    # ------------------------------------------------------------------ connectors and tunnels

    def connector(self, connector_id: str) -> Connector | None:
        """The connector's record: the store's, or while the store is away the one last read."""
        if self.up:
            try:
                record = self.store.get_connector(connector_id)
            except Exception as exc:
                self._lost(exc)
            else:
                self.known.remember(connector_id, record)
                return record
        return self.known.get(connector_id)

    def count(self, tunnel: Tunnel) -> None:
        """A usable tunnel more on this worker (while the store is away: counted when it is back)."""
        record: TunnelRecord = tunnel.info
        if not self.up:
            return
        try:
            self.store.tunnel_changed(record.connector_id, self.node_id, self.worker, +1, tunnel.peer)
            record.counted = True  # only then may its end take it off the count
        except Exception:
            log.exception("cannot count the tunnel in the store; it carries streams all the same", extra={"connector": record.connector_id})

    def uncount(self, tunnel: Tunnel) -> None:
        """The tunnel closed or drains: it leaves the count (once)."""
        record: TunnelRecord = tunnel.info
        if not record.counted:
            return
        record.counted = False
        if not self.up:
            return  # its row goes when the store is back and the counts are rebuilt
        try:
            self.store.tunnel_changed(record.connector_id, self.node_id, self.worker, -1, tunnel.peer)
        except Exception:
            log.exception("cannot record a closed or draining tunnel in the store")
