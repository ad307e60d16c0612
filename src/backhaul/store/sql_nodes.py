"""The SQL stores' relay nodes: registration, heartbeats, the tunnels each node holds, and
the change log every config_version bump writes.

Freshness, not flags: a node is up while its heartbeat is younger than
``ClusterSettings.node_fresh`` and it has not stopped, and a tunnel row counts only while its
node is up. A node that dies clears nothing, yet within ``node_fresh`` its tunnels stop
making connectors active, keeping them from removal, or letting a group update.

A connector's ``inactive_since`` is written where its last live tunnel goes away (a tunnel
down, a worker or node stopping or removed) and cleared by its next tunnel; while its tunnels
are on a node that died, nothing is written and the read takes that node's last heartbeat
(sql._CONNECTOR_COLUMNS).
"""

from __future__ import annotations

from typing import Any, Callable

from backhaul.config import ClusterSettings
from backhaul.store.base import Conflict, LimitReached, Node, NotFound
from backhaul.store.dbapi import Db

#: The tunnel rows (alias ``t``) of up nodes: add ``AND t.connector_id = ...`` and bind
#: ``fresh_since`` (the oldest heartbeat that is still fresh) as its one parameter.
LIVE_TUNNELS = "FROM tunnels t JOIN nodes n ON n.id = t.node_id AND n.state = 'running' AND n.last_seen >= ? WHERE t.count > 0"

_NODE_COLUMNS = "n.id, n.listen, n.peer, n.version, n.started, n.last_seen, n.state"

#: Sets ``inactive_since`` (the first parameter) on the connectors with tunnel rows on one
#: node (the second) that have no live tunnel but those rows and none recorded yet: run just
#: before the node's rows (or, with _ON_WORKER, one worker's) are deleted. Binds: lost_at,
#: node_id[, worker], fresh_since, node_id[, worker].
_GOING_INACTIVE = (
    "UPDATE connectors SET inactive_since = ? WHERE inactive_since IS NULL "
    "AND id IN (SELECT connector_id FROM tunnels WHERE node_id = ?{worker} AND count > 0) "
    "AND NOT EXISTS (SELECT 1 FROM tunnels t JOIN nodes n ON n.id = t.node_id AND n.state = 'running' AND n.last_seen >= ? "
    "WHERE t.count > 0 AND t.connector_id = connectors.id AND NOT (t.node_id = ?{t_worker}))"
)
_ON_NODE = _GOING_INACTIVE.format(worker="", t_worker="")
_ON_WORKER = _GOING_INACTIVE.format(worker=" AND worker = ?", t_worker=" AND t.worker = ?")


