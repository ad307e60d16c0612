"""Giving memory back after a burst: trim the C allocator once the process has gone quiet.

A bulk run through a worker frees as much as it allocates, yet its resident memory stays
near the run's peak (measured on the relay: 61 MiB idle, 140 MiB after eight streams, for
good). glibc keeps it: freeing the run's large buffers (the encoder's batch, the bytes the
TLS layer hands to the socket, several MiB each) raises malloc's mmap threshold, so later
buffers of that size come from the heap, and free() gives back only a free top of the heap
above the trim threshold; pages freed below a live block stay resident. ``malloc_trim(0)``
returns every free page of every arena (``madvise``), whatever lies above it: about 50 MiB
of the 80 the run left on the relay. The rest is the TLS output buffer of each tunnel
(OpenSSL's memory BIO inside uvloop's SSL transport), which keeps its largest size for the
tunnel's life and is no allocator's to give back.

Nothing here runs per frame. The owner (the relay worker, the connector agent) starts a
``QuietTrim``; once a ``MemoryTrim.check_interval`` it compares the process's CPU time with
the wall clock: a look at ``busy_cpu`` or more of a core marks a burst, and once the process
has stayed below ``quiet_cpu`` for ``quiet_seconds`` after a burst, it trims, once, and logs
what that gave back. A C library without ``malloc_trim`` (musl) is noted once in the log and
nothing is trimmed.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from typing import Callable

from backhaul.config import MemoryTrim
from backhaul.runstats import cpu_seconds, rss_bytes

log = logging.getLogger("backhaul.memory")


class Allocator:
    """The C library's ``malloc_trim``, looked up once (``find``); None where it has none."""

    def __init__(self, malloc_trim: Callable[[int], int] | None) -> None:
        self._malloc_trim = malloc_trim

    @classmethod
    def find(cls) -> "Allocator":
        """This process's allocator; logs once when it cannot be trimmed."""
        try:
            # dlopen(NULL): the symbols of the running program, libc's among them.
            function = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError) as exc:
            log.info(
                "memory is not trimmed after bursts: the C library has no malloc_trim",
                extra={"reason": str(exc)},
            )
            return cls(None)
        function.argtypes = [ctypes.c_size_t]
        function.restype = ctypes.c_int
        return cls(function)

    @property
    def can_trim(self) -> bool:
        return self._malloc_trim is not None

    def trim(self) -> bool:
        """Give every free page back to the system; True when some memory was released."""
        if self._malloc_trim is None:
            return False
        return bool(self._malloc_trim(0))


class QuietTrim:
    """The "trim when the traffic went quiet" policy of one worker process (module docstring).

    ``check()`` is the policy, one look per call; ``start()`` runs it every
    ``settings.check_interval`` on the running loop. ``clock`` and ``cpu`` are the wall and
    CPU clocks in seconds (tests pass fake ones).
    """

    def __init__(
        self,
        settings: MemoryTrim = MemoryTrim(),
        allocator: Allocator | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = cpu_seconds,
        rss: Callable[[], int] = rss_bytes,
        worker: int = 0,
    ) -> None:
        self.settings = settings
        self.allocator = allocator if allocator is not None else Allocator.find()
        self._clock = clock
        self._cpu = cpu
        self._rss = rss
        self._worker = worker
        self._last_time = clock()
        self._last_cpu = cpu()
        #: a look found the process busy since the last trim
        self._burst = False
        #: when the current quiet stretch began (None: the process is not quiet)
        self._quiet_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: trims done so far, and the bytes of resident memory they gave back
        self.trims = 0
        self.released = 0

    @property
    def active(self) -> bool:
        return bool(self.settings.enabled) and self.allocator.can_trim

    def start(self) -> None:
        if self.active and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.settings.check_interval, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        try:
            self.check()
        finally:
            self._timer = asyncio.get_running_loop().call_later(self.settings.check_interval, self._tick)

    def check(self) -> bool:
        """One look at the process; True when it trimmed."""
        now, used = self._clock(), self._cpu()
        elapsed = now - self._last_time
        share = (used - self._last_cpu) / elapsed if elapsed > 0 else 0.0
        began = self._last_time
        self._last_time, self._last_cpu = now, used
        if elapsed <= 0:
            return False
        if share >= self.settings.busy_cpu:
            self._burst = True
            self._quiet_since = None
            return False
        if share > self.settings.quiet_cpu:
            # Some traffic, not a burst: not quiet yet, and nothing to trim for.
            self._quiet_since = None
            return False
        if self._quiet_since is None:
            self._quiet_since = began
        if not self._burst or now - self._quiet_since < self.settings.quiet_seconds:
            return False
        quiet = now - self._quiet_since
        self._burst = False
        self._quiet_since = None
        return self._trim(quiet)

    def _trim(self, quiet: float) -> bool:
        if not self.active:
            return False
        before = self._rss()
        started = time.perf_counter()
        self.allocator.trim()
        took = time.perf_counter() - started
        after = self._rss()
        self.trims += 1
        self.released += max(0, before - after)
        log.info(
            "memory given back after a burst",
            extra={
                "worker": self._worker,
                "rss_before": before,
                "rss_after": after,
                "released_bytes": before - after,
                "quiet_seconds": round(quiet, 1),
                "trim_ms": round(took * 1000, 2),
            },
        )
        return True
