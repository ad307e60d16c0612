"""The relay's figures: streams by app, tunnels by connector (docs/metrics.md).

User streams are counted where they open, are accepted and end (a few integer
additions per stream); tunnel bytes and frames are the counters the tunnel and codec
keep anyway, read once a tick. Labels are app names and connector ids, both bounded by
the store: figures of an app or connector that is gone from it are dropped at the next
reload (``prune``), and failure reasons are wire error codes, a fixed set.

Every edge reports each user stream through ``stream_started``, ``stream_accepted`` and
``stream_done`` (relay.opening.Opening's hooks: once each per stream, however many opens it
took); the stream must carry ``labels["app"]``, ``started``, ``bytes_up`` (client to app),
``bytes_down`` and ``code``. For a UDP app a stream is a flow, and its bytes are datagram
payloads. The UDP edge also adds to the app's ``UdpFigures`` (datagrams, drops by reason,
failovers) directly: an attribute add per datagram, like the codec's own counters.

Everything else the worker's parts count (listener refusals, timeouts, drops without an
app) goes through ``count(event)``, published as ``events_total{event}``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from backhaul.metrics import OPEN_LATENCY_BUCKETS
from backhaul.protocol.constants import ErrorCode, error_name
from backhaul.reporter import STATS_DIR
from backhaul.runstats import Histogram, MetricSpec, StatsDir, cpu_seconds, rss_bytes

if TYPE_CHECKING:
    from backhaul.transport.pipe import Pipe
    from backhaul.transport.tunnel import Tunnel

P = "backhaul_relay_"
A = ("app",)
C = ("connector",)

SPECS = {
    spec.name: spec
    for spec in (
        MetricSpec(P + "workers", "gauge", "Worker processes reporting figures."),
        MetricSpec(P + "tunnels", "gauge", "Tunnels up, by connector.", C),
        MetricSpec(P + "tunnels_opened_total", "counter", "Tunnels accepted from a connector.", C),
        MetricSpec(P + "tunnel_received_bytes_total", "counter", "Bytes received on a connector's tunnels (frames, inside TLS).", C),
        MetricSpec(P + "tunnel_sent_bytes_total", "counter", "Bytes sent on a connector's tunnels (frames, inside TLS).", C),
        MetricSpec(P + "frames_received_total", "counter", "Frames received on a connector's tunnels.", C),
        MetricSpec(P + "frames_sent_total", "counter", "Frames sent on a connector's tunnels.", C),
        MetricSpec(P + "streams_active", "gauge", "User streams open now, by app.", A),
        MetricSpec(P + "streams_opened_total", "counter", "User connections or requests that started a stream, by app.", A),
        MetricSpec(
            P + "streams_failed_total", "counter",
            "User streams refused or not ended cleanly, by app and wire error code.", A + ("reason",),
        ),
        MetricSpec(
            P + "stream_bytes_total", "counter",
            "Stream payload bytes, by app and direction (client_to_app, app_to_client).", A + ("direction",),
        ),
        MetricSpec(
            P + "stream_open_seconds", "histogram",
            "From the user's connection to a connector's OPEN_OK (retries included), by app.", A, buckets=OPEN_LATENCY_BUCKETS,
        ),
        # -- UDP apps (their flows are streams above; these are what only datagrams have)
        MetricSpec(
            P + "udp_datagrams_total", "counter",
            "Datagrams that reached a UDP app's flows, by app and direction (client_to_app: from users "
            "at the app's port; app_to_client: from connectors); each one was forwarded or counted in udp_dropped_total.",
            A + ("direction",),
        ),
        MetricSpec(
            P + "udp_dropped_total", "counter",
            "Datagrams of a UDP app dropped, by app and reason (a fixed set, docs/metrics.md).", A + ("reason",),
        ),
        MetricSpec(
            P + "udp_flows_failed_over_total", "counter",
            "UDP flows moved to another connector when their tunnel went away or drained, by app.", A,
        ),
        MetricSpec(
            P + "udp_flows_idle_total", "counter",
            "UDP flows ended after the idle timeout with no datagram either way (their normal end), by app.", A,
        ),
        MetricSpec(P + "cpu_seconds_total", "counter", "CPU time (user + system) of the worker processes."),
        MetricSpec(P + "memory_bytes", "gauge", "Resident memory of the live worker processes."),
        MetricSpec(P + "config_version", "gauge", "Store config version served (the oldest any worker has).", aggregate="min"),
        MetricSpec(
            P + "events_total", "counter",
            "Things the worker counts by name: refusals, timeouts, drops (docs/metrics.md lists them).", ("event",),
        ),
        # -- rollout
        MetricSpec(P + "update_reports_total", "counter", "Update steps connectors reported, by step.", ("step",)),
    )
}


#: Why the UDP edge drops a datagram: the label set of udp_dropped_total (fixed, so bounded).
UDP_DROPS = (
    "too_big",  # over MAX_DATAGRAM, the most a DATAGRAM frame carries
    "flow_limit",  # a new user while the app has UdpLimits.max_flows flows
    "no_route",  # a new user's flow found no connector to take it
    "queue_full",  # held while the flow opens, beyond UdpLimits.pending_bytes
    "open_failed",  # held while the flow opened, and the open failed
    "tunnel_busy",  # the tunnel's write buffer is above its high mark
    "socket_busy",  # the app socket's write buffer is above UdpLimits.socket_write_high
    "closing",  # to a user after the app's socket closed
    "empty",  # an empty datagram to a user (asyncio's UDP transports cannot send one)
)


class UdpFigures:
    """What only a UDP app has: the UDP edge adds to these fields directly."""

    __slots__ = ("up", "down", "dropped", "failed_over", "idle")

    def __init__(self) -> None:
        self.up = 0  # datagrams from users at the app's port
        self.down = 0  # datagrams from connectors for the app's flows
        self.dropped = dict.fromkeys(UDP_DROPS, 0)
        self.failed_over = 0
        self.idle = 0


class _AppFigures:
    __slots__ = ("opened", "failed", "to_app", "to_client", "latency", "live", "udp")

    def __init__(self) -> None:
        self.opened = 0
        self.failed: dict[str, int] = {}
        self.to_app = 0  # bytes of ended streams
        self.to_client = 0
        self.latency = Histogram(OPEN_LATENCY_BUCKETS)
        self.live: set = set()
        self.udp: UdpFigures | None = None  # made for UDP apps by RelayMetrics.udp


class RelayMetrics:
    """Plain counters of one relay worker, and its snapshot for runstats."""

    def __init__(self) -> None:
        self.apps: dict[str, _AppFigures] = {}
        #: per connector: [tunnels opened, then bytes and frames of closed tunnels: received, sent, frames in, frames out]
        self.connectors: dict[str, list[int]] = {}
        #: events by name (a fixed set written in the code: listener names, timeouts, drops)
        self.events: dict[str, int] = {}
        # -- rollout
        #: update reports by step, counted by the control API (its steps are a fixed set: store.UPDATE_STEPS)
        self.update_reports: dict[str, int] = {}

    def _app(self, name: str) -> _AppFigures:
        figures = self.apps.get(name)
        if figures is None:
            figures = self.apps[name] = _AppFigures()
        return figures

    # ------------------------------------------------------------------ streams (called by the edges)

    def stream_started(self, pipe: "Pipe") -> None:
        figures = self._app(pipe.labels["app"])
        figures.opened += 1
        figures.live.add(pipe)

    def stream_accepted(self, pipe: "Pipe") -> None:
        self._app(pipe.labels["app"]).latency.observe(time.monotonic() - pipe.started)

    def stream_done(self, pipe: "Pipe") -> None:
        figures = self._app(pipe.labels["app"])
        figures.live.discard(pipe)
        figures.to_app += pipe.bytes_up
        figures.to_client += pipe.bytes_down
        if pipe.code != ErrorCode.NO_ERROR:
            name = error_name(pipe.code)
            figures.failed[name] = figures.failed.get(name, 0) + 1

    def count(self, event: str, n: int = 1) -> None:
        self.events[event] = self.events.get(event, 0) + n

    def udp(self, app: str) -> UdpFigures:
        """The UDP figures of ``app`` (the UDP edge keeps the object and adds to it)."""
        figures = self._app(app)
        if figures.udp is None:
            figures.udp = UdpFigures()
        return figures.udp

    # ------------------------------------------------------------------ tunnels

    def _connector(self, connector_id: str) -> list[int]:
        figures = self.connectors.get(connector_id)
        if figures is None:
            figures = self.connectors[connector_id] = [0, 0, 0, 0, 0]
        return figures

    def tunnel_opened(self, connector_id: str) -> None:
        self._connector(connector_id)[0] += 1

    def tunnel_closed(self, tunnel: "Tunnel") -> None:
        figures = self._connector(tunnel.info.connector_id)
        figures[1] += tunnel.bytes_in
        figures[2] += tunnel.bytes_out
        figures[3] += tunnel.session.frames_received
        figures[4] += tunnel.session.frames_sent

    def prune(self, apps: set[str], connector_exists) -> None:
        """Forget apps not in ``apps`` and connectors for which ``connector_exists(id)`` is false."""
        for name in [n for n, f in self.apps.items() if n not in apps and not f.live]:
            del self.apps[name]
        for connector_id in [c for c in self.connectors if not connector_exists(c)]:
            del self.connectors[connector_id]

    # ------------------------------------------------------------------ snapshot

    def snapshot(self, tunnels: list["Tunnel"], apps: list[str], config_version: int, worker: int) -> dict:
        for name in apps:
            self._app(name)
        per_connector: dict[str, list[int]] = {cid: [0, *figures[1:]] for cid, figures in self.connectors.items()}
        up: dict[str, int] = {}
        for tunnel in tunnels:
            cid = tunnel.info.connector_id
            figures = per_connector.setdefault(cid, [0, 0, 0, 0, 0])
            figures[1] += tunnel.bytes_in
            figures[2] += tunnel.bytes_out
            figures[3] += tunnel.session.frames_received
            figures[4] += tunnel.session.frames_sent
            up[cid] = up.get(cid, 0) + 1
        opened = {cid: figures[0] for cid, figures in self.connectors.items()}
        series: dict[str, list] = {
            P + "workers": [[[], 1]],
            P + "tunnels": [[[cid], up.get(cid, 0)] for cid in per_connector],
            P + "tunnels_opened_total": [[[cid], n] for cid, n in opened.items()],
            P + "tunnel_received_bytes_total": [[[cid], f[1]] for cid, f in per_connector.items()],
            P + "tunnel_sent_bytes_total": [[[cid], f[2]] for cid, f in per_connector.items()],
            P + "frames_received_total": [[[cid], f[3]] for cid, f in per_connector.items()],
            P + "frames_sent_total": [[[cid], f[4]] for cid, f in per_connector.items()],
            P + "streams_active": [],
            P + "streams_opened_total": [],
            P + "streams_failed_total": [],
            P + "stream_bytes_total": [],
            P + "stream_open_seconds": [],
            P + "udp_datagrams_total": [],
            P + "udp_dropped_total": [],
            P + "udp_flows_failed_over_total": [],
            P + "udp_flows_idle_total": [],
            P + "cpu_seconds_total": [[[], round(cpu_seconds(), 3)]],
            P + "memory_bytes": [[[], rss_bytes()]],
            P + "config_version": [[[], config_version]],
            P + "events_total": [[[name], n] for name, n in sorted(self.events.items())],
            # -- rollout
            P + "update_reports_total": [[[step], n] for step, n in sorted(self.update_reports.items())],
        }
        for name, figures in self.apps.items():
            to_app = figures.to_app + sum(p.bytes_up for p in figures.live)
            to_client = figures.to_client + sum(p.bytes_down for p in figures.live)
            series[P + "streams_active"].append([[name], len(figures.live)])
            series[P + "streams_opened_total"].append([[name], figures.opened])
            series[P + "streams_failed_total"] += [[[name, reason], n] for reason, n in figures.failed.items()]
            series[P + "stream_bytes_total"] += [[[name, "client_to_app"], to_app], [[name, "app_to_client"], to_client]]
            series[P + "stream_open_seconds"].append([[name], figures.latency.value()])
            udp = figures.udp
            if udp is not None:
                series[P + "udp_datagrams_total"] += [[[name, "client_to_app"], udp.up], [[name, "app_to_client"], udp.down]]
                series[P + "udp_dropped_total"] += [[[name, reason], n] for reason, n in udp.dropped.items()]
                series[P + "udp_flows_failed_over_total"].append([[name], udp.failed_over])
                series[P + "udp_flows_idle_total"].append([[name], udp.idle])
        return {
            "worker": worker,
            "known": {"app": sorted(self.apps), "connector": sorted(per_connector)},
            "series": series,
        }


def node_traffic(run_dir: Path) -> dict[str, int]:
    """Bytes each connector's tunnels carried through this node, both ways, from the
    relay's own counters: every worker's last published snapshot (the run dir's stats,
    as /metrics reads them) and the retired figures of workers that exited. Blocking
    file reads; the admin center calls it off the loop, once per sample."""
    merged, _ = StatsDir(run_dir / STATS_DIR, SPECS).collect()
    totals: dict[str, int] = {}
    for name in (P + "tunnel_received_bytes_total", P + "tunnel_sent_bytes_total"):
        for key, value in merged.get(name, {}).items():
            totals[key[0]] = totals.get(key[0], 0) + int(value)
    return totals
