"""Cost of choosing a tunnel per stream (TunnelRegistry.pick), with and without origin health.

A group of CONNECTORS connectors with TUNNELS tunnels each, plus another group of the
same size. "plain": no app given (no health filter); "healthy": the app is given but no
connector reported anything down; "one_down": one connector reports the app down.
Run: PYTHONPATH=src python -m pytest bench/test_bench_routing.py --benchmark-columns=mean,ops
"""

from __future__ import annotations

import asyncio

import pytest

from backhaul.config import FlowControl, Keepalive
from backhaul.protocol import mux
from backhaul.relay.routing import TunnelRecord, TunnelRegistry
from backhaul.transport.tunnel import Tunnel

pytestmark = pytest.mark.bench_only

CONNECTORS = 4
TUNNELS = 4
PICKS = 1000


class _Owner:
    """Never called: the tunnels are not connected."""


@pytest.fixture
def registry():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    reg = TunnelRegistry()
    for group in ("g", "other"):
        for c in range(CONNECTORS):
            cid = f"{group}-{c}"
            for _ in range(TUNNELS):
                tunnel = Tunnel(mux.Session(mux.Role.RELAY, FlowControl(), Keepalive()), _Owner(), name=cid)
                tunnel.info = TunnelRecord(cid, group)
                reg.add(tunnel)
    yield reg
    asyncio.set_event_loop(None)
    loop.close()


@pytest.mark.parametrize("case", ["plain", "healthy", "one_down"])
def test_pick(benchmark, registry, case):
    app = None if case == "plain" else "web"
    if case == "one_down":
        for tunnel in registry.tunnels("g-0"):
            registry.report_health(tunnel, {"web": False})

    def picks():
        chosen = None
        for _ in range(PICKS):
            chosen = registry.pick("g", app=app)
        return chosen

    chosen = benchmark.pedantic(picks, rounds=20, iterations=1, warmup_rounds=2)
    assert chosen.info.connector_id != "g-0" or case != "one_down"
    benchmark.extra_info["picks_per_round"] = PICKS
