"""A progress line for long operations (a release upload, the updater's download and install,
benchmark runs): drawn on stderr only when it is a terminal and not CI, nothing otherwise, so
logs and pipes get the operation's own messages and never a bar."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from typing import Callable, Iterator, Mapping, TextIO

from backhaul.config import ProgressLine

#: Back to the line's start and clear it (ANSI "erase in line").
_CLEAR = "\r\x1b[K"


def wanted(stream: TextIO, env: Mapping[str, str]) -> bool:
    """True when a progress line helps: ``stream`` is a terminal, not a dumb one, and this is not CI."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
    return tty and not env.get("CI") and env.get("TERM", "") != "dumb"


def _amount(n: float, unit: str) -> str:
    if unit == "B":
        return f"{n / (1024 * 1024):.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"
    return f"{n:.0f}{(' ' + unit) if unit else ''}"


class Progress:
    """One operation's progress: a label, an amount done of an optional total, the time taken.

    Redraws at most every ``settings.redraw_interval`` seconds; every method is a no-op but
    ``echo`` when the line is not wanted (``wanted``). Thread-safe: a ticker thread
    (``ticking``) redraws the elapsed time while the caller blocks in a subprocess.
    """

    def __init__(
        self, label: str, total: float | None = None, *, unit: str = "B", stream: TextIO | None = None,
        env: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic,
        settings: ProgressLine = ProgressLine(),
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = wanted(self.stream, os.environ if env is None else env)
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0.0
        self._clock = clock
        self._settings = settings
        self._started = clock()
        self._drawn_at: float | None = None
        self._lock = threading.Lock()

    # -- the caller's side

    def advance(self, n: float) -> None:
        self.done += n
        self._maybe_draw()

    def stage(self, label: str) -> None:
        """A new label (the step under way); drawn at the next redraw."""
        self.label = label
        self._maybe_draw()

    def echo(self, text: str) -> None:
        """Print a line of text to the stream whether or not a progress line is drawn (the line
        is cleared first and drawn again after, so the two never mix)."""
        with self._lock:
            if self.enabled and self._drawn_at is not None:
                self.stream.write(_CLEAR)
            self.stream.write(text + "\n")
            if self.enabled and self._drawn_at is not None:
                self._draw()
            self.stream.flush()

    def close(self) -> None:
        """Clear the line: what the command prints next starts on a clean line."""
        with self._lock:
            if self.enabled and self._drawn_at is not None:
                self.stream.write(_CLEAR)
                self.stream.flush()
                self._drawn_at = None
            self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def ticking(self) -> Iterator["Progress"]:
        """Redraw (the elapsed time) from a thread while the body blocks; no thread when not wanted."""
        if not self.enabled:
            yield self
            return
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self._settings.redraw_interval):
                self._maybe_draw()

        thread = threading.Thread(target=tick, name="progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    # -- drawing

    def line(self) -> str:
        """The text of the line as it would be drawn now (without the terminal controls)."""
        elapsed = self._clock() - self._started
        parts = [self.label]
        if self.total:
            share = min(1.0, self.done / self.total)
            width = 20
            filled = int(share * width)
            parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {share * 100:3.0f}%")
            parts.append(f"{_amount(self.done, self.unit)} of {_amount(self.total, self.unit)}")
        elif self.done:
            parts.append(_amount(self.done, self.unit))
        if self.unit == "B" and self.done and elapsed > 0:
            parts.append(f"{_amount(self.done / elapsed, 'B')}/s")
        parts.append(f"{elapsed:.0f} s")
        return "  ".join(parts)

    def _maybe_draw(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            if self._drawn_at is not None and now - self._drawn_at < self._settings.redraw_interval:
                return
            self._draw()
            self.stream.flush()

    def _draw(self) -> None:
        columns = shutil.get_terminal_size((80, 24)).columns
        self.stream.write(_CLEAR + self.line()[: max(10, columns - 1)])
        self._drawn_at = self._clock()
