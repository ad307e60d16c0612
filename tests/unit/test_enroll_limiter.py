"""The per-address brake on refused enrollments: a token bucket per address in a bounded LRU table."""

from __future__ import annotations

import pytest

from backhaul.config import EnrollLimits
from backhaul.control.ratelimit import AddressLimiter
from .fakes import Clock

pytestmark = pytest.mark.codec_independent


def test_burst_then_refill_with_retry_after():
    clock = Clock()
    limiter = AddressLimiter(EnrollLimits(burst=3, refill_per_second=0.5), clock)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 2  # one token back after 1 / 0.5 s
    assert limiter.retry_after("10.0.0.2") == 0  # another address has its own bucket
    clock.now += 1.0
    assert limiter.retry_after("10.0.0.1") == 1
    clock.now += 1.0
    assert limiter.retry_after("10.0.0.1") == 0
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 2
    clock.now += 3600  # refill stops at the burst
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") == 0
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") > 0


def test_successes_cost_nothing():
    limiter = AddressLimiter(EnrollLimits(burst=1), Clock())
    for _ in range(100):
        assert limiter.retry_after("nat") == 0  # only failed() spends


def test_table_is_bounded_least_recently_seen_first():
    clock = Clock()
    limiter = AddressLimiter(EnrollLimits(burst=1, max_addresses=3), clock)
    for addr in ("a", "b", "c"):
        limiter.failed(addr)
    assert limiter.retry_after("a") > 0  # "a" is now the most recently seen
    for n in range(1000):
        limiter.failed(f"spray-{n}")
        assert len(limiter) <= 3
    assert len(limiter) == 3
    assert limiter.retry_after("a") == 0  # pushed out: starts again with a full bucket


def test_refusals_are_logged_once_per_address_and_interval():
    clock = Clock()
    limiter = AddressLimiter(EnrollLimits(log_interval=60), clock)
    assert limiter.should_log("x") is True
    assert limiter.should_log("x") is False
    assert limiter.should_log("y") is True
    clock.now += 59
    assert limiter.should_log("x") is False
    clock.now += 1
    assert limiter.should_log("x") is True


def test_limits_must_be_positive():
    for bad in ({"burst": 0}, {"refill_per_second": 0}, {"max_addresses": 0}, {"log_interval": 0}):
        with pytest.raises(ValueError):
            EnrollLimits(**bad)
