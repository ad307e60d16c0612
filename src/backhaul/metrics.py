"""The Prometheus endpoint of a connector or a relay: the family's figures in exposition format.

The figures come from ``runstats`` (every worker's snapshot, added up); prometheus_client
writes the exposition format from them through a custom collector, so nothing here
formats Prometheus text by hand. The listening socket is made by the supervisor before
any worker starts (a clash is a clear error at once, and the port stays bound while a
worker restarts); worker 0 serves it.
"""

from __future__ import annotations

import socket
from typing import Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from backhaul.errors import ConfigError
from backhaul.runstats import MetricSpec
from backhaul.transport.sockets import parse_hostport

#: Upper bounds (seconds) of the stream-open latency buckets.
OPEN_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _FiguresCollector:
    """Hands merged figures to prometheus_client as metric families."""

    def __init__(self, specs: Mapping[str, MetricSpec], merged: Mapping[str, Mapping[tuple, object]]) -> None:
        self.specs = specs
        self.merged = merged

    def collect(self):
        for name, spec in self.specs.items():
            values = self.merged.get(name, {})
            labels = list(spec.labels)
            if spec.kind == "counter":
                family = CounterMetricFamily(name, spec.help, labels=labels)
                for key, value in values.items():
                    family.add_metric(list(key), value)
            elif spec.kind == "gauge":
                family = GaugeMetricFamily(name, spec.help, labels=labels)
                for key, value in values.items():
                    family.add_metric(list(key), value)
            else:
                family = HistogramMetricFamily(name, spec.help, labels=labels)
                for key, value in values.items():
                    running, buckets = 0, []
                    for bound, count in zip(list(spec.buckets) + [float("inf")], value["b"], strict=True):
                        running += count
                        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
                    family.add_metric(list(key), buckets, value["s"])
            yield family


def render(specs: Mapping[str, MetricSpec], merged: Mapping[str, Mapping[tuple, object]]) -> bytes:
    """The exposition text of ``merged`` (from runstats.StatsDir.collect)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FiguresCollector(specs, merged))
    return generate_latest(registry)


def listen(address: str, what: str = "--metrics") -> socket.socket:
    """The metrics listening socket, bound and listening; ConfigError saying why not."""
    host, port = parse_hostport(address, what)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror}; choose another {what} address") from None
    sock.setblocking(False)
    return sock


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(sock: socket.socket, figures: Callable[[], bytes]) -> web.AppRunner:
    """Serve GET /metrics on ``sock`` with ``figures()``; returns the runner to clean up."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=figures(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
