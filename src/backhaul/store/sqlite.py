"""The SQLite store: one file in WAL mode shared by every relay worker process.

Each process holds one connection (guarded by a lock, since the control API runs store
calls on executor threads). Writes run in ``BEGIN IMMEDIATE`` transactions, so
concurrent writers queue on SQLite's busy timeout instead of failing or losing updates.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

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
    Release,
    ReleaseFile,
    Store,
    StoreLimits,
    Token,
    Unavailable,
)
from backhaul.store.migrations import MIGRATIONS

# -- rollout
from backhaul import maintenance
from backhaul.store.base import (
    HALTING_STEPS,
    LEASE_RELEASING_STEPS,
    GroupRollout,
    LeaseRefused,
    ReportOutcome,
    UpdateFailure,
    UpdateLease,
    UpdateReport,
)

_CONNECTOR_COLUMNS = (
    "c.id, c.name, c.hostname, c.version, c.grp, c.created, c.last_seen, c.source_addr, c.cert_serial, "
    "c.cert_expires, c.revoked, c.prev_serial, c.prev_expires, "
    "COALESCE((SELECT SUM(t.count) FROM tunnels t WHERE t.connector_id = c.id), 0), "
    "c.active_streams, c.bytes_in, c.bytes_out, c.cpu, c.memory"
)
_APP_COLUMNS = (
    "name, grp, proto, port, target, external_host, internal_url, preauth, keep_host, backend_ca, backend_insecure, health_path"
)


def _connector(row: tuple) -> Connector:
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
        tunnels=int(row[13]),
        active_streams=row[14],
        bytes_in=row[15],
        bytes_out=row[16],
        cpu=row[17],
        memory=row[18],
    )


def _app(row: tuple) -> App:
    return App(*row[:8], keep_host=bool(row[8]), backend_ca=row[9], backend_insecure=bool(row[10]), health_path=row[11])


def _app_values(app: App) -> tuple:
    return (
        app.name, app.group, app.proto, app.port, app.target, app.external_host, app.internal_url, app.preauth,
        int(app.keep_host), app.backend_ca, int(app.backend_insecure), app.health_path,
    )


class SqliteStore(Store):
    """The Store on one SQLite file."""

    def __init__(self, path: Path, *, limits: StoreLimits, clock: Callable[[], float] | None = None) -> None:
        self.path = Path(path)
        self.limits = limits
        self._clock = clock or time.time
        self._lock = threading.Lock()
        if not self.path.parent.is_dir():
            raise ConfigError(f"directory {self.path.parent} of the store does not exist; run `backhaul service init`")
        # The store holds token hashes, the inventory, internal URLs and CA bundles: the
        # file and SQLite's -wal/-shm files, made by this process or by a later write, are
        # its owner's only (umask 077 while the connection creates them).
        old_umask = os.umask(0o077)
        try:
            self._db = sqlite3.connect(
                self.path, timeout=limits.busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout = {int(limits.busy_timeout * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"cannot open the store {self.path}: {exc}; restore it from a backup") from exc
        finally:
            os.umask(old_umask)

    # -- plumbing

    @contextlib.contextmanager
    def _operational(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"the store {self.path} is busy or unavailable ({exc}); try again") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._operational():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # A deferred transaction gives every statement inside one consistent snapshot.
        with self._lock, self._operational():
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                if self._db.in_transaction:
                    self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
            done = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            known = {version for version, _ in MIGRATIONS}
            if done - known:
                raise ConfigError(
                    f"the store {self.path} was written by a newer backhaul (schema {max(done)}); upgrade backhaul"
                )
            for version, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations (version, applied) VALUES (?, ?)", (version, self._clock()))

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE config_version SET version = version + 1 WHERE id = 1")

    @staticmethod
    def _require_group(db: sqlite3.Connection, name: str) -> None:
        if db.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone() is None:
            raise NotFound(f"there is no connector group {name!r}; create it with `backhaul admin group create {name}`")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- meta

    def config_version(self) -> int:
        with self._lock, self._operational():
            return self._db.execute("SELECT version FROM config_version WHERE id = 1").fetchone()[0]

    def set_admin_token_hash(self, token_hash: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('admin_token_sha256', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (token_hash,),
            )

    def admin_token_hash(self) -> str | None:
        with self._lock, self._operational():
            row = self._db.execute("SELECT value FROM meta WHERE key = 'admin_token_sha256'").fetchone()
        return row[0] if row else None

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
            self._bump(db)
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
            self._bump(db)

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
            self._bump(db)
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

    def _refused(self, db: sqlite3.Connection, token_hash: str, now: float) -> InvalidToken:
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
            self._bump(db)
            return _connector(db.execute(f"SELECT {_CONNECTOR_COLUMNS} FROM connectors c WHERE c.id = ?", (connector.id,)).fetchone())

    # -- connectors

    def get_connector(self, connector_id: str) -> Connector | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_CONNECTOR_COLUMNS} FROM connectors c WHERE c.id = ?", (connector_id,)).fetchone()
        return _connector(row) if row else None

    def list_connectors(self) -> list[Connector]:
        with self._read() as db:
            rows = db.execute(f"SELECT {_CONNECTOR_COLUMNS} FROM connectors c WHERE c.revoked = 0 ORDER BY c.grp, c.name, c.id")
            return [_connector(row) for row in rows]

    def _require_connector(self, db: sqlite3.Connection, connector_id: str) -> None:
        if db.execute("SELECT 1 FROM connectors WHERE id = ? AND revoked = 0", (connector_id,)).fetchone() is None:
            raise NotFound(f"there is no connector {connector_id!r}; see `backhaul admin connector list`")

    def assign_connector(self, connector_id: str, group: str) -> Connector:
        with self._write() as db:
            self._require_connector(db, connector_id)
            self._require_group(db, group)
            db.execute("UPDATE connectors SET grp = ? WHERE id = ?", (group, connector_id))
            self._bump(db)
            return _connector(db.execute(f"SELECT {_CONNECTOR_COLUMNS} FROM connectors c WHERE c.id = ?", (connector_id,)).fetchone())

    def revoke_connector(self, connector_id: str) -> None:
        with self._write() as db:
            self._require_connector(db, connector_id)
            # The record stays, marked revoked, until its certificates expire, so the
            # relay and the API keep refusing them; prune() removes it afterwards.
            db.execute("UPDATE connectors SET revoked = 1 WHERE id = ?", (connector_id,))
            self._bump(db)

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
                "UPDATE connectors SET prev_expires = MIN(prev_expires, ?) "
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
                "AND EXISTS (SELECT 1 FROM tunnels t WHERE t.connector_id = c.id AND t.count > 0) "
                "LEFT JOIN app_health h ON h.connector_id = c.id AND h.app = a.name "
                "ORDER BY a.name, c.name, c.id"
            )
            for app, cid, cname, ok, since in rows:
                reports.setdefault(app, []).append(
                    OriginReport(connector_id=cid, connector=cname, reachable=None if ok is None else bool(ok), since=since)
                )
        return reports

    def tunnel_changed(self, connector_id: str, worker: int, delta: int, peer: str) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM connectors WHERE id = ?", (connector_id,)).fetchone() is None:
                return
            db.execute(
                "INSERT INTO tunnels (connector_id, worker, count) VALUES (?, ?, MAX(0, ?)) "
                "ON CONFLICT (connector_id, worker) DO UPDATE SET count = MAX(0, count + ?)",
                (connector_id, worker, delta, delta),
            )
            db.execute("DELETE FROM tunnels WHERE connector_id = ? AND worker = ? AND count = 0", (connector_id, worker))
            db.execute(
                "UPDATE connectors SET last_seen = ?, source_addr = ? WHERE id = ?", (self._clock(), peer, connector_id)
            )

    def mark_worker_down(self, worker: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM tunnels WHERE worker = ?", (worker,))

    def prune(self, unseen_for: float) -> list[str]:
        now = self._clock()
        with self._write() as db:
            removed = [
                row[0]
                for row in db.execute(
                    "SELECT c.id FROM connectors c WHERE "
                    "(c.revoked = 0 AND c.last_seen < ? AND NOT EXISTS (SELECT 1 FROM tunnels t WHERE t.connector_id = c.id)) "
                    "OR (c.revoked = 1 AND c.cert_expires < ? AND (c.prev_expires IS NULL OR c.prev_expires < ?))",
                    (now - unseen_for, now, now),
                )
            ]
            db.executemany("DELETE FROM connectors WHERE id = ?", [(cid,) for cid in removed])
            db.execute("DELETE FROM tokens WHERE expires <= ? OR uses_left <= 0", (now,))
            if removed:
                self._bump(db)
        return removed

    def connector_config(self, connector_id: str, refresh_interval: int = 120) -> dict[str, Any]:
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
        # The ETag covers what the connector sees, not the global version, so a change
        # in another group does not make every connector download its config again.
        content = {"connector_id": connector_id, "group": group, "refresh_interval": refresh_interval, "apps": apps}
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

    def _check_app(self, db: sqlite3.Connection, app: App, replacing: str | None) -> None:
        self._require_group(db, app.group)
        if app.name != replacing and db.execute("SELECT 1 FROM apps WHERE name = ?", (app.name,)).fetchone():
            raise Conflict(f"an app called {app.name!r} already exists; pick another name or delete it first")
        if app.port is not None:
            row = db.execute(
                "SELECT name FROM apps WHERE proto = ? AND port = ? AND name IS NOT ?", (app.proto, app.port, replacing)
            ).fetchone()
            if row:
                raise Conflict(f"{app.proto.upper()} port {app.port} is already used by app {row[0]!r}; pick another port")
        if app.external_host is not None:
            row = db.execute(
                "SELECT name FROM apps WHERE external_host = ? AND name IS NOT ?", (app.external_host, replacing)
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
            self._bump(db)
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
            self._bump(db)
        return app

    def delete_app(self, name: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM apps WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"there is no app {name!r}; see `backhaul admin app list`")
            self._bump(db)

    # -- releases

    _RELEASE_COLUMNS = "version, manifest, signature, public_key, key_id, issued, expires, auto, state, created, revoked"

    @staticmethod
    def _release(db: sqlite3.Connection, row: tuple) -> Release:
        files = tuple(
            ReleaseFile(name=name, sha256=sha256, size=size, complete=bool(complete))
            for name, sha256, size, complete in db.execute(
                "SELECT name, sha256, size, complete FROM release_files WHERE version = ? ORDER BY name", (row[0],)
            )
        )
        return Release(
            version=row[0], manifest=bytes(row[1]), signature=bytes(row[2]), public_key=row[3], key_id=row[4],
            issued=row[5], expires=row[6], auto=bool(row[7]), state=row[8], created=row[9], revoked=row[10], files=files,
        )

    def _get_release(self, db: sqlite3.Connection, version: str) -> Release | None:
        row = db.execute(f"SELECT {self._RELEASE_COLUMNS} FROM releases WHERE version = ?", (version,)).fetchone()
        return self._release(db, row) if row else None

    def _require_release(self, db: sqlite3.Connection, version: str) -> Release:
        release = self._get_release(db, version)
        if release is None:
            raise NotFound(f"there is no release {version!r}; see `backhaul admin release list`")
        return release

    def create_release(self, release: Release, *, max_stored: int, max_records: int) -> tuple[Release, bool]:
        with self._write() as db:
            existing = self._get_release(db, release.version)
            if existing is not None and existing.state == "incomplete":
                if existing.manifest == release.manifest and existing.signature == release.signature:
                    return existing, False
                # Never served: a new manifest of the same version (a publish run again) replaces it.
                db.execute("DELETE FROM releases WHERE version = ?", (release.version,))
            elif existing is not None:
                raise Conflict(
                    f"release {release.version} already exists ({existing.state}); a version is published once: "
                    "bump the version to publish other files"
                )
            stored = db.execute("SELECT COUNT(*) FROM releases WHERE state != 'revoked'").fetchone()[0]
            if stored >= max_stored:
                raise LimitReached(
                    f"there are already {max_stored} releases holding files; revoke old ones first (`backhaul admin release revoke VERSION`)"
                )
            if db.execute("SELECT COUNT(*) FROM releases").fetchone()[0] >= max_records:
                raise LimitReached(f"there are already {max_records} release records (revoked ones included)")
            db.execute(
                f"INSERT INTO releases ({self._RELEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'incomplete', ?, NULL)",
                (
                    release.version, release.manifest, release.signature, release.public_key, release.key_id,
                    release.issued, release.expires, int(release.auto), self._clock(),
                ),
            )
            db.executemany(
                "INSERT INTO release_files (version, name, sha256, size) VALUES (?, ?, ?, ?)",
                [(release.version, f.name, f.sha256, f.size) for f in release.files],
            )
            return self._require_release(db, release.version), True

    def list_releases(self) -> list[Release]:
        with self._read() as db:
            rows = db.execute(f"SELECT {self._RELEASE_COLUMNS} FROM releases ORDER BY created DESC, version").fetchall()
            return [self._release(db, row) for row in rows]

    def get_release(self, version: str) -> Release | None:
        with self._read() as db:
            return self._get_release(db, version)

    def revoke_release(self, version: str) -> Release:
        with self._write() as db:
            release = self._require_release(db, version)
            if release.state != "revoked":
                db.execute("UPDATE releases SET state = 'revoked', revoked = ? WHERE version = ?", (self._clock(), version))
                # The bytes go (the space is the point of max_stored); the record stays, so the
                # version is never served nor accepted again.
                db.execute("DELETE FROM release_chunks WHERE version = ?", (version,))
                db.execute("UPDATE release_files SET complete = 0, upload = NULL WHERE version = ?", (version,))
            return self._require_release(db, version)

    def _require_uploading(self, db: sqlite3.Connection, version: str, name: str, upload: str | None = None) -> None:
        release = self._require_release(db, version)
        if release.state != "incomplete":
            raise Conflict(f"release {version} is {release.state}: its files can no longer be uploaded")
        row = db.execute("SELECT complete, upload FROM release_files WHERE version = ? AND name = ?", (version, name)).fetchone()
        if row is None:
            raise NotFound(f"release {version} has no file {name!r} (the manifest names its files)")
        if row[0]:
            raise Conflict(f"{name} of release {version} is already uploaded")
        if upload is not None and row[1] != upload:
            raise Conflict(f"another upload of {name} (release {version}) started since this one; it alone goes on")

    def begin_file_upload(self, version: str, name: str) -> str:
        upload = secrets.token_hex(8)
        with self._write() as db:
            self._require_uploading(db, version, name)
            db.execute("DELETE FROM release_chunks WHERE version = ? AND name = ?", (version, name))
            db.execute("UPDATE release_files SET upload = ? WHERE version = ? AND name = ?", (upload, version, name))
        return upload

    def put_file_chunk(self, version: str, name: str, upload: str, seq: int, data: bytes) -> None:
        with self._write() as db:
            self._require_uploading(db, version, name, upload)
            db.execute("INSERT INTO release_chunks (version, name, seq, data) VALUES (?, ?, ?, ?)", (version, name, seq, data))

    def finish_file_upload(self, version: str, name: str, upload: str) -> Release:
        with self._write() as db:
            self._require_uploading(db, version, name, upload)
            db.execute("UPDATE release_files SET complete = 1, upload = NULL WHERE version = ? AND name = ?", (version, name))
            if db.execute("SELECT 1 FROM release_files WHERE version = ? AND complete = 0", (version,)).fetchone() is None:
                db.execute("UPDATE releases SET state = 'published' WHERE version = ?", (version,))
            return self._require_release(db, version)

    def abort_file_upload(self, version: str, name: str, upload: str) -> None:
        with self._write() as db:
            if db.execute(
                "UPDATE release_files SET upload = NULL WHERE version = ? AND name = ? AND upload = ? AND complete = 0",
                (version, name, upload),
            ).rowcount:
                db.execute("DELETE FROM release_chunks WHERE version = ? AND name = ?", (version, name))

    def read_file_chunk(self, version: str, name: str, seq: int) -> bytes | None:
        with self._read() as db:
            row = db.execute(
                "SELECT c.data FROM release_chunks c JOIN releases r ON r.version = c.version "
                "JOIN release_files f ON f.version = c.version AND f.name = c.name "
                "WHERE c.version = ? AND c.name = ? AND c.seq = ? AND r.state = 'published' AND f.complete = 1",
                (version, name, seq),
            ).fetchone()
        return bytes(row[0]) if row else None
    # -- rollout

    _ROLLOUT_COLUMNS = (
        "g.name, COALESCE(r.allow_downtime, 0), r.update_window, COALESCE(r.paused, 0), "
        "r.halted, r.halted_connector, r.halted_version, r.halted_at"
    )

    def _rollout(self, db: sqlite3.Connection, row: tuple, now: float, listed_failures: int) -> GroupRollout:
        name = row[0]
        lease = db.execute(
            "SELECT l.grp, l.connector_id, l.version, l.token, l.granted, l.expires FROM update_leases l "
            "JOIN connectors c ON c.id = l.connector_id AND c.grp = l.grp AND c.revoked = 0 "
            "WHERE l.grp = ? AND l.expires > ?",
            (name, now),
        ).fetchone()
        versions = dict(
            db.execute(
                "SELECT version, COUNT(*) FROM connectors WHERE grp = ? AND revoked = 0 GROUP BY version ORDER BY version",
                (name,),
            ).fetchall()
        )
        failed = "FROM update_failures f JOIN connectors c ON c.id = f.connector_id WHERE c.grp = ? AND c.revoked = 0"
        total = db.execute(f"SELECT COUNT(*) {failed}", (name,)).fetchone()[0]
        failures = tuple(
            UpdateFailure(*r)
            for r in db.execute(
                f"SELECT f.connector_id, c.name, f.version, f.step, f.reason, f.at {failed} ORDER BY f.at DESC, f.connector_id LIMIT ?",
                (name, listed_failures),
            )
        )
        return GroupRollout(
            group=name,
            allow_downtime=bool(row[1]),
            window=row[2],
            paused=bool(row[3]),
            halted=row[4],
            halted_connector=row[5],
            halted_version=row[6],
            halted_at=row[7],
            lease=UpdateLease(*lease) if lease else None,
            versions=versions,
            failures=failures,
            failures_total=total,
        )

    def group_rollout(self, name: str, listed_failures: int = 100) -> GroupRollout:
        now = self._clock()
        with self._read() as db:
            row = db.execute(
                f"SELECT {self._ROLLOUT_COLUMNS} FROM groups g LEFT JOIN group_rollout r ON r.grp = g.name WHERE g.name = ?",
                (name,),
            ).fetchone()
            if row is None:
                raise NotFound(f"there is no connector group {name!r}; see `backhaul admin group list`")
            return self._rollout(db, row, now, listed_failures)

    def list_rollouts(self, listed_failures: int = 100) -> list[GroupRollout]:
        now = self._clock()
        with self._read() as db:
            rows = db.execute(
                f"SELECT {self._ROLLOUT_COLUMNS} FROM groups g LEFT JOIN group_rollout r ON r.grp = g.name ORDER BY g.name"
            ).fetchall()
            return [self._rollout(db, row, now, listed_failures) for row in rows]

    def update_failure_counts(self) -> dict[tuple[str, str, str], int]:
        with self._read() as db:
            rows = db.execute(
                "SELECT c.grp, f.version, f.step, COUNT(*) FROM update_failures f "
                "JOIN connectors c ON c.id = f.connector_id WHERE c.revoked = 0 GROUP BY c.grp, f.version, f.step"
            ).fetchall()
        return {(grp, version, step): count for grp, version, step, count in rows}

    @staticmethod
    def _rollout_row(db: sqlite3.Connection, name: str) -> None:
        db.execute("INSERT INTO group_rollout (grp) VALUES (?) ON CONFLICT (grp) DO NOTHING", (name,))

    def set_group_updates(self, name: str, changes: dict[str, Any]) -> GroupRollout:
        unknown = set(changes) - {"allow_downtime", "window"}
        if unknown:
            raise ValueError(f"unknown group update settings {sorted(unknown)}")
        if changes.get("window") is not None:
            # Stored canonical, so what is shown is what is evaluated.
            changes = {**changes, "window": maintenance.canonical(changes["window"])}
        with self._write() as db:
            self._require_group(db, name)
            self._rollout_row(db, name)
            if "allow_downtime" in changes:
                db.execute("UPDATE group_rollout SET allow_downtime = ? WHERE grp = ?", (int(bool(changes["allow_downtime"])), name))
            if "window" in changes:
                db.execute("UPDATE group_rollout SET update_window = ? WHERE grp = ?", (changes["window"], name))
        return self.group_rollout(name)

    def _groups(self, db: sqlite3.Connection, name: str | None) -> list[str]:
        if name is None:
            return [r[0] for r in db.execute("SELECT name FROM groups ORDER BY name")]
        self._require_group(db, name)
        return [name]

    def pause_rollout(self, name: str | None) -> list[str]:
        with self._write() as db:
            changed = []
            for group in self._groups(db, name):
                self._rollout_row(db, group)
                if db.execute("UPDATE group_rollout SET paused = 1 WHERE grp = ? AND paused = 0", (group,)).rowcount:
                    changed.append(group)
            return changed

    def resume_rollout(self, name: str | None) -> list[str]:
        with self._write() as db:
            changed = []
            for group in self._groups(db, name):
                if db.execute(
                    "UPDATE group_rollout SET paused = 0, halted = NULL, halted_connector = NULL, halted_version = NULL, "
                    "halted_at = NULL WHERE grp = ? AND (paused != 0 OR halted IS NOT NULL)",
                    (group,),
                ).rowcount:
                    changed.append(group)
            return changed

    def _holder(self, db: sqlite3.Connection, connector_id: str) -> str:
        """The group of a connector that may take part in a rollout (NotFound otherwise)."""
        row = db.execute("SELECT grp FROM connectors WHERE id = ? AND revoked = 0", (connector_id,)).fetchone()
        if row is None:
            raise NotFound(f"there is no connector {connector_id!r}; re-register it")
        return row[0]

    def acquire_update_lease(self, connector_id: str, version: str, seconds: float) -> UpdateLease:
        # One write transaction (BEGIN IMMEDIATE) from the first read to the grant: relay
        # workers in other processes asking at the same time queue behind it, so the check
        # "nobody else holds it" cannot go stale before the grant.
        now = self._clock()
        with self._write() as db:
            group = self._holder(db, connector_id)
            settings = db.execute(
                "SELECT allow_downtime, update_window, paused, halted, halted_connector, halted_version "
                "FROM group_rollout WHERE grp = ?",
                (group,),
            ).fetchone() or (0, None, 0, None, None, None)
            allow_downtime, window, paused, halted, halted_connector, halted_version = settings
            if paused:
                raise LeaseRefused(
                    f"the rollout of group {group!r} is paused; `backhaul admin rollout resume --group {group}` resumes it",
                    reason="paused",
                )
            if halted is not None:
                raise LeaseRefused(
                    f"the rollout of group {group!r} is halted: version {halted_version} failed on connector "
                    f"{halted_connector} ({halted}); fix the release, then `backhaul admin rollout resume --group {group}`",
                    reason="halted",
                )
            held = db.execute(
                "SELECT l.connector_id, l.version, l.expires FROM update_leases l "
                "JOIN connectors c ON c.id = l.connector_id AND c.grp = l.grp AND c.revoked = 0 "
                "WHERE l.grp = ? AND l.expires > ?",
                (group, now),
            ).fetchone()
            if held is not None and held[0] != connector_id:
                raise LeaseRefused(
                    f"connector {held[0]} of group {group!r} is updating to {held[1]} (its lease runs for "
                    f"{max(0, round(held[2] - now))} s more); one connector of a group updates at a time",
                    reason="busy",
                )
            if not allow_downtime:
                others = db.execute(
                    "SELECT COUNT(*) FROM connectors c WHERE c.grp = ? AND c.revoked = 0 AND c.id != ? "
                    "AND EXISTS (SELECT 1 FROM tunnels t WHERE t.connector_id = c.id AND t.count > 0)",
                    (group, connector_id),
                ).fetchone()[0]
                if not others:
                    self._refuse_alone(group, window, now)
            token = db.execute("UPDATE update_fence SET token = token + 1 WHERE id = 1 RETURNING token").fetchone()[0]
            # Replaces an expired lease, a lease of a holder gone from the group, or this
            # connector's own older lease (whose token is stale from now on).
            db.execute(
                "INSERT INTO update_leases (grp, connector_id, version, token, granted, expires) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (grp) DO UPDATE SET connector_id = excluded.connector_id, version = excluded.version, "
                "token = excluded.token, granted = excluded.granted, expires = excluded.expires",
                (group, connector_id, version, token, now, now + seconds),
            )
        return UpdateLease(group, connector_id, version, token, now, now + seconds)

    @staticmethod
    def _refuse_alone(group: str, window: str | None, now: float) -> None:
        """No other connector of the group is active: refused unless inside the maintenance window."""
        if window is None:
            raise LeaseRefused(
                f"no other connector of group {group!r} is active, so updating this one would stop the group's apps; "
                f"start another connector, or allow it: `backhaul admin group update {group} --allow-downtime yes` "
                "or a maintenance window (`--window`)",
                reason="alone",
            )
        spec = maintenance.Window.parse(window)
        if spec.contains(now):
            return
        opens = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(spec.next_open(now)))
        raise LeaseRefused(
            f"no other connector of group {group!r} is active and its maintenance window ({window}, UTC) is closed; "
            f"it opens at {opens}",
            reason="outside_window",
        )

    def renew_update_lease(self, connector_id: str, token: int, seconds: float) -> UpdateLease:
        now = self._clock()
        with self._write() as db:
            self._holder(db, connector_id)
            row = db.execute(
                "UPDATE update_leases SET expires = ? WHERE connector_id = ? AND token = ? AND expires > ? "
                "AND grp = (SELECT grp FROM connectors WHERE id = ?) "
                "RETURNING grp, connector_id, version, token, granted, expires",
                (now + seconds, connector_id, token, now, connector_id),
            ).fetchone()
            if row is None:
                raise LeaseRefused(
                    f"lease {token} is not held any more (it expired, was granted again or was released); "
                    "stop the update and ask for a new lease",
                    reason="stale",
                )
        return UpdateLease(*row)

    def report_update(
        self, connector_id: str, version: str, step: str, reason: str, token: int | None, *, keep: int, keep_failures: int
    ) -> ReportOutcome:
        now = self._clock()
        with self._write() as db:
            group = self._holder(db, connector_id)
            db.execute(
                "INSERT INTO update_reports (connector_id, grp, version, step, reason, token, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (connector_id, group, version, step, reason, token, now),
            )
            db.execute(
                "DELETE FROM update_reports WHERE connector_id = ? AND id NOT IN "
                "(SELECT id FROM update_reports WHERE connector_id = ? ORDER BY id DESC LIMIT ?)",
                (connector_id, connector_id, keep),
            )
            released = False
            if step in LEASE_RELEASING_STEPS and token is not None:
                # Only the current token releases: a report of a superseded holder leaves the newer lease alone.
                released = bool(
                    db.execute("DELETE FROM update_leases WHERE connector_id = ? AND token = ?", (connector_id, token)).rowcount
                )
            halted = False
            if step in HALTING_STEPS:
                db.execute(
                    "INSERT INTO update_failures (connector_id, version, step, reason, at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (connector_id, version) DO UPDATE SET step = excluded.step, reason = excluded.reason, at = excluded.at",
                    (connector_id, version, step, reason, now),
                )
                db.execute(
                    "DELETE FROM update_failures WHERE connector_id = ? AND version NOT IN "
                    "(SELECT version FROM update_failures WHERE connector_id = ? ORDER BY at DESC, version DESC LIMIT ?)",
                    (connector_id, connector_id, keep_failures),
                )
                self._rollout_row(db, group)
                # The first failure is the one to read: later ones do not overwrite its reason.
                halted = bool(
                    db.execute(
                        "UPDATE group_rollout SET halted = ?, halted_connector = ?, halted_version = ?, halted_at = ? "
                        "WHERE grp = ? AND halted IS NULL",
                        (reason or step, connector_id, version, now, group),
                    ).rowcount
                )
        return ReportOutcome(group=group, released=released, halted=halted)

    def update_reports(self, connector_id: str) -> list[UpdateReport]:
        with self._read() as db:
            rows = db.execute(
                "SELECT connector_id, grp, version, step, reason, token, at FROM update_reports WHERE connector_id = ? ORDER BY id",
                (connector_id,),
            )
            return [UpdateReport(*row) for row in rows]

    def set_connector_version(self, connector_id: str, version: str) -> bool:
        with self._write() as db:
            return bool(
                db.execute(
                    "UPDATE connectors SET version = ? WHERE id = ? AND revoked = 0 AND version != ?",
                    (version, connector_id, version),
                ).rowcount
            )
