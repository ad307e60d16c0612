"""The "trim when the traffic went quiet" policy (backhaul/memory.py), on fake wall and CPU clocks."""

from __future__ import annotations

import asyncio
import logging

import pytest

from backhaul.config import MemoryTrim
from backhaul.memory import Allocator, QuietTrim

pytestmark = pytest.mark.codec_independent

SETTINGS = MemoryTrim()  # looks every 1 s; busy at 20% of a core, quiet below 5% for 2 s


class Clocks:
    """Wall and CPU seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.wall = 1000.0
        self.cpu = 50.0

    def run(self, seconds: float, share: float) -> None:
        """``seconds`` pass with the process using ``share`` of a core."""
        self.wall += seconds
        self.cpu += seconds * share


def policy(clocks: Clocks, settings: MemoryTrim = SETTINGS, allocator: Allocator | None = None) -> QuietTrim:
    return QuietTrim(
        settings, allocator if allocator is not None else Allocator.find(), clock=lambda: clocks.wall, cpu=lambda: clocks.cpu
    )


def looks(trim: QuietTrim, clocks: Clocks, shares: list[float]) -> list[bool]:
    """One look per second at each share of a core; what each look did."""
    done = []
    for share in shares:
        clocks.run(1.0, share)
        done.append(trim.check())
    return done


def test_the_c_library_of_this_machine_can_be_trimmed():
    allocator = Allocator.find()
    assert allocator.can_trim  # glibc: the machines backhaul runs on
    assert allocator.trim() in (True, False)


def test_an_idle_process_is_never_trimmed():
    clocks = Clocks()
    trim = policy(clocks)
    assert looks(trim, clocks, [0.01] * 30) == [False] * 30
    assert trim.trims == 0


def test_after_a_burst_it_trims_once_when_quiet_for_quiet_seconds(caplog):
    clocks = Clocks()
    trim = policy(clocks)
    with caplog.at_level(logging.INFO, "backhaul.memory"):
        # Three busy seconds, then quiet: the first quiet second is not enough, the second is.
        done = looks(trim, clocks, [1.0, 0.9, 0.5, 0.01, 0.01, 0.0, 0.0, 0.0])
    assert done == [False, False, False, False, True, False, False, False]
    assert trim.trims == 1
    [line] = [r for r in caplog.records if r.getMessage() == "memory given back after a burst"]
    assert line.rss_before > 0 and line.rss_after > 0 and line.quiet_seconds == 2.0


def test_moderate_traffic_is_neither_a_burst_nor_quiet():
    clocks = Clocks()
    trim = policy(clocks)
    # Traffic at 10% of a core after a burst: no trim while it lasts, one once it stops.
    assert looks(trim, clocks, [1.0] + [0.1] * 10) == [False] * 11
    assert looks(trim, clocks, [0.0, 0.0]) == [False, True]
    # 10% alone never starts a burst.
    assert looks(trim, clocks, [0.1, 0.0, 0.0, 0.0] * 3) == [False] * 12
    assert trim.trims == 1


def test_a_new_burst_during_the_quiet_restarts_the_wait():
    clocks = Clocks()
    trim = policy(clocks)
    assert looks(trim, clocks, [1.0, 0.0, 1.0, 0.0]) == [False] * 4
    assert looks(trim, clocks, [0.0]) == [True]
    # Each burst gets its own trim.
    assert looks(trim, clocks, [0.5, 0.0, 0.0]) == [False, False, True]
    assert trim.trims == 2


def test_the_quiet_wait_follows_the_settings():
    clocks = Clocks()
    trim = policy(clocks, MemoryTrim(quiet_seconds=5.0, busy_cpu=0.5, quiet_cpu=0.2))
    # 30% of a core is no burst here, 15% is quiet.
    assert looks(trim, clocks, [0.3, 0.0, 0.0, 0.0, 0.0, 0.0]) == [False] * 6
    assert looks(trim, clocks, [0.6, 0.15, 0.15, 0.15, 0.15, 0.15]) == [False] * 5 + [True]


def test_a_look_with_no_time_passed_changes_nothing():
    clocks = Clocks()
    trim = policy(clocks)
    looks(trim, clocks, [1.0, 0.0])
    clocks.cpu += 5.0  # CPU time without wall time (a clock that did not move): not a share
    assert trim.check() is False
    # The quiet second before it counts, the CPU burst of no duration does not.
    assert looks(trim, clocks, [0.0, 0.0]) == [True, False]


def test_switched_off_or_without_malloc_trim_it_never_trims(caplog):
    clocks = Clocks()
    off = policy(clocks, MemoryTrim(enabled=0))
    assert not off.active
    assert looks(off, clocks, [1.0, 0.0, 0.0, 0.0]) == [False] * 4
    bare = policy(clocks, allocator=Allocator(None))
    assert not bare.active and not bare.allocator.trim()
    assert looks(bare, clocks, [1.0, 0.0, 0.0, 0.0]) == [False] * 4
    assert off.trims == bare.trims == 0


@pytest.mark.parametrize(
    "values",
    [{"check_interval": 0}, {"quiet_seconds": -1.0}, {"busy_cpu": 0.1, "quiet_cpu": 0.2}, {"enabled": 2}],
)
def test_settings_out_of_range_are_refused(values):
    with pytest.raises(ValueError):
        MemoryTrim(**values)


def test_started_on_a_loop_it_looks_every_check_interval_until_stopped():
    clocks = Clocks()
    trim = policy(clocks, MemoryTrim(check_interval=0.01))
    seen = []
    real_check = trim.check

    def check() -> bool:
        # The fake clocks move one second per look: a burst, then quiet.
        clocks.run(1.0, 1.0 if not seen else 0.0)
        seen.append(real_check())
        return seen[-1]

    trim.check = check

    async def main() -> None:
        trim.start()
        for _ in range(500):
            if trim.trims:
                break
            await asyncio.sleep(0.01)
        trim.stop()
        looked = len(seen)
        await asyncio.sleep(0.05)
        assert len(seen) == looked, "looks went on after stop()"

    asyncio.run(main())
    assert trim.trims == 1 and seen[:3] == [False, False, True]
