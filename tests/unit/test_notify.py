"""store/notify.py's ChangeListener against the real PostgreSQL server (tests/postgres.py):
a config change made through another store wakes it, and after its connection is killed
(pg_terminate_backend) it reconnects and calls on_change again, the catch-up."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from backhaul.config import Backoff
from backhaul.store import App, open_store
from backhaul.store.notify import ChangeListener

pytestmark = pytest.mark.codec_independent

#: Bound of every wait below: a notification arrives in milliseconds.
WAIT = 10.0


async def _until(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT} s: {what}")
        await asyncio.sleep(0.01)


def test_a_change_wakes_the_listener_and_a_killed_connection_reconnects_and_catches_up(postgres_url):
    store = open_store(postgres_url)
    seen: list[int] = []

    async def go() -> None:
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def on_change() -> None:
            seen.append(store.config_version())
            woken.set()

        listener = ChangeListener(postgres_url, on_change, backoff=Backoff(initial=0.05, maximum=0.2), check_interval=0.5)
        listener.start()
        try:
            await _until(lambda: listener.connects == 1 and seen, "the first connect's catch-up call")
            woken.clear()
            first = len(seen)
            await loop.run_in_executor(None, store.create_app, App("db", "default", "tcp", 5000, "10.0.0.1:5432"))
            await asyncio.wait_for(woken.wait(), WAIT)
            assert listener.notifications == 1 and seen[-1] == store.config_version() and len(seen) == first + 1

            pid = await listener.backend_pid()
            assert pid is not None
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0] is True
                # A change made while the listener is cut off: its notification is lost to it.
                store.delete_app("db")
            missed = store.config_version()
            await _until(lambda: listener.connects == 2, "the reconnect")
            assert listener.failures >= 1
            await _until(lambda: seen[-1] == missed, "the catch-up call after the reconnect")
            assert await listener.backend_pid() not in (None, pid)
        finally:
            await listener.close()
        assert await listener.backend_pid() is None

    try:
        asyncio.run(go())
    finally:
        store.close()


def test_an_unreachable_store_is_retried_with_backoff_until_close(tmp_path):
    calls: list[int] = []
    url = f"postgresql://nobody@/backhaul?host={tmp_path}"  # no server on that socket

    async def go() -> None:
        listener = ChangeListener(url, lambda: calls.append(1), backoff=Backoff(initial=0.01, maximum=0.02))
        listener.start()
        try:
            await _until(lambda: listener.failures >= 3, "three refused attempts, retried after each")
        finally:
            await listener.close()
        assert listener.connects == 0

    asyncio.run(go())
    assert calls == []
