"""The SQLite store: one file in WAL mode shared by every relay worker process.

Each process holds one connection (guarded by a lock, since the control API runs store
calls on executor threads). Writes run in ``BEGIN IMMEDIATE`` transactions, so
concurrent writers queue on SQLite's busy timeout instead of failing or losing updates.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from backhaul.config import ClusterSettings
from backhaul.errors import ConfigError
from backhaul.store.base import Conflict, StoreLimits, Unavailable
from backhaul.store.migrations import MIGRATIONS
from backhaul.store.sql import CLASH, SqlStore


class SqliteStore(SqlStore):
    """The Store on one SQLite file."""

    def __init__(
        self, path: Path, *, limits: StoreLimits,
        clock: Callable[[], float] | None = None, cluster: ClusterSettings = ClusterSettings(),
    ) -> None:
        self.path = Path(path)
        self.limits = limits
        self.cluster = cluster
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
        except sqlite3.IntegrityError as exc:
            raise Conflict(CLASH.format(exc)) from exc
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
            self._apply_migrations(db, MIGRATIONS, str(self.path), "REAL")

    def close(self) -> None:
        with self._lock:
            self._db.close()
