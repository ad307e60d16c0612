"""Logging: JSON lines on stderr, readable by journald and by `jq`; the admin log file.

The admin log is a size-rotated file of the same JSON lines, shared by the supervisor
and its workers (``SharedRotatingFileHandler``). It holds the key events (registration,
tunnels up and down, config applied, certificate renewed, update steps) and their
errors, not one line per stream: per-stream lines go to the ``backhaul.stream`` loggers
and, when it is on, to the session log (connector.session_log).
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

import orjson

from backhaul.config import LogFiles

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str = "info") -> None:
    """Send every log record to stderr as a JSON line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("BACKHAUL_LOG_LEVEL", level).upper())
    logging.Formatter.converter = time.gmtime


#: Loggers whose records are about one stream; they stay out of the admin log.
STREAM_LOGGER = "backhaul.stream"
ADMIN_LOG = "admin.log"


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log file that several processes append to.

    Each record is one ``write`` on a file opened with O_APPEND, so lines from different
    processes never interleave. Before each record the handler checks that the path still
    names the file it holds open (another process may have rotated it) and reopens it if
    not; rotation itself runs under an flock on ``<file>.lock`` and is skipped when another
    process rotated first. So the files stay bounded: ``backups + 1`` files of about
    ``max_bytes`` each.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self._inode: tuple[int, int] | None = None
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self._lock_path = f"{self.baseFilename}.lock"

    def _open(self):
        stream = super()._open()
        info = os.fstat(stream.fileno())
        self._inode = (info.st_dev, info.st_ino)
        return stream

    def _drop_if_rotated(self) -> None:
        if self.stream is None:
            return
        try:
            info = os.stat(self.baseFilename)
            current = (info.st_dev, info.st_ino)
        except FileNotFoundError:
            current = None
        if current != self._inode:
            self.stream.close()
            self.stream = None

    def emit(self, record: logging.LogRecord) -> None:
        self._drop_if_rotated()
        super().emit(record)

    def write_line(self, line: str) -> None:
        """Append one line formatted by the caller: the same file discipline as ``emit``,
        without a LogRecord or a second formatting pass (the session log writes one per stream)."""
        self.acquire()
        try:
            self._drop_if_rotated()
            if self.stream is None:
                self.stream = self._open()
            if self.stream.seek(0, os.SEEK_END) + len(line) + 1 >= self.maxBytes:
                self.doRollover()
                if self.stream is None:
                    self.stream = self._open()
            self.stream.write(line + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": line}))
        finally:
            self.release()

    def doRollover(self) -> None:
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._drop_if_rotated()
            if self.stream is None:
                self.stream = self._open()
            if os.fstat(self.stream.fileno()).st_size < self.maxBytes:
                return  # another process rotated while this one waited for the lock
            super().doRollover()


class _NotPerStream(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == STREAM_LOGGER or record.name.startswith(STREAM_LOGGER + "."))


def rotating_file(path: Path, files: LogFiles) -> SharedRotatingFileHandler:
    """A JSON-lines file handler at ``path`` rotated as ``files`` says; the directory is made 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handler = SharedRotatingFileHandler(path, files.max_bytes, files.backups)
    handler.setFormatter(JsonLineFormatter())
    return handler


class _QuietBelowWarning(logging.Filter):
    """Drops INFO and DEBUG records of the given loggers (and their children): their lines are
    one per connection or request, their warnings and errors are still admin events."""

    def __init__(self, loggers: tuple[str, ...]) -> None:
        super().__init__()
        self.loggers = loggers

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(record.name == name or record.name.startswith(name + ".") for name in self.loggers)


#: The relay's loggers that write a line per connection or request at INFO (the edges, the
#: listen port): the relay's admin log keeps only their warnings and errors.
RELAY_PER_CONNECTION = ("backhaul.relay.http", "backhaul.relay.edge", "backhaul.relay.udp", "backhaul.relay.accept", "backhaul.relay.control")


def add_admin_log(files: LogFiles, quiet: tuple[str, ...] = ()) -> Path | None:
    """Also write key events (INFO and up, no per-stream lines) to ``admin.log`` in ``files.directory``;
    of the ``quiet`` loggers only warnings and errors.

    Idempotent: a process that calls it again (a worker after the supervisor) keeps one handler.
    """
    if files.directory is None:
        return None
    path = Path(files.directory) / ADMIN_LOG
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, SharedRotatingFileHandler)]:
        root.removeHandler(old)
        old.close()
    handler = rotating_file(path, files)
    handler.setLevel(logging.INFO)
    handler.addFilter(_NotPerStream())
    if quiet:
        handler.addFilter(_QuietBelowWarning(quiet))
    root.addHandler(handler)
    return path


#: Bytes of one admin log file read at most by ``read_admin_log`` (a file is about
#: LogFiles.max_bytes; a larger one was not written by us and is read only this far).
READ_LIMIT = 64 * 1024 * 1024
_LEVELS = ("debug", "info", "warning", "error", "critical")


def read_admin_log(
    directory: str | os.PathLike,
    *,
    text: str | None = None,
    level: str | None = None,
    limit: int = 100,
    most_bytes: int = READ_LIMIT,
) -> list[dict]:
    """The newest ``limit`` entries of the admin log in ``directory`` (``admin.log`` and its
    rotated files), newest first: only those at ``level`` or above, and whose line contains
    ``text`` (case-insensitive) when given. Of each file only its last ``most_bytes`` are
    read (the admin center's page reads a little, often). Lines that are not JSON objects
    are skipped."""
    if level is not None and level not in _LEVELS:
        raise ValueError(f"level must be one of {', '.join(_LEVELS)}")
    floor = _LEVELS.index(level) if level else 0
    needle = text.lower() if text else None
    base = Path(directory) / ADMIN_LOG
    found: list[dict] = []
    index = 0
    while len(found) < limit:
        path = base if index == 0 else base.with_name(f"{ADMIN_LOG}.{index}")
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - most_bytes))
                lines = f.read(most_bytes).splitlines()
        except FileNotFoundError:
            break
        if size > most_bytes:
            lines = lines[1:]  # the first was cut by the seek
        for raw in reversed(lines):
            if needle is not None and needle not in raw.decode("utf-8", "replace").lower():
                continue
            try:
                entry = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(entry, dict):
                continue
            entry_level = entry.get("level")
            if floor and (entry_level not in _LEVELS or _LEVELS.index(entry_level) < floor):
                continue
            found.append(entry)
            if len(found) >= limit:
                break
        index += 1
    return found
