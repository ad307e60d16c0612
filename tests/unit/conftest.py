"""Fixtures shared by the unit tests."""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest


def _load_codec(name: str):
    module = f"backhaul.protocol.{name}"
    if name == "_framing_py":
        return importlib.import_module(module)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("BACKHAUL_REQUIRE_EXT") == "1":
            pytest.fail(f"the Cython codec is required (BACKHAUL_REQUIRE_EXT=1) but does not import: {exc}")
        pytest.skip(f"Cython codec not built ({exc}); run tools/bootstrap.sh")


@pytest.fixture(params=["_framing_py", "_framing_c"], ids=["python", "cython"])
def codec(request):
    """Each frame codec build in turn: the pure twin and the Cython extension."""
    return _load_codec(request.param)


@pytest.fixture
def both_codecs():
    """(pure twin, Cython build) for differential tests."""
    return _load_codec("_framing_py"), _load_codec("_framing_c")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_location(request, tmp_path):
    """Where a store test opens its store, once per backend: a data dir (SQLite) or the URL
    of a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return tmp_path
    return request.getfixturevalue("postgres_url")


def is_postgres(location) -> bool:
    return isinstance(location, str) and location.startswith("postgresql://")


def raw_execute(location, sql: str) -> None:
    """Run one statement on a store's database behind the store's back (to fake an old or newer schema)."""
    if is_postgres(location):
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(sql)
        return
    import sqlite3
    from pathlib import Path

    with contextlib.closing(sqlite3.connect(Path(location) / "store.sqlite")) as db, db:
        db.execute(sql)


@contextlib.contextmanager
def writer_lock_held(location):
    """Another process's write transaction holding the store's writer lock until the block ends."""
    if is_postgres(location):
        import psycopg

        from backhaul.store.postgres import WRITE_LOCK

        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            try:
                yield
            finally:
                conn.execute("ROLLBACK")
        return
    import sqlite3
    from pathlib import Path

    blocker = sqlite3.connect(Path(location) / "store.sqlite", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        yield
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()


#: The relay node the store tests count tunnels on (a valid node id, pki.is_node_id).
TEST_NODE = "n-testnodeaaaa"


def count_tunnel(store, connector_id: str, delta: int = +1, worker: int = 0, peer: str = "p", node: str = TEST_NODE) -> None:
    """Count a tunnel as a relay worker does at tunnel up (+1) or down (-1), on a node that is
    up now: registering is an upsert whose heartbeat is now, so a test's clock may have moved."""
    from backhaul.store import Node

    store.register_node(Node(node, "127.0.0.1:8443", "127.0.0.1:8443", "test", 0.0, 0.0))
    store.tunnel_changed(connector_id, node, worker, delta, peer)
