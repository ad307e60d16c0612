"""The health gate as a state machine, fed readings on a fake clock."""

from __future__ import annotations

import random

import pytest

from backhaul.config import UpdaterLimits
from backhaul.updater.health import HealthGate, Reading, Verdict
from backhaul.updater.runner import next_wait

pytestmark = pytest.mark.codec_independent

LIMITS = UpdaterLimits(ready_deadline=60, stable_period=12, status_interval=2, max_crashes=2, relay_outage_wait=600)
READY = Reading(answered=True, version="1.1", tunnels=2, config_applied=True)
UP_NO_TUNNEL = Reading(answered=True, version="1.1", tunnels=0, config_applied=False)
DOWN = Reading(answered=False)


def _drive(gate: HealthGate, readings, start: float = 1000.0, step: float = 2.0):
    """Feed readings every ``step`` s until a verdict other than WAIT; returns (decision, when)."""
    now = start
    for reading in readings:
        now += step
        decision = gate.feed(reading, now)
        if decision.verdict is not Verdict.WAIT:
            return decision, now - start
    return decision, now - start


def test_ready_in_time_and_stable_is_healthy():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    decision, when = _drive(gate, [DOWN] * 5 + [UP_NO_TUNNEL] * 3 + [READY] * 10)
    assert decision.verdict is Verdict.HEALTHY
    assert when == pytest.approx((5 + 3 + 6) * 2)  # 6 stable readings 2 s apart, after it became ready


def test_never_ready_fails_at_the_deadline_saying_why():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    decision, when = _drive(gate, [DOWN] * 100)
    assert decision.verdict is Verdict.FAILED and "never answered" in decision.reason
    assert 60 < when <= 62


def test_never_connecting_while_the_relay_answers_fails():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    reachable = Reading(answered=True, version="1.1", tunnels=0, relay_reachable=True)
    decision, when = _drive(gate, [reachable] * 100)
    assert decision.verdict is Verdict.FAILED and "never connected" in decision.reason and when <= 62


def test_the_old_version_answering_is_not_taken_for_the_new_one():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    old = Reading(answered=True, version="1.0", tunnels=2, config_applied=True)
    decision, _ = _drive(gate, [old] * 100)
    assert decision.verdict is Verdict.FAILED and "reports version 1.0" in decision.reason


def test_a_crash_loop_fails_at_once():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    crash = Reading(answered=False, exits=1)
    decision, when = _drive(gate, [crash] * 10)
    assert decision.verdict is Verdict.FAILED and "crash loop" in decision.reason and "3 times" in decision.reason
    assert when == 6  # the third exit, long before the deadline


def test_a_few_crashes_then_stable_is_healthy():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    decision, _ = _drive(gate, [Reading(answered=False, exits=1)] * 2 + [READY] * 6)
    assert decision.verdict is Verdict.HEALTHY


def test_ready_then_lost_resets_the_stable_count_and_fails_when_it_never_settles():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    lost = Reading(answered=True, version="1.1", tunnels=0, relay_reachable=True)
    flapping = ([READY] * 5 + [lost]) * 20
    decision, when = _drive(gate, flapping)
    assert decision.verdict is Verdict.FAILED and "not stable" in decision.reason
    assert when <= 60 + 12 + 2


def test_relay_unreachable_from_the_updater_too_waits_instead_of_rolling_back():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    outage = Reading(answered=True, version="1.1", tunnels=0, relay_reachable=False)
    # 300 s of relay outage: far past the 60 s deadline, still no verdict ...
    decision, when = _drive(gate, [outage] * 150)
    assert decision.verdict is Verdict.WAIT and when == 300
    # ... then the relay comes back and the new version connects: healthy.
    decision, _ = _drive(gate, [READY] * 6, start=1300.0)
    assert decision.verdict is Verdict.HEALTHY


def test_a_relay_outage_longer_than_the_wait_leaves_the_version_unjudged():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    outage = Reading(answered=True, version="1.1", tunnels=0, relay_reachable=False)
    decision, when = _drive(gate, [outage] * 400)
    assert decision.verdict is Verdict.UNJUDGED and 600 < when <= 604


def test_the_relay_is_checked_only_when_the_new_version_is_up_without_a_tunnel():
    gate = HealthGate("1.1", LIMITS, 0.0)
    assert gate.wants_relay_check(UP_NO_TUNNEL)
    assert not gate.wants_relay_check(READY) and not gate.wants_relay_check(DOWN)


def test_a_decision_is_final():
    gate = HealthGate("1.1", LIMITS, 1000.0)
    decision, when = _drive(gate, [Reading(answered=False, exits=3)])
    assert decision.verdict is Verdict.FAILED
    assert gate.feed(READY, 2000.0) == decision


def test_readings_from_the_control_socket_status():
    status = {"running": True, "figures": {"version": "1.1", "tunnels": 2, "config_version": 4}}
    assert Reading.from_status(status) == READY
    assert Reading.from_status({"figures": {"version": "1.1", "tunnels": 2, "config_version": None}}).config_applied is False
    assert Reading.from_status(None, exits=1) == Reading(answered=False, exits=1)


def test_checks_are_jittered_within_twenty_percent():
    limits = UpdaterLimits(check_interval=3600)
    waits = [next_wait(limits, random.Random(seed)) for seed in range(200)]
    assert all(2880 <= w <= 4320 for w in waits)
    assert max(waits) - min(waits) > 1000  # spread, not one minute for the whole fleet
