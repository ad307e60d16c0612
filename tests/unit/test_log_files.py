"""Log files: rotation keeps them bounded with several writer processes; the admin log's filter."""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
from pathlib import Path

import pytest

from backhaul.config import LogFiles
from backhaul.logs import ADMIN_LOG, add_admin_log, rotating_file

pytestmark = pytest.mark.codec_independent

MAX = 2048
BACKUPS = 2
LINES = 2000


def _writer(path: str, tag: str, lines: int, start) -> None:
    handler = rotating_file(Path(path), LogFiles(max_bytes=MAX, backups=BACKUPS))
    handler.setFormatter(logging.Formatter("%(message)s"))
    failures = []
    handler.handleError = failures.append  # a failed write or rotation must not pass unseen
    start.wait(10)
    for i in range(lines):
        line = json.dumps({"w": tag, "i": i, "pad": "x" * 60})
        if tag == "c":  # the session log's path: a line formatted by the caller
            handler.write_line(line)
        else:
            handler.handle(logging.makeLogRecord({"msg": line}))
    handler.close()
    sys.exit(3 if failures else 0)


def test_rotation_bounds_files_written_by_several_processes(tmp_path):
    path = tmp_path / "logs" / "session.log"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(3)
    writers = [context.Process(target=_writer, args=(str(path), tag, LINES, start)) for tag in ("a", "b", "c")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(30)
        assert w.exitcode == 0, "a writer failed to write or rotate"
    files = sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock"))
    assert files == ["session.log", "session.log.1", "session.log.2"], "backups beyond the limit are deleted"
    line_size = len(json.dumps({"w": "a", "i": LINES - 1, "pad": "x" * 60})) + 1
    seen = {}
    for name in files:
        data = (path.parent / name).read_text()
        # a racing writer may add a line or two to a file another process just rotated
        assert len(data) <= MAX + 3 * line_size, f"{name} is {len(data)} bytes"
        if name != "session.log":
            # rotated because it was full, not because another writer's stale view said so
            assert len(data) >= MAX - line_size, f"{name} was rotated early, at {len(data)} bytes"
        for line in data.splitlines():
            record = json.loads(line)  # whole lines only: writers never interleave
            seen.setdefault(record["w"], []).append(record["i"])
    assert seen, "the newest lines are kept"
    for tag, indices in seen.items():
        # what is kept of each writer is its newest lines, none missing in between
        assert sorted(indices) == list(range(min(indices), LINES)), tag
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_admin_log_keeps_key_events_not_per_stream_lines(tmp_path):
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        path = add_admin_log(LogFiles(directory=tmp_path, max_bytes=4096, backups=1))
        again = add_admin_log(LogFiles(directory=tmp_path, max_bytes=4096, backups=1))
        assert path == again == tmp_path / ADMIN_LOG
        assert len(root.handlers) == len(before) + 1, "calling it twice keeps one file handler"
        root.setLevel(logging.DEBUG)
        logging.getLogger("backhaul.connector").info("tunnel up", extra={"tunnel": "t1"})
        logging.getLogger("backhaul.connector").debug("noise")
        logging.getLogger("backhaul.stream").info("stream ended")
        logging.getLogger("backhaul.stream.connector").warning("stream refused")
        logging.getLogger("backhaul.connector").error("certificate renewal failed")
        for handler in root.handlers:
            handler.flush()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(r["level"], r["msg"]) for r in lines] == [("info", "tunnel up"), ("error", "certificate renewal failed")]
        assert lines[0]["tunnel"] == "t1"
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
                handler.close()


def test_log_files_refuse_silly_limits():
    with pytest.raises(ValueError):
        LogFiles(max_bytes=10)
    with pytest.raises(ValueError):
        LogFiles(backups=0)
