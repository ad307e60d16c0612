"""Restarting the connector with a drain: through systemd, or as the updater's own child.

Both stop the old connector before they start the new one. They must: a second
`connector run` on the same state dir is refused while the first still holds its control
socket. The gap is this connector's alone: its GOAWAY sends new streams to the group's
other connectors at once, its streams in flight finish up to its drain deadline, and the
relay's lease lets only one connector of a group update at a time, so another connector
carries the group's traffic meanwhile (unless the group allows downtime).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from backhaul.errors import ConfigError
from backhaul.updater.install import clean_env

log = logging.getLogger("backhaul.updater")

CONNECTOR_UNIT = "backhaul-connector.service"
UPDATER_UNIT = "backhaul-updater.service"
#: The connector's exit status when an admin deleted it (backhaul.supervisor.EXIT_NO_RESTART):
#: restarting cannot help. Copied, not imported: the supervisor module pulls in uvloop.
EXIT_NO_RESTART = 78
#: A supervised connector that ran this long before it exited is restarted after the base delay.
STABLE = 60.0
#: The longest wait between two restarts of a supervised connector that keeps exiting.
MAX_DELAY = 30.0


class SystemdConnector:
    """The connector as the systemd unit ``backhaul-connector.service`` (SIGTERM = drain).

    systemd restarts a crashed connector itself (Restart=on-failure); the gate learns of
    crashes from the unit's NRestarts counter.
    """

    def __init__(self, unit: str = CONNECTOR_UNIT, timeout: float = 120.0) -> None:
        self.unit = unit
        self.timeout = timeout
        self._restarts = 0

    def _systemctl(self, *args: str) -> str:
        try:
            done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"systemctl {' '.join(args)} failed: {exc}") from None
        if done.returncode != 0:
            raise ConfigError(f"systemctl {' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip()

    def start(self) -> None:
        """Nothing to do: systemd runs the connector."""

    def restart(self) -> None:
        # systemd stops (SIGTERM, the drain, TimeoutStopSec) and then starts from current.
        self._systemctl("restart", self.unit)
        self._restarts = self._count()

    def _count(self) -> int:
        try:
            return int(self._systemctl("show", "--property=NRestarts", "--value", self.unit) or 0)
        except (ConfigError, ValueError):
            return self._restarts

    def exits(self) -> int:
        count = self._count()
        new, self._restarts = max(0, count - self._restarts), count
        return new

    def watch(self) -> None:
        """Nothing to do: systemd restarts a crashed connector."""

    def stop(self) -> None:
        """Nothing to do: the connector unit outlives the updater."""


class SupervisedConnector:
    """The connector as the updater's child (`updater run --supervise`): tests, hosts without systemd.

    It runs ``ROOT/current/venv/bin/backhaul connector run --state-dir DIR`` in its own
    process group; SIGTERM goes to its supervisor only (as systemd's KillMode=mixed does),
    which passes it to its workers and waits for their drain.
    """

    def __init__(
        self, backhaul: Path, state_dir: Path, *, config: Path | None, stop_timeout: float, restart_delay: float = 2.0
    ) -> None:
        self.backhaul = backhaul
        self.state_dir = state_dir
        self.config = config
        self.stop_timeout = stop_timeout
        self.restart_delay = restart_delay
        self.proc: subprocess.Popen | None = None
        #: The wait before the next restart: doubled after each exit of a connector that ran
        #: less than STABLE seconds, up to MAX_DELAY, so a connector that cannot start (outside
        #: an update: a broken host) is retried ever more slowly, not every 2 s for ever.
        self._delay = restart_delay
        self._started_at = 0.0
        self._exits = 0
        self._down_since: float | None = None
        self.gave_up: str | None = None

    def _argv(self) -> list[str]:
        argv = [str(self.backhaul), "connector", "run", "--state-dir", str(self.state_dir)]
        return argv + (["--config", str(self.config)] if self.config else [])

    def start(self) -> None:
        self.proc = subprocess.Popen(self._argv(), start_new_session=True, env=clean_env(), stdin=subprocess.DEVNULL)
        self._down_since = None
        self._started_at = time.monotonic()
        log.info("connector started", extra={"pid": self.proc.pid, "path": os.path.realpath(self.backhaul)})

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM (the drain), wait up to ``stop_timeout``, then SIGKILL the group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            started = time.monotonic()
            with _gone():
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
                log.info("connector stopped (drained)", extra={"pid": proc.pid, "seconds": round(time.monotonic() - started, 2), "status": proc.returncode})
            except subprocess.TimeoutExpired:
                log.warning("connector did not stop within the drain wait; killed", extra={"pid": proc.pid, "seconds": self.stop_timeout})
        with _gone():
            os.killpg(proc.pid, signal.SIGKILL)  # its workers, if any outlived it
        if proc.poll() is None:
            proc.wait(5)
        return proc.returncode

    def restart(self) -> None:
        self.stop()
        self._exits = 0
        self.start()

    def exits(self) -> int:
        """Exits since the last call; a connector that exited is started again (a crash loop shows as exits)."""
        self.watch(now=None, delay=0.0)
        new, self._exits = self._exits, 0
        return new

    def watch(self, now: float | None = None, delay: float | None = None) -> None:
        """Start the connector again when it exited (after ``restart_delay``), unless deleted."""
        if self.proc is None or self.proc.poll() is None or self.gave_up:
            return
        now = time.monotonic() if now is None else now
        if self._down_since is None:
            self._down_since = now
            self._exits += 1
            status = self.proc.returncode
            ran = now - self._started_at
            self._delay = min(MAX_DELAY, self._delay * 2) if ran < STABLE else self.restart_delay
            log.warning("connector exited", extra={"pid": self.proc.pid, "status": status, "ran": round(ran, 1), "restart_in": self._delay})
            if status == EXIT_NO_RESTART:
                self.gave_up = "the relay says this connector was deleted; re-register it (see the connector's log)"
                log.error("connector deleted by an admin; not restarted", extra={"status": status})
                return
        if now - self._down_since >= (self._delay if delay is None else delay):
            self.start()


class _gone:
    """Ignore a process that is already gone."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, ProcessLookupError)
