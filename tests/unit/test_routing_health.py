"""The relay's routing filter (relay/routing.py): apps go only to connectors that reach them.

Tunnels are real Tunnel objects over real mux Sessions, not connected to a socket: the
registry only reads their connector, usability and load.
"""

from __future__ import annotations

import asyncio

import pytest

from backhaul.config import FlowControl, Keepalive
from backhaul.protocol import mux
from backhaul.relay.routing import MAX_DOWN_APPS, NoRoute, TunnelRecord, TunnelRegistry
from backhaul.transport.tunnel import Tunnel


class Owner:
    """The TunnelOwner side is not exercised: the tunnels never connect."""


def _tunnel(connector_id: str, group: str) -> Tunnel:
    tunnel = Tunnel(mux.Session(mux.Role.RELAY, FlowControl(), Keepalive()), Owner(), name=connector_id)
    tunnel.info = TunnelRecord(connector_id, group)
    return tunnel


@pytest.fixture
def registry():
    """A registry with connectors a and b (group g, two tunnels each) and c (group other)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    reg = TunnelRegistry()
    reg.tunnels_of = {}
    for cid, group in (("a", "g"), ("b", "g"), ("c", "other")):
        reg.tunnels_of[cid] = [_tunnel(cid, group), _tunnel(cid, group)]
        for tunnel in reg.tunnels_of[cid]:
            reg.add(tunnel)
    yield reg
    asyncio.set_event_loop(None)
    loop.close()


def _report(reg: TunnelRegistry, cid: str, apps: dict) -> int:
    return sum(reg.report_health(t, apps) for t in reg.tunnels_of[cid])


def _picked(reg: TunnelRegistry, app: str | None, n: int = 20) -> set[str]:
    return {reg.pick("g", app=app).info.connector_id for _ in range(n)}


def test_unknown_counts_as_reachable(registry):
    assert {registry.pick("g", exclude=registry.tunnels_of["a"], app="web").info.connector_id} == {"b"}
    assert {registry.pick("g", exclude=registry.tunnels_of["b"], app="web").info.connector_id} == {"a"}


def test_a_connector_that_cannot_reach_the_app_gets_none_of_its_streams(registry):
    assert _report(registry, "b", {"web": False, "db": True}) == 0
    assert _picked(registry, "web") == {"a"}
    # b still serves the apps it reaches, and routing without an app is unchanged
    assert registry.pick("g", exclude=registry.tunnels_of["a"], app="db").info.connector_id == "b"
    assert registry.pick("g", exclude=registry.tunnels_of["a"]).info.connector_id == "b"


def test_only_the_reporting_tunnel_is_filtered(registry):
    """Each connector worker checks for itself; a tunnel carries its own worker's view."""
    down, up = registry.tunnels_of["b"]
    registry.report_health(down, {"web": False})
    choices = {id(registry.pick("g", exclude=registry.tunnels_of["a"], app="web")) for _ in range(10)}
    assert choices == {id(up)}


def test_every_connector_down_refuses_with_a_reason(registry):
    _report(registry, "a", {"web": False})
    _report(registry, "b", {"web": False})
    with pytest.raises(NoRoute, match="no connector in group 'g' can reach app 'web'"):
        registry.pick("g", app="web")
    assert registry.pick("other", app="web").info.connector_id == "c"  # other groups untouched
    with pytest.raises(NoRoute, match="no active connector in group 'empty'"):
        registry.pick("empty", app="web")


def test_recovery_and_unknown_clear_a_down_report(registry):
    _report(registry, "a", {"web": False})
    _report(registry, "b", {"web": False})
    _report(registry, "a", {"web": True})
    assert _picked(registry, "web") == {"a"}
    _report(registry, "b", {"web": None})  # e.g. the app's target changed: unknown again
    first = registry.pick("g", app="web")
    second = registry.pick("g", exclude=[t for t in registry.tunnels() if t.info.connector_id == first.info.connector_id], app="web")
    assert {first.info.connector_id, second.info.connector_id} == {"a", "b"}


def test_retry_goes_to_another_reachable_connector(registry):
    registry.add(extra := _tunnel("d", "g"))
    registry.tunnels_of["d"] = [extra]
    _report(registry, "b", {"web": False})
    tried = registry.tunnels_of["a"]
    assert registry.pick("g", exclude=tried, app="web").info.connector_id == "d"
    with pytest.raises(NoRoute, match="can reach app 'web'"):
        registry.pick("g", exclude=tried + [extra], app="web")


def test_malformed_entries_and_strangers_are_ignored(registry):
    tunnel = registry.tunnels_of["a"][0]
    assert registry.report_health(tunnel, {"web": "no", "x" * 64: False, "ok": False}) == 2
    assert registry.pick("g", exclude=registry.tunnels_of["b"] + [tunnel], app="ok") is registry.tunnels_of["a"][1]
    stranger = _tunnel("zz", "g")
    assert registry.report_health(stranger, {"web": False}) == 1  # not registered: nothing kept


def test_reports_are_bounded_and_forgotten_with_the_tunnel(registry):
    tunnel = registry.tunnels_of["a"][0]
    ignored = registry.report_health(tunnel, {f"app{i}": False for i in range(MAX_DOWN_APPS + 50)})
    assert ignored == 50
    assert len(registry._down[tunnel]) == MAX_DOWN_APPS
    # entries already held can still change, new ones cannot be added
    assert registry.report_health(tunnel, {"app0": True, "app1": False, "new": False}) == 0
    assert len(registry._down[tunnel]) == MAX_DOWN_APPS
    registry.remove(tunnel)
    assert tunnel not in registry._down
