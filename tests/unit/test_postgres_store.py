"""What only the PostgreSQL store does: a pool that outlives dropped connections, a server
that goes away and comes back, several processes migrating one database at once, URLs
that never show their password. The behaviour both backends share is in test_store.py."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from backhaul.store import StoreLimits, Unavailable, open_store
from backhaul.store.postgres_migrations import PG_MIGRATIONS
from backhaul.store.postgres import describe
from tests.postgres import PostgresServer, find_bin_dir, require_bin_dir

pytestmark = pytest.mark.codec_independent


def test_connections_killed_by_the_server_are_replaced(postgres_db):
    server, name = postgres_db
    store = open_store(server.url(name))
    try:
        store.create_group("g1")
        assert server.terminate_connections(name) >= 1  # the pool's connection, as a restart would
        store.create_group("g2")  # the pool checks a connection before handing it out
        assert [g.name for g in store.list_groups()] == ["default", "g1", "g2"]
    finally:
        store.close()


@pytest.mark.slow  # its own server, and the pool's reconnection backoff: about 7 s
def test_a_server_that_goes_away_refuses_changes_then_catches_up():
    server = PostgresServer(require_bin_dir(find_bin_dir(), os.environ))
    try:
        server.start()
        store = open_store(server.url(), limits=StoreLimits(busy_timeout=1.0))
        try:
            store.create_group("before")
            server.halt()
            with pytest.raises(Unavailable, match="busy or unavailable.*try again"):
                store.create_group("during")
            with pytest.raises(Unavailable):
                store.list_groups()
            server.launch()
            # The pool reconnects with a backoff (1 s, then doubling): the first call after
            # the server returns may still be refused; within a few seconds one succeeds.
            deadline = time.monotonic() + 20
            while True:
                try:
                    store.create_group("after")
                    break
                except Unavailable:
                    if time.monotonic() > deadline:
                        raise
            assert [g.name for g in store.list_groups()] == ["after", "before", "default"]
        finally:
            store.close()
    finally:
        server.stop()


def test_an_unreachable_server_is_a_clear_error_without_the_password(tmp_path):
    url = f"postgresql://backhaul:s3cret@/store?host={tmp_path}"  # no server listens there
    with pytest.raises(Unavailable, match="cannot reach the store") as refused:
        open_store(url, limits=StoreLimits(busy_timeout=2.0))
    assert "s3cret" not in str(refused.value)
    assert describe(url) == f"postgresql://backhaul@{tmp_path}/store"


def _open(url: str, barrier) -> None:
    barrier.wait(30)
    open_store(url).close()


def test_processes_migrating_one_database_at_once_apply_each_step_once(postgres_url):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_open, args=(postgres_url, barrier)) for _ in range(3)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    store = open_store(postgres_url)
    try:
        with store._read() as db:
            versions = [row[0] for row in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [version for version, _ in PG_MIGRATIONS]
        assert [g.name for g in store.list_groups()] == ["default"]
    finally:
        store.close()


def test_missing_postgresql_skips_a_developer_and_fails_ci(tmp_path):
    assert require_bin_dir(tmp_path, {"CI": "true"}) == tmp_path
    with pytest.raises(pytest.skip.Exception, match="bootstrap.sh installs it"):
        require_bin_dir(None, {})
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        require_bin_dir(None, {"CI": "true"})
