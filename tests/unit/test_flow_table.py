"""The UDP flow table: its limit, and idle expiry driven by a fake clock."""

from __future__ import annotations

import pytest

from backhaul.transport.flow_table import FlowLimitReached, FlowTable
from .fakes import Clock

pytestmark = pytest.mark.codec_independent


def test_the_table_refuses_flows_beyond_its_limit_and_takes_one_once_a_flow_ends():
    table = FlowTable(limit=3, idle_timeout=10, clock=Clock())
    for n in range(3):
        table.add(("127.0.0.1", n), f"flow{n}")
    with pytest.raises(FlowLimitReached):
        table.add(("127.0.0.1", 99), "one too many")
    assert len(table) == 3 and ("127.0.0.1", 99) not in table
    assert table.remove(("127.0.0.1", 1)) == "flow1"
    table.add(("127.0.0.1", 99), "fits now")
    assert len(table) == 3 and table.get(("127.0.0.1", 99)) == "fits now"


def test_a_key_is_added_once():
    table = FlowTable(limit=3, idle_timeout=10, clock=Clock())
    table.add("a", 1)
    with pytest.raises(KeyError):
        table.add("a", 2)
    assert table.get("a") == 1


def test_flows_expire_after_the_idle_timeout_and_activity_keeps_them():
    clock = Clock()
    table = FlowTable(limit=10, idle_timeout=30, clock=clock)
    table.add("quiet", "q")
    clock.now += 10
    table.add("busy", "b")
    clock.now += 19.9
    assert table.pop_idle() == []  # quiet has been idle 29.9 s
    clock.now += 0.1
    table.touch("busy")
    assert table.pop_idle() == ["q"]
    assert "quiet" not in table and "busy" in table
    clock.now += 29.9
    assert table.pop_idle() == []
    assert table.idle_for("busy") == pytest.approx(29.9)
    clock.now += 0.1
    assert table.pop_idle() == ["b"]
    assert len(table) == 0


def test_a_touch_moves_a_flow_behind_newer_ones():
    clock = Clock()
    table = FlowTable(limit=10, idle_timeout=5, clock=clock)
    for key in "abc":
        table.add(key, key)
        clock.now += 1
    table.touch("a")  # a is now the most recently active
    clock.now += 3.5  # b idle 5.5 s, c idle 4.5 s, a idle 3.5 s
    assert table.pop_idle() == ["b"]
    clock.now += 1
    assert table.pop_idle() == ["c"]
    clock.now += 0.5
    assert table.pop_idle() == ["a"]


def test_touching_an_unknown_key_adds_nothing():
    table = FlowTable(limit=1, idle_timeout=5, clock=Clock())
    table.touch("ghost")
    assert len(table) == 0


def test_many_flows_expire_in_one_sweep_and_clear_empties_the_table():
    clock = Clock()
    table = FlowTable(limit=10_000, idle_timeout=1, clock=clock)
    for n in range(10_000):
        table.add(n, n)
    with pytest.raises(FlowLimitReached):
        table.add(-1, -1)
    clock.now += 1
    assert len(table.pop_idle()) == 10_000
    table.add(1, "x")
    assert table.clear() == ["x"] and len(table) == 0


def test_the_sweep_interval_keeps_expiry_close_to_the_timeout():
    assert FlowTable(limit=1, idle_timeout=2).sweep_interval == 0.5
    assert FlowTable(limit=1, idle_timeout=600).sweep_interval == 5.0


@pytest.mark.parametrize("limit, timeout", [(0, 1), (1, 0), (1, -1)])
def test_nonsense_limits_are_refused(limit, timeout):
    with pytest.raises(ValueError):
        FlowTable(limit=limit, idle_timeout=timeout)
