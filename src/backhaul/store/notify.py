"""Being woken by configuration changes made on other nodes (PostgreSQL's LISTEN/NOTIFY).

Every config_version bump NOTIFYs ``backhaul_config`` at commit (store/postgres.py). A
notification only wakes: the listener calls ``on_change()`` and the node reads the store's
version itself, which is the truth. Notifications sent while the listening connection was
down are lost, so ``on_change()`` is also called after every (re)connect: the catch-up read.
The connection is a dedicated one (LISTEN holds a session; a pooled connection would be
handed to other work), reconnected with backoff forever, and checked every
``check_interval`` seconds so a connection that died silently is noticed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable

import psycopg

from backhaul.config import Backoff, ClusterSettings
from backhaul.store.postgres import NOTIFY_CHANNEL, describe

log = logging.getLogger("backhaul.store")


class ChangeListener:
    """LISTEN on ``backhaul_config`` over one async connection; ``on_change()`` after each
    notification and after each (re)connect. ``start()`` it in a running loop; ``close()``."""

    def __init__(
        self,
        url: str,
        on_change: Callable[[], None],
        *,
        backoff: Backoff = Backoff(),
        check_interval: float = ClusterSettings.heartbeat_interval,
        connect_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.where = describe(url)
        self.on_change = on_change
        self.backoff = backoff
        self.check_interval = check_interval
        self.connect_timeout = max(2, round(connect_timeout))  # libpq's minimum is 2 s
        #: connections made so far (the first one and every reconnect)
        self.connects = 0
        #: notifications received so far
        self.notifications = 0
        #: connections lost or refused so far (each followed by a backoff)
        self.failures = 0
        self._task: asyncio.Task | None = None
        self._conn: psycopg.AsyncConnection | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="backhaul-change-listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def _delay(self, attempt: int) -> float:
        # Full jitter under an exponential cap: nodes cut off together do not reconnect together.
        return random.uniform(0, min(self.backoff.maximum, self.backoff.initial * self.backoff.factor**attempt))

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError) as exc:
                self.failures += 1
                delay = self._delay(attempt)
                log.warning(
                    "the store's change notifications are cut off; reconnecting (the 1 s poll goes on meanwhile)",
                    extra={"store": self.where, "error": str(exc), "retry_in": round(delay, 2), "attempt": attempt},
                )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0  # a connection that worked ended without an error: retry at once

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout)
        self._conn = conn
        try:
            await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
            self.connects += 1
            if self.connects > 1:
                log.info("the store's change notifications are back; catching up", extra={"store": self.where})
            self._changed()  # the catch-up: what was sent while we were not listening is lost
            while True:
                async for _ in conn.notifies(timeout=self.check_interval):
                    self.notifications += 1
                    self._changed()
                # Quiet for check_interval: prove the connection still lives (raises if not).
                await conn.execute("SELECT 1")
        finally:
            self._conn = None
            await conn.close()

    def _changed(self) -> None:
        try:
            self.on_change()
        except Exception:
            log.exception("the change callback failed; the next change or poll retries")

    async def backend_pid(self) -> int | None:
        """The server process of the listening connection (None while disconnected): what
        an operator's or a test's ``pg_terminate_backend`` names."""
        return self._conn.info.backend_pid if self._conn is not None else None
