"""Per-address token buckets in a bounded table: the control API's brake on failed enrollments."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable

from backhaul.config import EnrollLimits


@dataclasses.dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    #: when this address's last 429 was logged (None: not yet)
    logged: float | None = None


class AddressLimiter:
    """A token bucket per address, at most ``limits.max_addresses`` of them (LRU).

    ``retry_after(addr)`` says whether an attempt may go ahead (0) or how many seconds
    to wait; ``failed(addr)`` spends one token. The table lives in one process: each
    relay worker has its own.
    """

    def __init__(self, limits: EnrollLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self._clock = clock
        self._buckets: collections.OrderedDict[str, _Bucket] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, addr: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(addr)
        if bucket is None:
            bucket = self._buckets[addr] = _Bucket(tokens=float(self.limits.burst), stamp=now)
            while len(self._buckets) > self.limits.max_addresses:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(addr)
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(float(self.limits.burst), bucket.tokens + elapsed * self.limits.refill_per_second)
            bucket.stamp = now
        return bucket

    def retry_after(self, addr: str) -> int:
        """0 when ``addr`` may try now; else whole seconds until it may."""
        bucket = self._bucket(addr)
        if bucket.tokens >= 1.0:
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / self.limits.refill_per_second))

    def failed(self, addr: str) -> None:
        """``addr`` made a refused attempt: one token less."""
        bucket = self._bucket(addr)
        bucket.tokens = max(0.0, bucket.tokens - 1.0)

    def should_log(self, addr: str) -> bool:
        """True at most once per ``log_interval`` per address (for the 429 log line)."""
        bucket = self._bucket(addr)
        now = self._clock()
        if bucket.logged is not None and now - bucket.logged < self.limits.log_interval:
            return False
        bucket.logged = now
        return True
