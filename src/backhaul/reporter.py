"""One worker's side of metrics: publish its figures every tick, and serve /metrics on worker 0.

The run dir (``<state or data dir>/run``, 0700) is made by the supervisor before any
worker starts: ``prepare_run_dir`` empties its ``stats`` dir, so a run's counters start
at zero, and drops switches left by an earlier run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable, Mapping

from backhaul import metrics
from backhaul.runstats import MetricSpec, StatsDir, identity

log = logging.getLogger("backhaul.metrics")

RUN_DIR = "run"
STATS_DIR = "stats"


def prepare_run_dir(base: Path, specs: Mapping[str, MetricSpec], stale: tuple[str, ...] = ()) -> Path:
    """Make ``base/run`` (0700) for a new run: empty stats, no ``stale`` files from the last run."""
    run_dir = Path(base) / RUN_DIR
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    StatsDir(run_dir / STATS_DIR, specs).reset()
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)
    return run_dir


def adopt_socket(fd: int) -> socket.socket:
    """A socket object of our own for a listening socket the supervisor made (a dup of ``fd``)."""
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)
    return sock


class Reporter:
    """Writes ``snapshot()`` to the stats dir every ``interval`` seconds; serves /metrics if given a socket."""

    def __init__(
        self,
        run_dir: Path,
        specs: Mapping[str, MetricSpec],
        snapshot: Callable[[], dict],
        interval: float = 1.0,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.stats = StatsDir(Path(run_dir) / STATS_DIR, specs)
        self.specs = specs
        self._snapshot = snapshot
        self.interval = interval
        self._on_tick = on_tick
        self._identity = identity()
        self._task: asyncio.Task | None = None
        self._runners: list = []
        self.metrics_address: str | None = None

    async def start(self, metrics_fd: int | None = None) -> None:
        if metrics_fd is not None:
            sock = adopt_socket(metrics_fd)
            self.metrics_address = metrics.bound_address(sock)
            self._runners.append(await metrics.serve(sock, self.exposition))
            log.info("metrics served", extra={"address": f"http://{self.metrics_address}/metrics"})
        self.publish()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def add_runner(self, runner) -> None:
        """Clean ``runner`` (an aiohttp AppRunner) up with the reporter."""
        self._runners.append(runner)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self.publish()

    def publish(self) -> None:
        """Write this worker's figures now."""
        snapshot = self._snapshot()
        snapshot.update(self._identity, time=time.time())
        try:
            self.stats.write(snapshot)
        except OSError as exc:
            log.error("cannot write this worker's figures; metrics and status lag", extra={"error": str(exc)})

    def collect(self):
        """(merged figures, live snapshots) of the whole family, this worker's fresh."""
        self.publish()
        return self.stats.collect()

    def exposition(self) -> bytes:
        merged, _ = self.collect()
        return metrics.render(self.specs, merged)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self._on_tick is not None:
                try:
                    self._on_tick()
                except Exception:
                    log.exception("tick hook failed; will run again next tick")
            self.publish()
