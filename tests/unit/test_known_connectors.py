"""KnownConnectors: the relay worker's bounded memory of connector records (relay/known.py)."""

from __future__ import annotations

from backhaul.relay.known import KnownConnectors
from backhaul.store.base import Connector


def _record(connector_id: str, group: str = "default") -> Connector:
    return Connector(connector_id, "name", "host", "1.0", group, 0.0, 0.0, "127.0.0.1", 1, 0.0)


def test_the_newest_records_are_kept_up_to_the_limit_and_used_ones_stay():
    known = KnownConnectors(limit=3)
    for i in range(3):
        known.remember(f"c-{i}", _record(f"c-{i}"))
    assert known.get("c-0").id == "c-0"  # used: now the most recent
    known.remember("c-3", _record("c-3"))
    assert len(known) == 3
    assert known.get("c-1") is None, "the least recently used record goes first"
    assert [known.get(c) is not None for c in ("c-0", "c-2", "c-3")] == [True, True, True]


def test_a_newer_answer_replaces_the_record_and_none_forgets_it():
    known = KnownConnectors(limit=10)
    known.remember("c-a", _record("c-a", group="one"))
    known.remember("c-a", _record("c-a", group="two"))
    assert known.get("c-a").group == "two" and len(known) == 1
    known.remember("c-a", None)  # deleted in the store
    assert known.get("c-a") is None and len(known) == 0
    known.remember("c-b", None)  # never known: nothing to forget, nothing added
    assert len(known) == 0


def test_a_flood_of_lookups_never_grows_it_past_the_limit():
    known = KnownConnectors(limit=100)
    for i in range(5000):
        known.remember(f"c-{i}", _record(f"c-{i}"))
    assert len(known) == 100
    assert known.get("c-4999") is not None and known.get("c-0") is None
