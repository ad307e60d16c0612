"""The progress line: drawn on a real pseudo-terminal, rate-limited, and nothing at all on a
pipe, a file or in CI. Only the clock is faked."""

from __future__ import annotations

import os
import select

import pytest

from backhaul.config import ProgressLine
from backhaul.progress import Progress, wanted

from .fakes import Clock

pytestmark = pytest.mark.codec_independent

TERMINAL = {"TERM": "xterm"}


def _read_all(fd: int) -> bytes:
    """What the terminal side received so far (bounded: a few reads of what is there)."""
    got = b""
    for _ in range(1000):
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        got += chunk
    return got


@pytest.fixture
def pty_stream():
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8", buffering=1)
    yield stream, master
    stream.close()
    os.close(master)


def test_it_draws_on_a_terminal_at_most_once_per_interval(pty_stream):
    stream, master = pty_stream
    clock = Clock(100.0)
    progress = Progress("uploading release 1.2", total=4 * 1024 * 1024, stream=stream, env=TERMINAL, clock=clock, settings=ProgressLine(0.1))
    assert progress.enabled
    for _ in range(50):  # fifty chunks within one redraw interval: one draw
        progress.advance(16 * 1024)
    first = _read_all(master)
    assert first.count(b"\r\x1b[K") == 1 and b"uploading release 1.2" in first and b"0%" in first
    clock.now += 0.2
    progress.advance(2 * 1024 * 1024 - 50 * 16 * 1024)
    second = _read_all(master)
    assert b"50%" in second and b"2.0 MiB of 4.0 MiB" in second
    progress.echo("file 1 of 2 sent")
    echoed = _read_all(master)
    text, _, redrawn = echoed.partition(b"file 1 of 2 sent\r\n")
    assert text == b"\r\x1b[K" and redrawn.startswith(b"\r\x1b[Kuploading release 1.2")  # cleared, then drawn again
    progress.close()
    assert _read_all(master) == b"\r\x1b[K"
    progress.advance(1)
    assert _read_all(master) == b""


def test_the_ticker_redraws_the_elapsed_time_while_the_caller_blocks(pty_stream):
    import threading

    stream, master = pty_stream
    progress = Progress("installing 1.2: pip", stream=stream, env=TERMINAL, settings=ProgressLine(0.01))
    done = threading.Event()
    with progress.ticking():
        done.wait(0.3)  # the caller blocks (a subprocess) meanwhile
    progress.close()
    assert _read_all(master).count(b"installing 1.2: pip") >= 3


def test_nothing_is_drawn_on_a_pipe_or_in_ci(tmp_path, pty_stream):
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        progress = Progress("downloading", total=10, stream=pipe, env=TERMINAL)
        assert not progress.enabled
        with progress.ticking():
            progress.advance(5)
            progress.stage("installing")
            progress.echo("a line the log keeps")
        progress.close()
    with os.fdopen(read_end) as got:
        assert got.read() == "a line the log keeps\n"
    with open(tmp_path / "log", "w") as log:
        Progress("x", total=1, stream=log, env=TERMINAL).advance(1)
    assert (tmp_path / "log").read_text() == ""
    stream, master = pty_stream
    assert wanted(stream, TERMINAL)
    assert not wanted(stream, {"TERM": "xterm", "CI": "true"}) and not wanted(stream, {"TERM": "dumb"})
    Progress("x", total=1, stream=stream, env={"CI": "1"}).advance(1)
    assert _read_all(master) == b""
