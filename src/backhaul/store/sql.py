"""The store's logic in SQL, shared by the SQLite and the PostgreSQL backends."""

from __future__ import annotations

import abc
import contextlib
import hashlib
import secrets
from typing import Any, Callable

import orjson

from backhaul.config import REFRESH_INTERVAL, ClusterSettings
from backhaul.errors import ConfigError
from backhaul.store.base import (
    DEFAULT_GROUP,
    App,
    Conflict,
    Connector,
    ConnectorStats,
    Group,
    InvalidToken,
    LimitReached,
    NotFound,
    OriginReport,
    Store,
    StoreLimits,
    Token,
)
from backhaul.store.dbapi import Db
from backhaul.store.sql_nodes import LIVE_TUNNELS, NodeTables
from backhaul.store.sql_releases import ReleaseTables
from backhaul.store.sql_rollout import RolloutTables
from backhaul.store.sql_center import CenterTables

#: A write the database refused for a key or constraint (both backends raise Conflict with
#: it). SqlStore checks names and ports before it writes, under the write lock, so this is
#: a clash those checks do not cover (such as a connector id enrolled twice).
CLASH = "the change clashes with a stored record ({}); reload and retry"

_CONNECTOR_COLUMNS = (
    "c.id, c.name, c.hostname, c.version, c.grp, c.created, c.last_seen, c.source_addr, c.cert_serial, "
    "c.cert_expires, c.revoked, c.prev_serial, c.prev_expires, "
    # The one parameter of these columns: the oldest fresh node heartbeat (NodeTables._fresh_since).
    f"COALESCE((SELECT SUM(t.count) {LIVE_TUNNELS} AND t.connector_id = c.id), 0), "
    "c.active_streams, c.bytes_in, c.bytes_out, c.cpu, c.memory, c.inactive_since, "
    # The last heartbeat of a node that died holding tunnel rows of it: when those stopped
    # counting (nothing writes inactive_since for them until the node is removed or back).
    "(SELECT MAX(dn.last_seen) FROM tunnels dt JOIN nodes dn ON dn.id = dt.node_id WHERE dt.connector_id = c.id AND dt.count > 0)"
)
_APP_COLUMNS = (
    "name, grp, proto, port, target, external_host, internal_url, preauth, keep_host, backend_ca, backend_insecure, health_path"
)


def _connector(row: tuple) -> Connector:
    tunnels = int(row[13])
    # When its last tunnel went away: recorded, or its dead node's last heartbeat; None when
    # it never had one since its enrollment (then inactive since it was created).
    lost = row[19] if row[19] is not None else row[20]
    return Connector(
        id=row[0],
        name=row[1],
        hostname=row[2],
        version=row[3],
        group=row[4],
        created=row[5],
        last_seen=row[6],
        source_addr=row[7],
        cert_serial=int(row[8], 16),
        cert_expires=row[9],
        revoked=bool(row[10]),
        previous_serial=int(row[11], 16) if row[11] is not None else None,
        previous_expires=row[12],
        tunnels=tunnels,
        active_streams=row[14],
        bytes_in=row[15],
        bytes_out=row[16],
        cpu=row[17],
        memory=row[18],
        inactive_since=None if tunnels > 0 else (lost if lost is not None else row[5]),
        tunnel_lost=tunnels == 0 and lost is not None,
    )


def _app(row: tuple) -> App:
    return App(*row[:8], keep_host=bool(row[8]), backend_ca=row[9], backend_insecure=bool(row[10]), health_path=row[11])


def _app_values(app: App) -> tuple:
    return (
        app.name, app.group, app.proto, app.port, app.target, app.external_host, app.internal_url, app.preauth,
        int(app.keep_host), app.backend_ca, int(app.backend_insecure), app.health_path,
    )


