"""Byte-counter samples for the admin center's charts: a bounded ring per worker.

The counters are the relay's own, for each connector's tunnels through this node (every
worker's published figures, relay.metrics.node_traffic), or else the connectors' heartbeat
counters in the store; a sample is taken when a page is rendered and the last one is older
than ``sample_interval``, so nothing is sampled while nobody looks (an open page's live
refresh keeps sampling). Rates are the difference of two samples over their time.
"""

from __future__ import annotations

import collections
from typing import Iterable

from backhaul.config import AdminCenterSettings

#: The chart's drawing box (SVG user units).
WIDTH = 120
HEIGHT = 24


class ByteSamples:
    """At most ``samples`` totals, and as many per connector for ``max_sampled_connectors``."""

    def __init__(self, settings: AdminCenterSettings) -> None:
        self.settings = settings
        self.totals: collections.deque[tuple[float, int]] = collections.deque(maxlen=settings.samples)
        self.per_connector: dict[str, collections.deque[tuple[float, int]]] = {}

    def due(self, now: float) -> bool:
        """Whether the last sample is old enough for another."""
        return not self.totals or now - self.totals[-1][0] >= self.settings.sample_interval

    def record(self, now: float, counters: Iterable[tuple[str, int]]) -> None:
        """Sample ``(connector id, bytes in + out)`` pairs, unless the last sample is recent."""
        if not self.due(now):
            return
        total = 0
        seen: dict[str, collections.deque[tuple[float, int]]] = {}
        for connector_id, count in counters:
            total += count
            if len(seen) < self.settings.max_sampled_connectors:
                ring = self.per_connector.get(connector_id)
                if ring is None:
                    ring = collections.deque(maxlen=self.settings.samples)
                ring.append((now, count))
                seen[connector_id] = ring
        # Connectors gone from the list (deleted, removed) drop their series here.
        self.per_connector = seen
        self.totals.append((now, total))

    @staticmethod
    def rates(ring: Iterable[tuple[float, int]]) -> list[float]:
        """Bytes per second between consecutive samples (a counter reset counts as 0)."""
        points = list(ring)
        return [max(0, b - a) / (t2 - t1) if t2 > t1 else 0.0 for (t1, a), (t2, b) in zip(points, points[1:])]

    def rate_of(self, connector_id: str) -> float | None:
        ring = self.per_connector.get(connector_id)
        rates = self.rates(ring) if ring else []
        return rates[-1] if rates else None

    def chart_of(self, connector_id: str | None = None) -> str:
        """SVG polyline points of the rates (the totals' when ``connector_id`` is None); "" if too few."""
        ring = self.totals if connector_id is None else self.per_connector.get(connector_id, ())
        return polyline(self.rates(ring), self.settings.samples - 1)


def polyline(values: list[float], slots: int) -> str:
    """``values`` scaled into WIDTH x HEIGHT, right-aligned in ``slots`` places."""
    if len(values) < 2:
        return ""
    top = max(values) or 1.0
    step = WIDTH / max(1, slots - 1)
    start = WIDTH - step * (len(values) - 1)
    return " ".join(f"{start + i * step:.1f},{HEIGHT - v / top * (HEIGHT - 1):.1f}" for i, v in enumerate(values))
