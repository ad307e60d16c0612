"""The HTTP edge's body clock, sans-I/O: which rule a body breaks, and when, on a fake clock."""

import pytest

from backhaul.config import HttpLimits
from backhaul.relay.body_clock import BodyClock

pytestmark = pytest.mark.codec_independent

LIMITS = HttpLimits(body_timeout=4.0, body_min_rate=100, body_rate_grace=10.0)


def test_a_stall_breaks_body_timeout_and_looks_come_every_quarter_of_it():
    clock = BodyClock(LIMITS)
    clock.run(0.0, "ex", 0)
    assert clock.look(0.0, 0) == (None, 1.0)  # a quarter of body_timeout
    assert clock.look(3.0, 0) == (None, 1.0)
    assert clock.look(4.0, 0) == ("body_timeout", 4.0) and not clock.running


def test_progress_resets_the_idle_deadline_but_not_the_rate_rule():
    clock = BodyClock(LIMITS)
    clock.run(0.0, "ex", 0)
    for t in range(1, 30):  # 50 bytes a second: never idle; the body may take 10 s + bytes / 100
        rule, _ = clock.look(float(t), 50 * t)
        if rule is not None:
            break
    assert rule == "body_min_rate" and t == 20 and clock.received(50 * t) == 1000


def test_paused_time_is_not_the_clients_and_a_new_body_starts_afresh():
    clock = BodyClock(LIMITS)
    clock.run(0.0, "first", 0)
    clock.pause(3.0)  # the tunnel pushed back for 100 s
    clock.run(103.0, "first", 0)
    assert clock.look(103.5, 0)[0] is None  # 3.5 active seconds
    assert clock.look(104.0, 0) == ("body_timeout", 4.0)
    clock.run(200.0, "second", 700)
    assert clock.look(203.0, 700) == (None, 1.0) and clock.received(800) == 100
