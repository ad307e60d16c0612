"""The PostgreSQL store: one database shared by every relay node and worker process.

The logic is SqlStore's (store/sql.py), the same SQL as SQLite's; this module is the
plumbing. Each process keeps a small psycopg connection pool (the control API and the relay
run store calls on executor threads). Every write transaction first takes one
transaction-scoped advisory lock, so writers queue one behind the other as under SQLite's
BEGIN IMMEDIATE: a check-then-write (a name taken, a table full, the update lease held)
cannot go stale before its write, on any node, and READ COMMITTED is enough once the lock
is held (every earlier writer has committed). A writer that waits longer than
``StoreLimits.busy_timeout`` gives up with Unavailable. Reads run in REPEATABLE READ, READ
ONLY transactions: one snapshot, never blocked by writers.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Iterator, Sequence

import psycopg
import psycopg.conninfo
import psycopg_pool

from backhaul.config import ClusterSettings
from backhaul.errors import ConfigError
from backhaul.store.base import Conflict, StoreLimits, Unavailable
from backhaul.store.postgres_migrations import PG_MIGRATIONS
from backhaul.store.sql import CLASH, SqlStore

#: Advisory lock keys (any 64-bit numbers, fixed forever): b"backhaul" and the one after it.
WRITE_LOCK = 0x6261636B6861756C
MIGRATION_LOCK = WRITE_LOCK + 1
#: The channel every config_version bump is announced on (its payload: the new version).
NOTIFY_CHANNEL = "backhaul_config"


@functools.lru_cache(maxsize=1024)
def _placeholders(sql: str) -> str:
    """The shared SQL's ``?`` placeholders as psycopg's ``%s``. The store's SQL has no
    literal ``?`` or ``%`` (a ``%`` would be read as a placeholder), so a plain swap is exact."""
    if "%" in sql:
        raise ValueError(f"the store's SQL must not contain '%': {sql!r}")
    return sql.replace("?", "%s")


class _Db:
    """A pooled connection inside one transaction, with the sqlite3-like API SqlStore uses."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        return self._conn.execute(_placeholders(sql), tuple(params))

    def executemany(self, sql: str, seq: Any) -> None:
        rows = [tuple(row) for row in seq]
        if rows:
            with self._conn.cursor() as cursor:
                cursor.executemany(_placeholders(sql), rows)


def describe(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"the store URL is not a valid PostgreSQL URL ({exc}); write it as postgresql://USER@HOST:PORT/DBNAME") from exc
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host") or "localhost"
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


class PostgresStore(SqlStore):
    """The Store on a PostgreSQL database (``postgresql://`` URL)."""

    def __init__(
        self, url: str, *, limits: StoreLimits,
        clock: Callable[[], float] | None = None, cluster: ClusterSettings = ClusterSettings(),
    ) -> None:
        self.url = url
        self.where = describe(url)
        self.limits = limits
        self.cluster = cluster
        self._clock = clock or time.time
        self._connect_timeout = max(2, round(limits.busy_timeout))  # libpq's minimum is 2 s
        #: the pool could not give a connection in time, and no call got through since
        self._unreachable = False
        self._migrate()
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=limits.pool_size,
            kwargs={"autocommit": True, "connect_timeout": self._connect_timeout},
            configure=self._configure,
            # A connection the server dropped (a restart, pg_terminate_backend) is replaced
            # before use, not handed out to fail.
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=limits.busy_timeout,
            name="backhaul-store",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=limits.busy_timeout)
        except psycopg_pool.PoolTimeout as exc:
            self._pool.close()
            raise Unavailable(f"cannot reach the store {self.where} ({exc}); check that PostgreSQL runs") from exc

    def _configure(self, conn: psycopg.Connection) -> None:
        # How long a writer queues for the write lock (or any row lock) before Unavailable.
        conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(self.limits.busy_timeout * 1000)}ms",))
        conn.execute("SELECT set_config('application_name', 'backhaul', false)")

    # -- plumbing

    @contextlib.contextmanager
    def _operational(self) -> Iterator[None]:
        try:
            yield
        except psycopg_pool.PoolTimeout as exc:
            # No connection within the wait: the server is away. Until a call gets through,
            # callers wait only unreachable_wait for one (see _connection).
            self._unreachable = True
            raise Unavailable(f"the store {self.where} is busy or unavailable ({exc}); try again") from exc
        except psycopg.errors.IntegrityError as exc:
            raise Conflict(CLASH.format(exc.diag.message_primary)) from exc
        except psycopg.OperationalError as exc:
            # Lost or refused connections, the lock timeout, the pool's wait: all transient.
            raise Unavailable(f"the store {self.where} is busy or unavailable ({exc}); try again") from exc

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        wait = self.limits.unreachable_wait if self._unreachable else None  # None: the pool's busy_timeout
        with self._pool.connection(timeout=wait) as conn:
            yield conn
        self._unreachable = False

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Db]:
        with self._operational(), self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield _Db(conn)

    @contextlib.contextmanager
    def _read(self) -> Iterator[_Db]:
        with self._operational(), self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _Db(conn)

    def _migrate(self) -> None:
        """Apply the pending migrations in one transaction; several nodes starting at once
        queue on an advisory lock, and the first one migrates."""
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"cannot reach the store {self.where} ({exc}); check the URL and that PostgreSQL runs") from exc
        with conn, self._operational(), conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            self._apply_migrations(_Db(conn), PG_MIGRATIONS, self.where, "DOUBLE PRECISION")

    def _notify(self, db: _Db, version: int) -> None:
        # Delivered at commit, to every node LISTENing (store/notify.py): it only wakes them,
        # they read the version (the truth) themselves.
        db.execute("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, str(version)))

    def close(self) -> None:
        self._pool.close()
