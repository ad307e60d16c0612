"""The relay's admin log as the admin center shows it: newest first, filtered by level and text.

Two sources, one interface: the relay's admin log file when there is one (read from its
end, at most ``log_tail_bytes``), else a bounded ring of this worker's own log records,
kept by a logging handler the center installs while it runs. This module is the one place
that knows where the file is (``log_file``): a relay that writes its admin log elsewhere
changes only that.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from backhaul.logs import ADMIN_LOG, STREAM_LOGGER, JsonLineFormatter

LEVELS = ("debug", "info", "warning", "error", "critical")
log = logging.getLogger(__name__)


def log_file(data_dir: Path) -> Path | None:
    """The relay's admin log file, if it writes one (DATA_DIR/logs/admin.log)."""
    for candidate in (data_dir / "logs" / ADMIN_LOG, data_dir / ADMIN_LOG):
        if candidate.is_file():
            return candidate
    return None


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


def _tail(path: Path, most: int) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - most))
        data = f.read(most)
    lines = data.split(b"\n")
    if size > most:
        lines = lines[1:]  # the first is cut
    entries = []
    for line in lines:
        if line.strip():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = {"level": "info", "msg": line.decode("utf-8", "replace")}
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


def entries(ring: RecordRing, data_dir: Path, tail_bytes: int, level: str = "", text: str = "") -> tuple[list[dict[str, Any]], str]:
    """The matching entries, newest first, and where they come from (a file or this worker)."""
    path = log_file(data_dir)
    if path is not None:
        try:
            found, source = _tail(path, tail_bytes), str(path)
        except OSError as exc:
            log.warning("the admin log file cannot be read; showing this worker's records", extra={"path": str(path), "error": str(exc)})
            found, source = list(ring.entries), "this worker's recent records"
    else:
        found, source = list(ring.entries), "this worker's recent records"
    low = LEVELS.index(level) if level in LEVELS else 0
    needle = text.lower()
    picked = []
    for entry in reversed(found):
        entry_level = str(entry.get("level", "info")).lower()
        if (LEVELS.index(entry_level) if entry_level in LEVELS else 1) < low:
            continue
        if needle and needle not in orjson.dumps(entry, default=str).decode().lower():
            continue
        picked.append(entry)
    return picked, source