class SqlStore(NodeTables, ReleaseTables, RolloutTables, CenterTables, Store):
    """The Store's logic, in the SQL that SQLite and PostgreSQL both run.

    A backend supplies the plumbing: ``_write()`` (a transaction that holds the store's one
    writer lock: SQLite's BEGIN IMMEDIATE, PostgreSQL's advisory lock, so a check such as
    "is this name taken" or "is the table full" cannot go stale before the write),
    ``_read()`` (one consistent snapshot), ``close()``, ``limits`` and ``_clock``. Both
    yield a ``Db``: ``execute``/``executemany`` with ``?`` placeholders, returning a cursor.
    Booleans are integer columns (0/1) in both schemas, so the same comparisons hold.
    """

    limits: StoreLimits
    cluster: ClusterSettings
    _clock: Callable[[], float]

    @abc.abstractmethod
    def _write(self) -> contextlib.AbstractContextManager[Db]: ...

    @abc.abstractmethod
    def _read(self) -> contextlib.AbstractContextManager[Db]: ...

    def _apply_migrations(self, db: Db, migrations, where: str, time_type: str) -> None:
        """Apply the steps of ``migrations`` not yet in ``schema_migrations`` (inside the
        caller's transaction); a store holding a step this version does not know is refused."""
        db.execute(f"CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied {time_type} NOT NULL)")
        done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
        if done - {version for version, _ in migrations}:
            raise ConfigError(f"the store {where} was written by a newer backhaul (schema {max(done)}); upgrade backhaul")
        for version, statements in migrations:
            if version in done:
                continue
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_migrations (version, applied) VALUES (?, ?)", (version, self._clock()))

    def _bump(self, db: Db, kind: str, subject: str) -> None:
        """A change that routing or connectors see: a new config_version, its change-log row and
        (on PostgreSQL) the notification that wakes the other nodes, all in the caller's transaction."""
        version = db.execute("UPDATE config_version SET version = version + 1 WHERE id = 1 RETURNING version").fetchone()[0]
        self._log_change(db, version, kind, subject)
        self._notify(db, version)

    def _notify(self, db: Db, version: int) -> None:
        """Tell the other nodes about ``version`` at commit; SQLite's readers poll (one node)."""

    @staticmethod
    def _require_group(db: Db, name: str) -> None:
        if db.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone() is None:
            raise NotFound(f"there is no connector group {name!r}; create it with `backhaul admin group create {name}`")

    # -- meta

    def config_version(self) -> int:
        with self._read() as db:
            return db.execute("SELECT version FROM config_version WHERE id = 1").fetchone()[0]

    def set_admin_token_hash(self, token_hash: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('admin_token_sha256', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (token_hash,),
            )

    def admin_token_hash(self) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'admin_token_sha256'").fetchone()
        return row[0] if row else None

    def create_service(self, record: dict[str, str]) -> None:
        """Record the service every node of this store joins (control/init.py: the CA
        certificate, the sealed CA key and admin token); Conflict if one is recorded already."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM meta WHERE key = 'service'").fetchone() is not None:
                raise Conflict("this store already holds a relay service; add a node with `backhaul service init --cluster-key-file FILE`")
            db.execute("INSERT INTO meta (key, value) VALUES ('service', ?)", (orjson.dumps(record).decode(),))

    def service_record(self) -> dict[str, str] | None:
        """What ``create_service`` recorded, or None for a store no service was created in."""
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'service'").fetchone()
        return orjson.loads(row[0]) if row else None

    # -- groups

    _GROUP_QUERY = (
        "SELECT g.name, g.created, "
        "(SELECT COUNT(*) FROM apps a WHERE a.grp = g.name), "
        "(SELECT COUNT(*) FROM connectors c WHERE c.grp = g.name AND c.revoked = 0) "
        "FROM groups g"
    )

    def list_groups(self) -> list[Group]:
        with self._read() as db:
            return [Group(*row) for row in db.execute(self._GROUP_QUERY + " ORDER BY g.name")]

    def get_group(self, name: str) -> Group | None:
        with self._read() as db:
            row = db.execute(self._GROUP_QUERY + " WHERE g.name = ?", (name,)).fetchone()
        return Group(*row) if row else None

    def create_group(self, name: str) -> Group:
        now = self._clock()
        with self._write() as db:
            if db.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"connector group {name!r} already exists")
            if db.execute("SELECT COUNT(*) FROM groups").fetchone()[0] >= self.limits.max_groups:
                raise LimitReached(f"there are already {self.limits.max_groups} connector groups; delete unused ones first")
            db.execute("INSERT INTO groups (name, created) VALUES (?, ?)", (name, now))
            self._bump(db, "group_created", name)
        return Group(name=name, created=now)

    def delete_group(self, name: str) -> None:
        if name == DEFAULT_GROUP:
            raise Conflict("the default group cannot be deleted")
        with self._write() as db:
            self._require_group(db, name)
            apps = [r[0] for r in db.execute("SELECT name FROM apps WHERE grp = ? ORDER BY name LIMIT 20", (name,))]
            connectors = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM connectors WHERE grp = ? AND revoked = 0 ORDER BY id LIMIT 20", (name,)
                )
            ]
            if apps or connectors:
                parts = []
                if apps:
                    parts.append("apps " + ", ".join(apps))
                if connectors:
                    parts.append("connectors " + ", ".join(connectors))
                raise Conflict(
                    f"connector group {name!r} is not empty ({'; '.join(parts)}); "
                    "delete or move those apps and assign those connectors to another group first"
                )
            db.execute("DELETE FROM tokens WHERE grp = ?", (name,))
            db.execute("DELETE FROM groups WHERE name = ?", (name,))
            self._bump(db, "group_deleted", name)

    def rename_group(self, old: str, new: str) -> Group:
        if DEFAULT_GROUP in (old, new):
            raise Conflict("the default group cannot be renamed, nor can another group take its name")
        with self._write() as db:
            self._require_group(db, old)
            if db.execute("SELECT 1 FROM groups WHERE name = ?", (new,)).fetchone():
                raise Conflict(f"connector group {new!r} already exists")
            db.execute("UPDATE groups SET name = ? WHERE name = ?", (new, old))
            for table in ("apps", "connectors", "tokens"):
                db.execute(f"UPDATE {table} SET grp = ? WHERE grp = ?", (new, old))
            self._bump(db, "group_renamed", f"{old}->{new}")
            row = db.execute(self._GROUP_QUERY + " WHERE g.name = ?", (new,)).fetchone()
        return Group(*row)

    # -- tokens

    def create_token(self, token_hash: str, group: str, expires: float, uses: int) -> str:
        now = self._clock()
        token_id = secrets.token_hex(6)
        with self._write() as db:
            self._require_group(db, group)
            db.execute("DELETE FROM tokens WHERE expires <= ? OR uses_left <= 0", (now,))
            if db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0] >= self.limits.max_tokens:
                raise LimitReached(
                    f"there are already {self.limits.max_tokens} unused enrollment tokens; "
                    "revoke some (`backhaul admin token list`, `token revoke ID`) or wait for them to expire"
                )
            db.execute(
                "INSERT INTO tokens (hash, grp, expires, uses_left, created, id) VALUES (?, ?, ?, ?, ?, ?)",
                (token_hash, group, expires, uses, now, token_id),
            )
        return token_id

    def list_tokens(self) -> list[Token]:
        with self._read() as db:
            rows = db.execute(
                "SELECT id, grp, uses_left, expires, created FROM tokens WHERE expires > ? AND uses_left > 0 "
                "ORDER BY created, id",
                (self._clock(),),
            )
            return [Token(*row) for row in rows]

    def revoke_token(self, token_id: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount == 0:
                raise NotFound(f"there is no enrollment token {token_id!r} (used up, expired or revoked); see `backhaul admin token list`")

    _TOKEN_REFUSED = "the enrollment token is unknown, expired or used up; create a new one with `backhaul admin token create`"

    def _refused(self, db: Db, token_hash: str, now: float) -> InvalidToken:
        """Why a token was refused, for the relay's log (the caller gets one message for all)."""
        row = db.execute("SELECT id, expires FROM tokens WHERE hash = ?", (token_hash,)).fetchone()
        if row is None:
            # Used-up tokens are deleted at their last use, revoked ones at once: all look unknown.
            return InvalidToken(self._TOKEN_REFUSED)
        return InvalidToken(self._TOKEN_REFUSED, reason="expired" if row[1] <= now else "used up", token_id=row[0])

    def check_token(self, token_hash: str) -> str:
        now = self._clock()
        with self._read() as db:
            row = db.execute(
                "SELECT grp FROM tokens WHERE hash = ? AND expires > ? AND uses_left > 0", (token_hash, now)
            ).fetchone()
            if row is None:
                raise self._refused(db, token_hash, now)
        return row[0]

    def enroll(self, token_hash: str, connector: Connector) -> Connector:
        now = self._clock()
        with self._write() as db:
            row = db.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ? AND expires > ? AND uses_left > 0 RETURNING grp",
                (token_hash, now),
            ).fetchone()
            if row is None:
                raise self._refused(db, token_hash, now)
            group = row[0]
            if db.execute("SELECT COUNT(*) FROM connectors").fetchone()[0] >= self.limits.max_connectors:
                raise LimitReached(f"there are already {self.limits.max_connectors} connectors; delete unused ones first")
            db.execute(
                "INSERT INTO connectors (id, name, hostname, version, grp, created, last_seen, source_addr, "
                "cert_serial, cert_expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    connector.id,
                    connector.name,
                    connector.hostname,
                    connector.version,
                    group,
                    now,
                    now,
                    connector.source_addr,
                    format(connector.cert_serial, "x"),
                    connector.cert_expires,
                ),
            )
            db.execute("DELETE FROM tokens WHERE hash = ? AND uses_left <= 0", (token_hash,))
            self._bump(db, "connector_enrolled", connector.id)
            return _connector(db.execute(f"SELECT {_CONNECTOR_COLUMNS} FROM connectors c WHERE c.id = ?", (self._fresh_since(), connector.id)).fetchone())

    # -- connectors

    def get_connector(self, connector_id: str) -> Connector | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_CONNECTOR_COLUMNS} FROM connectors c WHERE c.id = ?", (self._fresh_since(), connector_id)).fetchone()
        return _connector(row) if row else None

    def list_connectors(self) -> list[Connector]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_CONNECTOR_COLUMNS} FROM connectors c WHERE c.revoked = 0 ORDER BY c.grp, c.name, c.id", (self._fresh_since(),)
            )
            return [_connector(row) for row in rows]

    def _require_connector(self, db: Db, connector_id: str) -> None:
        if db.execute("SELECT 1 FROM connectors WHERE id = ? AND revoked = 0", (connector_id,)).fetchone() is None:
            raise NotFound(f"there is no connector {connector_id!r}; see `backhaul admin connector list`")

    def assign_connector(self, connector_id: str, group: str) -> Connector:
        with self._write() as db:
            self._require_connector(db, connector_id)
            self._require_group(db, group)
            db.execute("UPDATE connectors SET grp = ? WHERE id = ?", (group, connector_id))
            self._bump(db, "connector_assigned", connector_id)
            return _connector(
                db.execute(f"SELECT {_CONNECTOR_COLUMNS} FROM connectors c WHERE c.id = ?", (self._fresh_since(), connector_id)).fetchone()
            )

    def revoke_connector(self, connector_id: str) -> None:
        with self._write() as db:
            self._require_connector(db, connector_id)
            # The record stays, marked revoked, until its certificates expire, so the
            # relay and the API keep refusing them; prune() removes it afterwards.
            db.execute("UPDATE connectors SET revoked = 1 WHERE id = ?", (connector_id,))
            self._bump(db, "connector_revoked", connector_id)

    def renew_connector_cert(self, connector_id: str, serial: int, expires: float, presented: int | None = None) -> None:
        with self._write() as db:
            self._require_connector(db, connector_id)
            if presented is not None and db.execute(
                "SELECT 1 FROM connectors WHERE id = ? AND prev_serial = ? AND cert_serial != ?",
                (connector_id, format(presented, "x"), format(presented, "x")),
            ).fetchone():
                # Asked with the previous certificate: the current one never reached the
                # connector (it would have used it). Keep the one it holds; replace the lost one.
                db.execute(
                    "UPDATE connectors SET cert_serial = ?, cert_expires = ? WHERE id = ?",
                    (format(serial, "x"), expires, connector_id),
                )
                return
            db.execute(
                "UPDATE connectors SET prev_serial = cert_serial, prev_expires = cert_expires, "
                "cert_serial = ?, cert_expires = ? WHERE id = ?",
                (format(serial, "x"), expires, connector_id),
            )

    def retire_previous_cert(self, connector_id: str, serial: int, until: float) -> None:
        with self._write() as db:
            db.execute(
                # The WHERE clause makes prev_expires > until, so the new value is until.
                "UPDATE connectors SET prev_expires = ? "
                "WHERE id = ? AND cert_serial = ? AND prev_serial IS NOT NULL AND prev_expires > ?",
                (until, connector_id, format(serial, "x"), until),
            )

    def heartbeat(self, connector_id: str, stats: ConnectorStats, peer: str) -> None:
        with self._write() as db:
            self._require_connector(db, connector_id)
            db.execute(
                "UPDATE connectors SET version = ?, cpu = ?, memory = ?, active_streams = ?, bytes_in = ?, "
                "bytes_out = ?, last_seen = ?, source_addr = ? WHERE id = ?",
                (
                    stats.version,
                    stats.cpu,
                    stats.memory,
                    stats.streams,
                    stats.bytes_in,
                    stats.bytes_out,
                    self._clock(),
                    peer,
                    connector_id,
                ),
            )

    def set_app_health(self, connector_id: str, apps: dict[str, bool]) -> None:
        now = self._clock()
        with self._write() as db:
            self._require_connector(db, connector_id)
            group = db.execute("SELECT grp FROM connectors WHERE id = ?", (connector_id,)).fetchone()[0]
            known = {
                name: bool(ok)
                for name, ok in db.execute("SELECT app, ok FROM app_health WHERE connector_id = ?", (connector_id,))
            }
            gone = [(connector_id, name) for name in known if name not in apps]
            db.executemany("DELETE FROM app_health WHERE connector_id = ? AND app = ?", gone)
            # Only rows whose state changed are written, so `since` is when it last changed.
            changed = [(connector_id, name, int(ok), now, name, group) for name, ok in apps.items() if known.get(name) is not ok]
            db.executemany(
                "INSERT INTO app_health (connector_id, app, ok, since) "
                "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM apps WHERE name = ? AND grp = ?) "
                "ON CONFLICT (connector_id, app) DO UPDATE SET ok = excluded.ok, since = excluded.since",
                changed,
            )

    def origin_health(self) -> dict[str, list[OriginReport]]:
        reports: dict[str, list[OriginReport]] = {}
        with self._read() as db:
            rows = db.execute(
                "SELECT a.name, c.id, c.name, h.ok, h.since FROM apps a "
                "JOIN connectors c ON c.grp = a.grp AND c.revoked = 0 "
                f"AND EXISTS (SELECT 1 {LIVE_TUNNELS} AND t.connector_id = c.id) "
                "LEFT JOIN app_health h ON h.connector_id = c.id AND h.app = a.name "
                "ORDER BY a.name, c.name, c.id",
                (self._fresh_since(),),
            )
            for app, cid, cname, ok, since in rows:
                reports.setdefault(app, []).append(
                    OriginReport(connector_id=cid, connector=cname, reachable=None if ok is None else bool(ok), since=since)
                )
        return reports

    def prune(self, unseen_for: float) -> list[str]:
        now = self._clock()
        with self._write() as db:
            removed = [
                row[0]
                for row in db.execute(
                    "SELECT c.id FROM connectors c WHERE "
                    # Only the tunnels of up nodes keep a connector: a dead node's rows do not.
                    f"(c.revoked = 0 AND c.last_seen < ? AND NOT EXISTS (SELECT 1 {LIVE_TUNNELS} AND t.connector_id = c.id)) "
                    "OR (c.revoked = 1 AND c.cert_expires < ? AND (c.prev_expires IS NULL OR c.prev_expires < ?))",
                    (now - unseen_for, self._fresh_since(), now, now),
                )
            ]
            db.executemany("DELETE FROM connectors WHERE id = ?", [(cid,) for cid in removed])
            db.execute("DELETE FROM tokens WHERE expires <= ? OR uses_left <= 0", (now,))
            if removed:
                self._bump(db, "connectors_removed", ",".join(removed)[:200])
        return removed

    def connector_config(self, connector_id: str, refresh_interval: int = REFRESH_INTERVAL) -> dict[str, Any]:
        with self._read() as db:
            version = db.execute("SELECT version FROM config_version WHERE id = 1").fetchone()[0]
            row = db.execute("SELECT grp FROM connectors WHERE id = ? AND revoked = 0", (connector_id,)).fetchone()
            if row is None:
                raise NotFound(f"there is no connector {connector_id!r}; re-register it")
            group = row[0]
            apps = [
                {"name": name, "proto": proto, "target": target, "internal_url": internal_url, "health_path": health_path}
                # The connector does the TLS to an https backend, so it gets the app's TLS options.
                | ({"backend_ca": ca, "backend_insecure": bool(insecure)} if proto == "http" else {})
                for name, proto, target, internal_url, health_path, ca, insecure in db.execute(
                    "SELECT name, proto, target, internal_url, health_path, backend_ca, backend_insecure FROM apps "
                    "WHERE grp = ? ORDER BY name",
                    (group,),
                )
            ]
            nodes = self._up_nodes(db)
        # The ETag covers what the connector sees, not the global version, so a change
        # in another group does not make every connector download its config again.
        content = {"connector_id": connector_id, "group": group, "refresh_interval": refresh_interval, "apps": apps, "nodes": nodes}
        etag = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
        return {"version": version, "etag": etag, **content}

    # -- apps

    def list_apps(self) -> list[App]:
        with self._read() as db:
            return [_app(row) for row in db.execute(f"SELECT {_APP_COLUMNS} FROM apps ORDER BY name")]

    def get_app(self, name: str) -> App | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_APP_COLUMNS} FROM apps WHERE name = ?", (name,)).fetchone()
        return _app(row) if row else None

    def _check_app(self, db: Db, app: App, replacing: str | None) -> None:
        self._require_group(db, app.group)
        if app.name != replacing and db.execute("SELECT 1 FROM apps WHERE name = ?", (app.name,)).fetchone():
            raise Conflict(f"an app called {app.name!r} already exists; pick another name or delete it first")
        # Another app than the one replaced ("name IS NOT ?" is SQLite's, not PostgreSQL's).
        other = ("", ()) if replacing is None else (" AND name != ?", (replacing,))
        if app.port is not None:
            row = db.execute(
                "SELECT name FROM apps WHERE proto = ? AND port = ?" + other[0], (app.proto, app.port, *other[1])
            ).fetchone()
            if row:
                raise Conflict(f"{app.proto.upper()} port {app.port} is already used by app {row[0]!r}; pick another port")
        if app.external_host is not None:
            row = db.execute(
                "SELECT name FROM apps WHERE external_host = ?" + other[0], (app.external_host, *other[1])
            ).fetchone()
            if row:
                raise Conflict(f"host {app.external_host!r} is already used by app {row[0]!r}; pick another host name")

    def create_app(self, app: App) -> App:
        with self._write() as db:
            self._check_app(db, app, None)
            if db.execute("SELECT COUNT(*) FROM apps").fetchone()[0] >= self.limits.max_apps:
                raise LimitReached(f"there are already {self.limits.max_apps} apps; delete unused ones first")
            db.execute(
                f"INSERT INTO apps ({_APP_COLUMNS}, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*_app_values(app), self._clock()),
            )
            self._bump(db, "app_created", app.name)
        return app

    def update_app(self, name: str, app: App) -> App:
        with self._write() as db:
            if db.execute("SELECT 1 FROM apps WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"there is no app {name!r}; see `backhaul admin app list`")
            self._check_app(db, app, name)
            db.execute(
                "UPDATE apps SET name = ?, grp = ?, proto = ?, port = ?, target = ?, external_host = ?, "
                "internal_url = ?, preauth = ?, keep_host = ?, backend_ca = ?, backend_insecure = ?, health_path = ? WHERE name = ?",
                (*_app_values(app), name),
            )
            # What connectors said about the old app need not hold for the new one.
            db.execute("DELETE FROM app_health WHERE app = ?", (app.name,))
            self._bump(db, "app_updated", name)
        return app

    def delete_app(self, name: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM apps WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"there is no app {name!r}; see `backhaul admin app list`")
            self._bump(db, "app_deleted", name)
