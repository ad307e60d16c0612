"""The connector's figures: what it counts, its metrics (docs/metrics.md) and its status.

Streams are counted where they open, fail or end (a few integer additions per stream);
tunnel bytes and frames are the plain counters the tunnel and codec keep anyway, read
once a tick. Every metric is labelled by connector (one value per connector),
failures also by wire error code and events by name (two fixed sets), so every label
set is bounded.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import TYPE_CHECKING

from backhaul import __version__
from backhaul.metrics import OPEN_LATENCY_BUCKETS
from backhaul.protocol.constants import error_name
from backhaul.runstats import Histogram, MetricSpec, cpu_seconds, rss_bytes

if TYPE_CHECKING:
    from backhaul.connector.state import ConnectorState
    from backhaul.transport.tunnel import Tunnel


@dataclasses.dataclass(frozen=True)
class WorkerNow:
    """What a connector worker is at the moment its figures are taken (the agent answers
    it each tick), so the figures need neither the agent nor its module."""

    state: "ConnectorState"
    #: every tunnel open now (bytes, frames and load are read off them)
    tunnels: list["Tunnel"]
    #: of those, the ones the relay has answered hello on
    tunnels_up: int
    config_version: int | None


C = ("connector",)
P = "backhaul_connector_"

SPECS = {
    spec.name: spec
    for spec in (
        # The installed version as a label (value 1), so a fleet's versions are one query away
        # during a rollout; one series per connector (a restart on a new version replaces it).
        MetricSpec(P + "info", "gauge", "Always 1; the version label is the installed backhaul version.", C + ("version",), aggregate="max"),
        MetricSpec(P + "workers", "gauge", "Worker processes reporting figures.", C),
        MetricSpec(P + "tunnels", "gauge", "Tunnels up (the relay has answered hello).", C),
        MetricSpec(P + "tunnels_opened_total", "counter", "Tunnel connections made to the relay.", C),
        MetricSpec(P + "streams_active", "gauge", "Streams open now, opening ones included.", C),
        MetricSpec(P + "streams_opened_total", "counter", "Streams the relay asked for (OPEN received), refused ones included.", C),
        MetricSpec(
            P + "streams_failed_total", "counter",
            "Streams refused, not connected or not ended cleanly, by wire error code.", C + ("reason",),
        ),
        MetricSpec(
            P + "stream_open_seconds", "histogram",
            "From OPEN received to the target connected (OPEN_OK sent).", C, buckets=OPEN_LATENCY_BUCKETS,
        ),
        MetricSpec(P + "tunnel_received_bytes_total", "counter", "Bytes received on tunnels (frames, inside TLS).", C),
        MetricSpec(P + "tunnel_sent_bytes_total", "counter", "Bytes sent on tunnels (frames, inside TLS).", C),
        MetricSpec(P + "frames_received_total", "counter", "Frames received on tunnels.", C),
        MetricSpec(P + "frames_sent_total", "counter", "Frames sent on tunnels.", C),
        MetricSpec(P + "cpu_seconds_total", "counter", "CPU time (user + system) of the worker processes.", C),
        MetricSpec(P + "memory_bytes", "gauge", "Resident memory of the live worker processes.", C),
        MetricSpec(
            P + "certificate_expiry_timestamp_seconds", "gauge",
            "When the connector certificate expires (Unix time; the earliest any worker holds).", C, aggregate="min",
        ),
        MetricSpec(P + "config_version", "gauge", "Config version applied (the oldest any worker has).", C, aggregate="min"),
        MetricSpec(P + "session_log_enabled", "gauge", "1 while every worker writes the session log.", C, aggregate="min"),
        MetricSpec(
            P + "events_total", "counter",
            "Things a worker counts by name: streams dialed and refused, UDP flows and drops (docs/metrics.md lists them).",
            C + ("event",),
        ),
    )
}


class ConnectorMetrics:
    """The counters of one connector worker (what the agent, its streams and its UDP flows
    record), and its snapshot for runstats.

    Two stream counts with two meanings: ``streams_opened`` is every OPEN the relay sent
    (refused ones and UDP flows included; ``streams_opened_total``), the event
    ``streams_dialed`` only the tcp and http streams the allow-list let through, counted
    as their target connect starts."""

    def __init__(self) -> None:
        #: OPENs received (``backhaul_connector_streams_opened_total``)
        self.streams_opened = 0
        #: tunnel connections made to the relay (``backhaul_connector_tunnels_opened_total``)
        self.tunnels_opened = 0
        self.failed: dict[str, int] = {}
        self.open_latency = Histogram(OPEN_LATENCY_BUCKETS)
        #: bytes and frames of tunnels already closed: [received, sent, frames received, frames sent]
        self.closed_tunnels = [0, 0, 0, 0]
        #: counts by name (``backhaul_connector_events_total{event}``), a fixed set written in the
        #: code: ``streams_dialed``, ``streams_refused``, and the ``udp_*`` counts of connector.udp_flows,
        #: which writes into this very dict
        self.events: dict[str, int] = {}

    def count(self, event: str, n: int = 1) -> None:
        self.events[event] = self.events.get(event, 0) + n

    def stream_failed(self, code: int) -> None:
        name = error_name(code)
        self.failed[name] = self.failed.get(name, 0) + 1

    def tunnel_closed(self, tunnel: "Tunnel") -> None:
        totals = self.closed_tunnels
        totals[0] += tunnel.bytes_in
        totals[1] += tunnel.bytes_out
        totals[2] += tunnel.session.frames_received
        totals[3] += tunnel.session.frames_sent

    def totals(self) -> dict[str, int]:
        """The counts by name, for a log line (the drain's): the same figures as /metrics."""
        return {"tunnels_opened": self.tunnels_opened, "streams_opened": self.streams_opened, **self.events}

    def snapshot(self, now: WorkerNow, worker: int, session_log: bool, reporter_info: dict) -> dict:
        state = now.state
        cid = state.connector_id
        tunnels = now.tunnels
        received, sent, frames_in, frames_out = self.closed_tunnels
        for tunnel in tunnels:
            received += tunnel.bytes_in
            sent += tunnel.bytes_out
            frames_in += tunnel.session.frames_received
            frames_out += tunnel.session.frames_sent

        def value(v) -> list:
            return [[[cid], v]]

        series = {
            P + "info": [[[cid, __version__], 1]],
            P + "workers": value(1),
            P + "tunnels": value(now.tunnels_up),
            P + "tunnels_opened_total": value(self.tunnels_opened),
            P + "streams_active": value(sum(t.load for t in tunnels)),
            P + "streams_opened_total": value(self.streams_opened),
            P + "streams_failed_total": [[[cid, reason], n] for reason, n in self.failed.items()],
            P + "stream_open_seconds": value(self.open_latency.value()),
            P + "tunnel_received_bytes_total": value(received),
            P + "tunnel_sent_bytes_total": value(sent),
            P + "frames_received_total": value(frames_in),
            P + "frames_sent_total": value(frames_out),
            P + "cpu_seconds_total": value(round(cpu_seconds(), 3)),
            P + "memory_bytes": value(rss_bytes()),
            P + "certificate_expiry_timestamp_seconds": value(state.cert_not_after.timestamp()),
            P + "session_log_enabled": value(1 if session_log else 0),
            P + "events_total": [[[cid, name], n] for name, n in sorted(self.events.items())],
        }
        if now.config_version is not None:
            series[P + "config_version"] = value(now.config_version)
        return {
            "worker": worker,
            "known": {"connector": [cid]},
            "info": {
                "connector": cid,
                "name": state.name,
                "version": __version__,
                "session_log": session_log,
                **reporter_info,
            },
            "series": series,
        }


def _one(merged: dict, name: str, default=0):
    values = merged.get(P + name) or {}
    return next(iter(values.values()), default)


def _quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The bucket bound under which ``q`` of the observations fall (None without any)."""
    total = sum(counts)
    if not total:
        return None
    running = 0
    for bound, count in zip(list(bounds) + [float("inf")], counts, strict=True):
        running += count
        if running >= q * total:
            return bound
    return float("inf")


def status_figures(merged: dict, live: list[dict]) -> dict:
    """The figures `connector status` prints, from the same merged figures /metrics shows."""
    latency = _one(merged, "stream_open_seconds", {"b": [0] * (len(OPEN_LATENCY_BUCKETS) + 1), "s": 0.0})
    opens = sum(latency["b"])
    expiry = _one(merged, "certificate_expiry_timestamp_seconds", None)
    info = next((s.get("info", {}) for s in live if s.get("worker") == 0), live[0].get("info", {}) if live else {})
    return {
        "workers": int(_one(merged, "workers")),
        "tunnels": int(_one(merged, "tunnels")),
        "tunnels_opened": int(_one(merged, "tunnels_opened_total")),
        "streams_active": int(_one(merged, "streams_active")),
        "streams_opened": int(_one(merged, "streams_opened_total")),
        "streams_failed": {key[1]: int(v) for key, v in sorted((merged.get(P + "streams_failed_total") or {}).items())},
        "stream_open_seconds": {
            "count": opens,
            "mean": round(latency["s"] / opens, 6) if opens else None,
            "p50_under": _quantile(OPEN_LATENCY_BUCKETS, latency["b"], 0.5),
            "p99_under": _quantile(OPEN_LATENCY_BUCKETS, latency["b"], 0.99),
        },
        "tunnel_bytes_received": int(_one(merged, "tunnel_received_bytes_total")),
        "tunnel_bytes_sent": int(_one(merged, "tunnel_sent_bytes_total")),
        "frames_received": int(_one(merged, "frames_received_total")),
        "frames_sent": int(_one(merged, "frames_sent_total")),
        "cpu_seconds": round(float(_one(merged, "cpu_seconds_total")), 2),
        "memory_bytes": int(_one(merged, "memory_bytes")),
        "certificate_expires": (
            datetime.datetime.fromtimestamp(expiry, datetime.timezone.utc).isoformat() if expiry is not None else None
        ),
        "config_version": _one(merged, "config_version", None),
        "session_log": bool(_one(merged, "session_log_enabled")),
        "metrics": info.get("metrics"),
        "version": info.get("version"),
        "time": time.time(),
    }
