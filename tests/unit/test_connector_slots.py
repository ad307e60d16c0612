"""The tunnel slots' decisions (connector.slots), from the records of a worker's tunnels:
which slots to retire when fewer tunnels are wanted, and when to dial one more so that
every relay worker holds a tunnel. No sockets: the decisions are plain functions."""

from __future__ import annotations

import random

import pytest

from backhaul.config import Backoff
from backhaul.connector.slots import TunnelRecord, backoff_delay, needs_another, to_retire


def record(slot: int, relay_worker=None, hello: bool = True, retiring: bool = False) -> TunnelRecord:
    r = TunnelRecord(slot, closed=None)  # the decisions never read the future
    r.hello, r.relay_worker, r.retiring = hello, relay_worker, retiring
    return r


def test_a_new_record_is_neither_up_nor_retiring():
    r = TunnelRecord(3, closed=None)
    assert (r.slot, r.hello, r.relay_worker, r.retiring, r.serving) == (3, False, None, False, False)
    with pytest.raises(AttributeError):
        r.connector_id = "c-1"  # a typed record: no stray keys


def test_retires_the_newest_slots_first():
    records = {i: record(i, relay_worker=0) for i in range(4)}
    assert to_retire(range(4), 2, records) == [3, 2]


def test_never_retires_the_last_tunnel_of_a_relay_worker():
    # slots 0, 1 on relay worker 0; slot 2 alone on relay worker 1; slot 3 on relay worker 0
    records = {0: record(0, 0), 1: record(1, 0), 2: record(2, 1), 3: record(3, 0)}
    assert to_retire(range(4), 1, records) == [3, 1]  # 2 keeps worker 1, 0 keeps worker 0
    assert to_retire(range(4), 3, records) == [3]


def test_slots_still_connecting_or_unanswered_go_freely():
    # slot 3 has no tunnel yet, slot 2's tunnel has had no hello; they cover nothing
    records = {0: record(0, 0), 1: record(1, 1), 2: record(2, hello=False)}
    assert to_retire(range(4), 2, records) == [3, 2]


def test_a_retiring_tunnel_does_not_count_as_covering_its_relay_worker():
    # slot 1 on worker 0 is retiring already: slot 0 is worker 0's last serving tunnel
    records = {0: record(0, 0), 1: record(1, 0, retiring=True), 2: record(2, 1), 3: record(3, 1)}
    assert to_retire([0, 2, 3], 1, records) == [3]


def test_nothing_to_retire_when_not_above_the_count():
    records = {0: record(0, 0), 1: record(1, 1)}
    assert to_retire([0, 1], 2, records) == []
    assert to_retire([0, 1], 5, records) == []


def test_dials_another_while_a_relay_worker_holds_none():
    records = [record(0, 0), record(1, 0)]
    assert needs_another(records, live_slots=2, relay_workers=2)
    assert not needs_another(records, live_slots=2, relay_workers=1)
    assert not needs_another(records + [record(2, 1)], live_slots=3, relay_workers=2)


def test_waits_while_a_slot_is_still_connecting():
    # the connecting slot's tunnel may yet land on the uncovered relay worker
    records = [record(0, 0), record(1, hello=False)]
    assert not needs_another(records, live_slots=2, relay_workers=2)
    assert not needs_another([record(0, 0)], live_slots=2, relay_workers=2)


def test_retiring_tunnels_cover_nothing():
    records = [record(0, 0), record(1, 1, retiring=True)]
    assert needs_another(records, live_slots=1, relay_workers=2)


def test_backoff_is_full_jitter_under_an_exponential_cap():
    b = Backoff(initial=0.5, maximum=4.0, factor=2.0)
    random.seed(12)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0)]:
        delays = [backoff_delay(b, attempt) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays) and max(delays) > cap / 2
