"""The relay's admin log as the admin center shows it: newest first, filtered by level and text.

Two sources, one interface: the relay's admin log files in its log dir (``service run
--log-dir``, read by logs.read_admin_log from each file's end), else a bounded ring of this
worker's own log records, kept by a logging handler the center installs while it runs.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import orjson

from backhaul.logs import ADMIN_LOG, STREAM_LOGGER, JsonLineFormatter, read_admin_log

LEVELS = ("debug", "info", "warning", "error", "critical")
log = logging.getLogger(__name__)


class RecordRing(logging.Handler):
    """The newest ``size`` log records of this process, as the JSON-lines entries."""

    def __init__(self, size: int) -> None:
        super().__init__(logging.INFO)
        self.entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self._format = JsonLineFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(STREAM_LOGGER):
            return
        try:
            self.entries.append(orjson.loads(self._format.format(record)))
        except Exception:  # a logging handler must not raise into the code that logged
            self.handleError(record)


def entries(
    ring: RecordRing, log_dir: Path | None, limit: int, tail_bytes: int, level: str = "", text: str = ""
) -> tuple[list[dict[str, Any]], str]:
    """The newest ``limit`` matching entries, newest first, and where they come from: the
    relay's admin log in ``log_dir`` (logs.read_admin_log, the last ``tail_bytes`` of each
    file), else this worker's records."""
    level = level if level in LEVELS else ""
    if log_dir is not None and (log_dir / ADMIN_LOG).is_file():
        try:
            found = read_admin_log(log_dir, text=text or None, level=level or None, limit=limit, most_bytes=tail_bytes)
            return found, str(log_dir / ADMIN_LOG)
        except OSError as exc:
            log.warning("the admin log file cannot be read; showing this worker's records", extra={"path": str(log_dir), "error": str(exc)})
    low = LEVELS.index(level) if level else 0
    needle = text.lower()
    picked = []
    for entry in reversed(ring.entries):
        entry_level = str(entry.get("level", "info")).lower()
        if (LEVELS.index(entry_level) if entry_level in LEVELS else 1) < low:
            continue
        if needle and needle not in orjson.dumps(entry, default=str).decode().lower():
            continue
        picked.append(entry)
        if len(picked) >= limit:
            break
    return picked, "this worker's recent records"