class NodeTables:
    """Node methods of SqlStore (a mixin: it uses the store's transactions, ``_write``/``_read``)."""

    cluster: ClusterSettings
    _clock: Callable[[], float]

    def _fresh_since(self, fresh_for: float | None = None) -> float:
        """The oldest heartbeat time of an up node, now."""
        return self._clock() - (self.cluster.node_fresh if fresh_for is None else fresh_for)

    # -- the change log (written by SqlStore._bump)

    def _log_change(self, db: Db, version: int, kind: str, subject: str) -> None:
        db.execute("INSERT INTO change_log (version, kind, subject, at) VALUES (?, ?, ?, ?)", (version, kind, subject, self._clock()))
        # The newest change_log_rows rows only: one indexed delete per bump keeps the table bounded.
        db.execute("DELETE FROM change_log WHERE version <= ?", (version - self.cluster.change_log_rows,))

    def changes_since(self, version: int) -> list[dict[str, Any]]:
        """The logged changes after ``version``, oldest first (at most change_log_rows)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT version, kind, subject, at FROM change_log WHERE version > ? ORDER BY version", (version,)
            ).fetchall()
        return [{"version": v, "kind": k, "subject": s, "at": at} for v, k, s, at in rows]

    # -- nodes

    def register_node(self, node: Node) -> None:
        now = self._clock()
        with self._write() as db:
            known = db.execute("SELECT 1 FROM nodes WHERE id = ?", (node.id,)).fetchone()
            if known is None and db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0] >= self.cluster.max_nodes:
                raise LimitReached(
                    f"there are already {self.cluster.max_nodes} relay nodes registered; remove nodes that are gone "
                    "(`backhaul admin node list` shows them down) with `backhaul admin node remove ID`"
                )
            db.execute(
                "INSERT INTO nodes (id, listen, peer, version, started, last_seen, state) VALUES (?, ?, ?, ?, ?, ?, 'running') "
                "ON CONFLICT (id) DO UPDATE SET listen = excluded.listen, peer = excluded.peer, version = excluded.version, "
                "started = excluded.started, last_seen = excluded.last_seen, state = 'running'",
                (node.id, node.listen, node.peer, node.version, now, now),
            )

    def node_heartbeat(self, node_id: str) -> None:
        with self._write() as db:
            if db.execute("UPDATE nodes SET last_seen = ? WHERE id = ? AND state = 'running'", (self._clock(), node_id)).rowcount == 0:
                raise NotFound(f"relay node {node_id} is not registered as running; it registers again at its next start")

    def node_stopped(self, node_id: str) -> None:
        with self._write() as db:
            db.execute(_ON_NODE, (self._lost_at(db, node_id), node_id, self._fresh_since(), node_id))
            db.execute("UPDATE nodes SET state = 'stopped', last_seen = ? WHERE id = ?", (self._clock(), node_id))
            db.execute("DELETE FROM tunnels WHERE node_id = ?", (node_id,))

    def _lost_at(self, db: Db, node_id: str) -> float:
        """When the tunnels a node counts stop counting if it drops them now: now while it is
        up, its last heartbeat once it is down (it died then, as far as anyone knows)."""
        now = self._clock()
        row = db.execute("SELECT last_seen, state FROM nodes WHERE id = ?", (node_id,)).fetchone()
        if row is None or (row[1] == "running" and row[0] >= self._fresh_since()):
            return now
        return min(now, row[0])

    def remove_node(self, node_id: str) -> None:
        """Forget a node that is down, with its tunnel rows (it registers again if it comes back);
        NotFound when there is no such node, Conflict when it is up."""
        since = self._fresh_since()
        with self._write() as db:
            # Rolled back with the rest when the node turns out to be up (Conflict below).
            db.execute(_ON_NODE, (self._lost_at(db, node_id), node_id, since, node_id))
            removed = db.execute(
                "DELETE FROM nodes WHERE id = ? AND (state = 'stopped' OR last_seen < ?)", (node_id, since)
            ).rowcount
            if removed == 0:
                if db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is not None:
                    raise Conflict(f"relay node {node_id} is up; stop it first (or wait until it is down)")
                raise NotFound(f"there is no relay node {node_id!r}; see `backhaul admin node list`")

    def list_nodes(self, fresh_for: float) -> list[Node]:
        since = self._fresh_since(fresh_for)
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_NODE_COLUMNS}, "
                "COALESCE((SELECT SUM(t.count) FROM tunnels t JOIN connectors c ON c.id = t.connector_id AND c.revoked = 0 "
                "WHERE t.node_id = n.id AND t.count > 0), 0) "
                "FROM nodes n ORDER BY n.id LIMIT ?",
                (self.cluster.max_nodes,),
            ).fetchall()
        nodes = []
        for node_id, listen, peer, version, started, last_seen, state, tunnels in rows:
            fresh = state == "running" and last_seen >= since
            nodes.append(
                Node(
                    id=node_id, listen=listen, peer=peer, version=version, started=started, last_seen=last_seen,
                    state=state, tunnels=int(tunnels) if fresh else 0, fresh=fresh,
                )
            )
        return nodes

    def group_nodes(self, fresh_for: float) -> dict[str, list[str]]:
        since = self._fresh_since(fresh_for)
        groups: dict[str, list[str]] = {}
        with self._read() as db:
            rows = db.execute(
                "SELECT DISTINCT c.grp, t.node_id FROM tunnels t "
                "JOIN nodes n ON n.id = t.node_id AND n.state = 'running' AND n.last_seen >= ? "
                "JOIN connectors c ON c.id = t.connector_id AND c.revoked = 0 "
                "WHERE t.count > 0 ORDER BY c.grp, t.node_id",
                (since,),
            ).fetchall()
        for group, node_id in rows:
            groups.setdefault(group, []).append(node_id)
        return groups

    def _up_nodes(self, db: Db) -> list[dict[str, str]]:
        """The up nodes as connectors are told about them (connector_config, the relay hello)."""
        return [
            {"id": node_id, "listen": listen}
            for node_id, listen in db.execute(
                "SELECT id, listen FROM nodes WHERE state = 'running' AND last_seen >= ? ORDER BY id LIMIT ?",
                (self._fresh_since(), self.cluster.max_nodes),
            )
        ]

    # -- tunnels

    def tunnel_changed(self, connector_id: str, node_id: str, worker: int, delta: int, peer: str) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM connectors WHERE id = ?", (connector_id,)).fetchone() is None:
                return  # deleted meanwhile: nothing to count
            if db.execute("SELECT 1 FROM nodes WHERE id = ?", (node_id,)).fetchone() is None:
                raise NotFound(f"relay node {node_id} is not registered; it registers at its start (`backhaul service run`)")
            db.execute(
                # Never below zero (CASE: SQLite's two-argument MAX is PostgreSQL's GREATEST).
                "INSERT INTO tunnels (connector_id, node_id, worker, count) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (connector_id, node_id, worker) DO UPDATE SET count = CASE WHEN tunnels.count + ? > 0 "
                "THEN tunnels.count + ? ELSE 0 END",
                (connector_id, node_id, worker, max(0, delta), delta, delta),
            )
            db.execute(
                "DELETE FROM tunnels WHERE connector_id = ? AND node_id = ? AND worker = ? AND count = 0",
                (connector_id, node_id, worker),
            )
            now = self._clock()
            if delta > 0:
                db.execute(
                    "UPDATE connectors SET last_seen = ?, source_addr = ?, inactive_since = NULL WHERE id = ?",
                    (now, peer, connector_id),
                )
                return
            db.execute("UPDATE connectors SET last_seen = ?, source_addr = ? WHERE id = ?", (now, peer, connector_id))
            db.execute(
                "UPDATE connectors SET inactive_since = ? WHERE id = ? AND inactive_since IS NULL "
                f"AND NOT EXISTS (SELECT 1 {LIVE_TUNNELS} AND t.connector_id = connectors.id)",
                (now, connector_id, self._fresh_since()),
            )

    def mark_worker_down(self, node_id: str, worker: int) -> None:
        with self._write() as db:
            db.execute(_ON_WORKER, (self._lost_at(db, node_id), node_id, worker, self._fresh_since(), node_id, worker))
            db.execute("DELETE FROM tunnels WHERE node_id = ? AND worker = ?", (node_id, worker))
