"""A connector worker's operations side: its figures, the session log, the control socket.

Every worker counts (connector.metrics), publishes its figures once a tick and follows
the session-log switch in the run dir. Worker 0 also serves the metrics endpoint and the
control socket from the listening sockets the supervisor made.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from backhaul.connector import control_socket
from backhaul.connector.metrics import SPECS, ConnectorMetrics, WorkerNow, status_figures
from backhaul.connector.settings import ConnectorSettings
from backhaul.connector.session_log import SessionLog, read_switch, write_switch
from backhaul.logs import ADMIN_LOG
from backhaul.reporter import Reporter, adopt_socket

log = logging.getLogger("backhaul.connector")

#: How long `session-log on|off` waits for every worker to follow the switch.
SWITCH_WAIT = 5.0


class Observer:
    """Publishes and logs for one connector worker (see the module docstring).

    It is given what it reads, not the agent: ``metrics``, the counters the worker records
    into, and ``now``, called once a tick for what the worker is at that moment."""

    def __init__(self, settings: ConnectorSettings, connector_id: str, metrics: ConnectorMetrics, now: Callable[[], WorkerNow]) -> None:
        self.settings = settings
        self.metrics = metrics
        self._now = now
        self.session_log = SessionLog(settings.log_files, connector_id, settings.worker)
        self.run_dir = settings.run_dir
        self.reporter: Reporter | None = None

    async def start(self) -> None:
        settings = self.settings
        if self.run_dir is None:
            return
        self.reporter = Reporter(self.run_dir, SPECS, self._snapshot, settings.stats_interval, self._follow_switch)
        self._follow_switch()
        await self.reporter.start(settings.metrics_fd if settings.worker == 0 else None)
        if settings.worker == 0 and settings.control_fd is not None:
            sock = adopt_socket(settings.control_fd)
            self.reporter.add_runner(await control_socket.serve(sock, self.status, self.set_session_log))

    async def stop(self) -> None:
        if self.reporter is not None:
            await self.reporter.stop()
        self.session_log.close()

    def _snapshot(self) -> dict:
        info = {"metrics": self.reporter.metrics_address} if self.reporter and self.reporter.metrics_address else {}
        return self.metrics.snapshot(self._now(), self.settings.worker, self.session_log.enabled, info)

    def _follow_switch(self) -> None:
        on = read_switch(self.run_dir)
        if on != self.session_log.enabled:
            self.session_log.switch(on)
            log.info("session log switched", extra={"on": on, "path": str(self.session_log.path), "worker": self.settings.worker})

    # ------------------------------------------------------------------ control socket

    def status(self) -> dict:
        merged, live = self.reporter.collect()
        files = self.settings.log_files
        return {
            "running": True,
            "figures": status_figures(merged, live),
            "session_log_path": str(self.session_log.path) if self.session_log.path else None,
            "admin_log_path": str(files.directory / ADMIN_LOG) if files.directory is not None else None,
        }

    async def set_session_log(self, on: bool) -> dict:
        """Flip the switch for every worker and wait (bounded) until each follows it."""
        if on and self.session_log.path is None:
            raise ValueError("this connector runs without a log directory; restart it with --log-dir DIR")
        write_switch(self.run_dir, on)
        self._follow_switch()
        deadline = time.monotonic() + SWITCH_WAIT
        while True:
            _, live = self.reporter.collect()
            confirmed = sum(1 for s in live if s.get("info", {}).get("session_log") == on)
            if confirmed == len(live) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        return {"on": on, "workers": len(live), "confirmed": confirmed, "path": str(self.session_log.path)}
