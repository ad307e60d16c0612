"""The connector's session log: one JSON line per transaction, off by default.

A transaction is one stream the relay asked this connector to open, whether it was
refused, failed to reach its target, or ran and ended. Its line says when it started,
which request and stream it was, the app, the user when the relay's HTTP edge knew one,
the client's address, the target, the bytes each way, how long it took, and how it
ended (``result`` ok/failed, the wire ``code`` and a ``reason`` in words).

The switch lives in the run dir (``session-log``, written by the control socket) so
that every worker, and a worker restarted later, follows it; workers look at it once a
tick. The file is size-rotated and shared by the workers (logs.SharedRotatingFileHandler).
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import orjson

from backhaul.config import LogFiles
from backhaul.logs import SharedRotatingFileHandler, rotating_file
from backhaul.protocol.constants import ErrorCode, error_name

SESSION_LOG = "session.log"
#: The switch file in the run dir: "on" or "off"; missing means off.
SWITCH = "session-log"


def read_switch(run_dir: Path) -> bool:
    """True when the run dir's switch says on."""
    try:
        return (run_dir / SWITCH).read_text().strip() == "on"
    except FileNotFoundError:
        return False


def write_switch(run_dir: Path, on: bool) -> None:
    tmp = run_dir / f".{SWITCH}.tmp"
    tmp.write_text("on\n" if on else "off\n")
    os.replace(tmp, run_dir / SWITCH)


class SessionLog:
    """Writes transaction lines while switched on; costs one attribute check while off."""

    def __init__(self, files: LogFiles, connector_id: str, worker: int) -> None:
        self.files = files
        self.connector_id = connector_id
        self.worker = worker
        self.enabled = False
        self._handler: SharedRotatingFileHandler | None = None

    @property
    def path(self) -> Path | None:
        return Path(self.files.directory) / SESSION_LOG if self.files.directory is not None else None

    def switch(self, on: bool) -> None:
        """Turn the log on or off (opening or closing its file)."""
        if on == self.enabled:
            return
        if on and self.path is None:
            raise ValueError("the session log needs a log directory")
        if on:
            self._handler = rotating_file(self.path, self.files)
        elif self._handler is not None:
            self._handler.close()
            self._handler = None
        self.enabled = on

    def close(self) -> None:
        self.switch(False)

    def write(
        self,
        meta: dict,
        *,
        stream: int,
        started: float,
        to_app: int,
        to_client: int,
        code: int,
        reason: str,
    ) -> None:
        """One transaction's line; ``started`` is time.monotonic() at its OPEN."""
        if not self.enabled:
            return
        now = time.monotonic()
        began = time.time() - (now - started)
        line = {
            "time": datetime.datetime.fromtimestamp(began, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "id": meta.get("id"),
            "stream": stream,
            "app": meta.get("app"),
            "user": meta.get("user"),
            "client": meta.get("client"),
            "target": meta.get("target"),
            "bytes_client_to_app": to_app,
            "bytes_app_to_client": to_client,
            "duration": round(now - started, 6),
            "result": "ok" if code == ErrorCode.NO_ERROR else "failed",
            "code": error_name(code),
            "reason": reason,
            "connector": self.connector_id,
            "worker": self.worker,
        }
        self._handler.write_line(orjson.dumps(line).decode())
