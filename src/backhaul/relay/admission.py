"""Admission of new connections in a relay worker: the descriptor budget, and refusals logged.

Every connection a worker accepts costs a descriptor, on every listener: the listen port
(tunnels, control calls, handshakes), the HTTP edge, TCP app ports. When the process's
open-file limit is reached, accept() fails and everything that needs a descriptor fails
with it: the store, log files, outbound calls. So the worker keeps a reserve: once its
open connections reach its budget (soft limit - reserve - descriptors that are not
connections), new connections are closed at accept while the established ones go on.
UDP apps are not counted: a UDP flow costs no descriptor on the relay.

Refusals (budget, per-address cap, handshakes, unknown ALPN) are logged at most once per
interval and kind, each line saying how many were refused since the last one, so a flood
costs a few log lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource

from backhaul.config import ListenLimits
from backhaul.relay.metrics import RelayMetrics

log = logging.getLogger("backhaul.relay.admission")

#: Where a process's open descriptors are listed (Linux).
_FD_DIR = "/proc/self/fd"


def open_descriptors() -> int | None:
    """How many descriptors this process has open now (None where /proc is not there)."""
    try:
        return len(os.listdir(_FD_DIR))
    except OSError:
        return None


def raise_open_file_limit() -> tuple[int, int]:
    """Lift the soft limit on open files to the hard one; returns (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # an unlimited hard limit may exceed fs.nr_open
            log.warning("cannot raise the open-file limit", extra={"soft": soft, "hard": hard, "error": str(exc)})
    return soft, hard


class Refused(asyncio.Protocol):
    """The protocol of a plain TCP connection refused at accept: closed at once (RST), so its
    descriptor is free again before anything else runs."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.Transport) -> None:
        transport.abort()


class Admission:
    """The connection budget of one worker, and its rate-limited refusal log.

    ``admit(listener)`` counts a new connection in (False: refuse it, and it has been
    logged); ``release()`` counts a closed one out. Both are a compare and an add: they
    run on every accept of every listener.
    """

    __slots__ = ("limits", "budget", "open", "metrics", "_others", "_pending", "_timers", "_loop")

    def __init__(self, limits: ListenLimits, budget: int, metrics: RelayMetrics | None = None) -> None:
        self.limits = limits
        #: connections this worker may hold open at once
        self.budget = budget
        #: connections open now (counted in by admit, out by release)
        self.open = 0
        #: where refusals are counted (``<listener>_refused``): the worker's, or one of its own
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self._others = 0
        #: refusals of each (kind, listener) not yet logged, while that kind's timer runs
        self._pending: dict[tuple[str, str], int] = {}
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_process(cls, limits: ListenLimits, metrics: RelayMetrics | None = None) -> "Admission":
        """The budget of this process: its open-file limit less the reserve and what is open now."""
        admission = cls(limits, 0, metrics)
        admission.recount()
        return admission

    def recount(self) -> None:
        """Measure again what is open besides connections (listeners come and go with apps).

        Lists /proc/self/fd: called at start and on configuration changes, never per connection.
        """
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 30
        total = open_descriptors()
        if total is not None:
            self._others = max(0, total - self.open)
        self.budget = max(0, soft - self.limits.fd_reserve - self._others)

    def admit(self, listener: str) -> bool:
        if self.open >= self.budget:
            self.refuse("descriptor reserve reached", listener)
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1

    def refuse(self, kind: str, listener: str, peer: str | None = None) -> None:
        """Count a refused connection; log it now, or with the others of its kind at the end
        of the interval."""
        self.metrics.count(f"{listener}_refused")
        key = (kind, listener)
        if key in self._timers:
            self._pending[key] = self._pending.get(key, 0) + 1
            return
        self._log(key, 1, peer)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._timers[key] = self._loop.call_later(self.limits.refusal_log_interval, self._flush, key)

    def _flush(self, key: tuple[str, str]) -> None:
        count = self._pending.pop(key, 0)
        if count:
            self._log(key, count, None)
            self._timers[key] = self._loop.call_later(self.limits.refusal_log_interval, self._flush, key)
        else:
            del self._timers[key]

    def _log(self, key: tuple[str, str], count: int, peer: str | None) -> None:
        kind, listener = key
        extra = {"listener": listener, "reason": kind, "refused": count, "open": self.open, "budget": self.budget}
        if peer is not None:
            extra["peer"] = peer
        log.warning("new connections refused", extra=extra)

    def close(self) -> None:
        """Cancel the log timers, logging what they still held."""
        for key, timer in list(self._timers.items()):
            timer.cancel()
            count = self._pending.pop(key, 0)
            if count:
                self._log(key, count, None)
        self._timers.clear()
