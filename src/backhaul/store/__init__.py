"""The store: groups, enrollment tokens, connectors, apps, the admin token hash.

Callers use the ``Store`` interface and ``open_store`` only, so another backend
(PostgreSQL for several relay nodes) can be added without touching them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from backhaul.config import ClusterSettings

from backhaul.store.base import (
    DEFAULT_GROUP,
    HALTING_STEPS,
    LEASE_RELEASING_STEPS,
    UPDATE_STEPS,
    App,
    Conflict,
    Connector,
    ConnectorStats,
    Group,
    GroupRollout,
    InvalidToken,
    LeaseRefused,
    LimitReached,
    Node,
    NotFound,
    OriginReport,
    Release,
    ReleaseFile,
    ReportOutcome,
    Store,
    StoreError,
    StoreLimits,
    Token,
    Unavailable,
    UpdateFailure,
    UpdateLease,
    UpdateReport,
)

__all__ = [
    "DEFAULT_GROUP",
    "App",
    "Conflict",
    "Connector",
    "ConnectorStats",
    "Group",
    "InvalidToken",
    "LimitReached",
    "Node",
    "NotFound",
    "OriginReport",
    "Release",
    "ReleaseFile",
    "Store",
    "StoreError",
    "StoreLimits",
    "STORE_FILE",
    "POSTGRES_SCHEMES",
    "Token",
    "Unavailable",
    "open_store",
    "HALTING_STEPS",
    "LEASE_RELEASING_STEPS",
    "UPDATE_STEPS",
    "GroupRollout",
    "LeaseRefused",
    "ReportOutcome",
    "UpdateFailure",
    "UpdateLease",
    "UpdateReport",
]

#: File name of the SQLite store inside a service data dir.
STORE_FILE = "store.sqlite"
#: How a PostgreSQL store's location starts (libpq's URL schemes).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(
    location: str | os.PathLike,
    *,
    limits: StoreLimits | None = None,
    clock: Callable[[], float] | None = None,
    cluster: ClusterSettings | None = None,
) -> Store:
    """Open (creating and migrating if needed) the store at ``location``.

    ``location`` is a service data dir (the store is its ``store.sqlite``), the path of a
    SQLite file, or a ``postgresql://`` URL (the store of several relay nodes).
    ``clock`` returns the current time in seconds (tests inject one); ``cluster`` holds the
    node freshness and the bounds of the nodes and change-log tables.
    """
    cluster = cluster or ClusterSettings()
    if isinstance(location, str) and location.startswith(POSTGRES_SCHEMES):
        # Imported here: a one-node relay on SQLite never loads the PostgreSQL driver.
        from backhaul.store.postgres import PostgresStore

        return PostgresStore(location, limits=limits or StoreLimits(), clock=clock, cluster=cluster)
    from backhaul.store.sqlite import SqliteStore

    path = Path(location)
    if path.is_dir():
        path = path / STORE_FILE
    return SqliteStore(path, limits=limits or StoreLimits(), clock=clock, cluster=cluster)
