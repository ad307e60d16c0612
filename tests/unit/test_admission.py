"""Admission: the worker's descriptor budget and its rate-limited refusal log; ListenLimits."""

from __future__ import annotations

import asyncio
import logging
import resource

import pytest

from backhaul.config import ListenLimits
from backhaul.relay.admission import Admission, open_descriptors

pytestmark = pytest.mark.codec_independent


def test_admit_counts_up_to_the_budget_and_release_frees_a_place():
    async def run():
        admission = Admission(ListenLimits(), budget=3)
        assert [admission.admit("listen") for _ in range(4)] == [True, True, True, False]
        assert admission.open == 3
        admission.release()
        assert admission.admit("tcp_app") is True
        assert admission.admit("tcp_app") is False
        assert admission.metrics.events == {"listen_refused": 1, "tcp_app_refused": 1}
        admission.close()

    asyncio.run(run())


def test_refusals_are_logged_once_per_interval_with_their_count(caplog):
    async def run():
        admission = Admission(ListenLimits(refusal_log_interval=0.05), budget=0)
        with caplog.at_level(logging.WARNING, logger="backhaul.relay.admission"):
            for _ in range(1000):
                assert not admission.admit("listen")
            admission.refuse("too many connections from one address", "listen", "192.0.2.7")
            lines = [r for r in caplog.records if r.msg == "new connections refused"]
            # One line at the first refusal of each kind, not one per connection.
            assert [(r.reason, r.refused) for r in lines] == [
                ("descriptor reserve reached", 1),
                ("too many connections from one address", 1),
            ]
            assert lines[1].peer == "192.0.2.7"
            await asyncio.sleep(0.12)
            lines = [r for r in caplog.records if r.msg == "new connections refused"]
            # At the end of the interval: how many more were refused meanwhile.
            assert [(r.reason, r.refused) for r in lines[2:]] == [("descriptor reserve reached", 999)]
            await asyncio.sleep(0.12)
            assert len([r for r in caplog.records if r.msg == "new connections refused"]) == 3
            assert not admission._timers  # a quiet interval stops the timer
            admission.refuse("descriptor reserve reached", "http")
            admission.refuse("descriptor reserve reached", "http")
            admission.close()  # what a running timer held is logged, not lost
            lines = [r for r in caplog.records if r.msg == "new connections refused"]
            assert [(r.listener, r.refused) for r in lines[3:]] == [("http", 1), ("http", 1)]

    asyncio.run(run())


def test_the_budget_is_the_open_file_limit_less_the_reserve_and_what_is_open():
    limits = ListenLimits(fd_reserve=50)
    admission = Admission.for_process(limits)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    others = open_descriptors()
    assert others is not None and others > 3  # stdin, stdout, stderr at least
    assert soft - 50 - others - 2 <= admission.budget <= soft - 50 - others + 2
    # Connections counted in are not "others": a recount keeps the budget.
    budget = admission.budget
    admission.open = 10
    admission.recount()
    assert abs(admission.budget - (budget + 10)) <= 2


def test_listen_limits_replace_from_and_its_errors():
    limits = ListenLimits().replace_from(["idle_timeout=1.5", "max-per-address=7"])
    assert limits.idle_timeout == 1.5 and limits.max_per_address == 7
    assert ListenLimits().replace_from([]) == ListenLimits()
    with pytest.raises(ValueError, match="NAME one of"):
        ListenLimits().replace_from(["nonsense=1"])
    with pytest.raises(ValueError, match="not a number"):
        ListenLimits().replace_from(["max_handshakes=many"])
    with pytest.raises(ValueError, match="must be positive"):
        ListenLimits().replace_from(["fd_reserve=0"])
