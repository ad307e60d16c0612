"""A bounded table of UDP flows that finds idle ones without scanning every flow.

Flows are kept in order of their last activity (a touch moves a flow to the end), so
the idle ones are always at the front and a sweep stops at the first flow still in use.
The clock is passed in, so tests drive idle expiry with a fake one.
"""

from __future__ import annotations

import collections
import time
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FlowLimitReached(Exception):
    """The table holds its limit of flows; a new one must wait for one to end."""


class FlowTable(Generic[K, V]):
    """At most ``limit`` flows by key; a flow untouched for ``idle_timeout`` seconds is idle."""

    def __init__(self, limit: int, idle_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or idle_timeout <= 0:
            raise ValueError("a flow table needs a limit of at least 1 and an idle timeout above 0")
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._flows: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._last: dict[K, float] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def __iter__(self) -> Iterator[V]:
        return iter(list(self._flows.values()))

    @property
    def sweep_interval(self) -> float:
        """How often to call ``pop_idle``: a flow outlives its timeout by at most this."""
        return min(5.0, self.idle_timeout / 4)

    def get(self, key: K) -> V | None:
        return self._flows.get(key)

    def add(self, key: K, flow: V) -> None:
        """Add a flow, active now; FlowLimitReached when the table is full."""
        if key in self._flows:
            raise KeyError(f"flow {key!r} is already in the table")
        if len(self._flows) >= self.limit:
            raise FlowLimitReached(f"{len(self._flows)} flows open (the limit)")
        self._flows[key] = flow
        self._last[key] = self._clock()

    def touch(self, key: K) -> None:
        """The flow carried a datagram: it is active now."""
        if key in self._flows:
            self._last[key] = self._clock()
            self._flows.move_to_end(key)

    def remove(self, key: K) -> V | None:
        self._last.pop(key, None)
        return self._flows.pop(key, None)

    def idle_for(self, key: K) -> float:
        """Seconds since the flow was last active."""
        return self._clock() - self._last[key]

    def pop_idle(self) -> list[V]:
        """Remove and return every flow idle for ``idle_timeout`` seconds or more."""
        now = self._clock()
        idle: list[K] = []
        for key in self._flows:
            if now - self._last[key] < self.idle_timeout:
                break
            idle.append(key)
        out = []
        for key in idle:
            del self._last[key]
            out.append(self._flows.pop(key))
        return out

    def clear(self) -> list[V]:
        """Remove and return every flow."""
        out = list(self._flows.values())
        self._flows.clear()
        self._last.clear()
        return out
