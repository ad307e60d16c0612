"""The update lease, group update settings and reports of the SQLite store.

Both backends: SQLite on real files in tmp_path and a real PostgreSQL database; the clock
is the only thing injected. Connectors are "active" the
way the relay makes them so: a tunnel counted in the store (``tunnel_changed``).
"""

from __future__ import annotations

import calendar
import multiprocessing

import pytest

from backhaul.config import RolloutSettings
from backhaul.store import Connector, LeaseRefused, NotFound, open_store
from .fakes import Clock
from .conftest import TEST_NODE, count_tunnel

pytestmark = pytest.mark.codec_independent

TTL = RolloutSettings().lease_seconds
KEEP = RolloutSettings().reports_per_connector


def utc(*when: int) -> float:
    """Unix time of a UTC date and time (year, month, day, hour, minute)."""
    return float(calendar.timegm((*when, 0, 0, 0, 0)[:6]))


#: Saturday 5 December 2026, 03:00 UTC.
SATURDAY_3AM = utc(2026, 12, 5, 3, 0)


@pytest.fixture
def clock():
    return Clock(SATURDAY_3AM)


@pytest.fixture
def store(store_location, clock):
    s = open_store(store_location, clock=clock)
    yield s
    s.close()


def _enroll(store, cid: str, group: str = "default", *, active: bool = True, version: str = "1.0") -> str:
    store.create_token(f"hash-{cid}", group, 10**12, 1)
    store.enroll(
        f"hash-{cid}",
        Connector(
            id=cid, name=f"name-{cid}", hostname="h", version=version, group="", created=0, last_seen=0,
            source_addr="127.0.0.1", cert_serial=1, cert_expires=10**12,
        ),
    )
    if active:
        count_tunnel(store, cid, +1, worker=0, peer="127.0.0.1")
    return cid


@pytest.fixture
def pair(store):
    """Two active connectors of the default group."""
    return _enroll(store, "c-a"), _enroll(store, "c-b")


def _refused(fn, *args) -> LeaseRefused:
    with pytest.raises(LeaseRefused) as caught:
        fn(*args)
    return caught.value


def _report(store, cid, step, token, version="2.0", reason=""):
    return store.report_update(cid, version, step, reason, token, keep=KEEP, keep_failures=RolloutSettings().failures_per_connector)


# -- grant, busy, alone


def test_one_connector_of_a_group_gets_the_lease_the_other_is_refused_busy(store, pair, clock):
    a, b = pair
    lease = store.acquire_update_lease(a, "2.0", TTL)
    assert (lease.group, lease.connector_id, lease.version) == ("default", a, "2.0")
    assert lease.expires == clock.now + TTL and lease.token >= 1
    refusal = _refused(store.acquire_update_lease, b, "2.0", TTL)
    assert refusal.reason == "busy"
    assert a in str(refusal) and "2.0" in str(refusal)
    assert store.group_rollout("default").lease == lease


def test_groups_have_a_lease_each(store, pair):
    store.create_group("east")
    e1, _ = _enroll(store, "c-e1", "east"), _enroll(store, "c-e2", "east")
    store.acquire_update_lease(pair[0], "2.0", TTL)
    assert store.acquire_update_lease(e1, "2.0", TTL).group == "east"


def test_a_connector_alone_in_its_group_is_refused(store, pair):
    a, b = pair
    count_tunnel(store, b, -1, worker=0, peer="127.0.0.1")  # b has no tunnel: inactive
    refusal = _refused(store.acquire_update_lease, a, "2.0", TTL)
    assert refusal.reason == "alone"
    assert "--allow-downtime" in str(refusal)
    # Its own tunnels do not count, and neither do revoked connectors'.
    count_tunnel(store, b, +1, worker=0, peer="127.0.0.1")
    store.revoke_connector(b)
    assert _refused(store.acquire_update_lease, a, "2.0", TTL).reason == "alone"


def test_allow_downtime_lets_a_lone_connector_update(store):
    a = _enroll(store, "c-a")
    assert _refused(store.acquire_update_lease, a, "2.0", TTL).reason == "alone"
    settings = store.set_group_updates("default", {"allow_downtime": True})
    assert settings.allow_downtime is True
    assert store.acquire_update_lease(a, "2.0", TTL).connector_id == a
    store.set_group_updates("default", {"allow_downtime": False})
    assert store.group_rollout("default").allow_downtime is False


# -- maintenance windows


def test_inside_its_window_a_lone_connector_may_update_outside_it_not(store, clock):
    a = _enroll(store, "c-a")
    assert store.set_group_updates("default", {"window": "Sun,Sat 02:00-04:00"}).window == "Sat,Sun 02:00-04:00"
    clock.now = utc(2026, 12, 5, 5, 0)  # Saturday 05:00: closed
    refusal = _refused(store.acquire_update_lease, a, "2.0", TTL)
    assert refusal.reason == "outside_window"
    assert "2026-12-06 02:00 UTC" in str(refusal)  # when it opens next: Sunday 02:00
    clock.now = utc(2026, 12, 5, 3, 59)
    assert store.acquire_update_lease(a, "2.0", TTL).connector_id == a


def test_a_window_crossing_midnight(store, clock):
    a = _enroll(store, "c-a")
    store.set_group_updates("default", {"window": "Fri 22:00-02:00"})
    for day, hour, minute, inside in [
        (4, 21, 59, False),  # Friday, before it opens
        (4, 22, 0, True),  # Friday, it opens
        (5, 1, 59, True),  # Saturday, after midnight: still Friday's window
        (5, 2, 0, False),  # Saturday, closed again
        (3, 23, 0, False),  # Thursday night: not a window day
    ]:
        clock.now = utc(2026, 12, day, hour, minute)
        if inside:
            lease = store.acquire_update_lease(a, "2.0", TTL)
            _report(store, a, "healthy", lease.token)
        else:
            assert _refused(store.acquire_update_lease, a, "2.0", TTL).reason == "outside_window", (day, hour, minute)


def test_a_window_never_stops_an_update_that_leaves_another_connector_up(store, pair, clock):
    store.set_group_updates("default", {"window": "Sat 02:00-04:00"})
    clock.now = utc(2026, 12, 2, 12, 0)  # Wednesday noon
    assert store.acquire_update_lease(pair[0], "2.0", TTL).connector_id == pair[0]


def test_no_window_clears_it(store):
    store.set_group_updates("default", {"window": "daily 03:00-04:00"})
    assert store.group_rollout("default").window == "daily 03:00-04:00"
    assert store.set_group_updates("default", {"window": None}).window is None


def test_settings_follow_a_renamed_group_and_go_with_a_deleted_one(store):
    store.create_group("east")
    store.set_group_updates("east", {"allow_downtime": True, "window": "Mon 01:00-02:00"})
    store.rename_group("east", "west")
    west = store.group_rollout("west")
    assert (west.allow_downtime, west.window) == (True, "Mon 01:00-02:00")
    store.delete_group("west")
    store.create_group("west")
    assert store.group_rollout("west").window is None
    with pytest.raises(NotFound):
        store.set_group_updates("nowhere", {"allow_downtime": True})


# -- expiry, renewal, fencing


def test_an_expired_lease_frees_the_group(store, pair, clock):
    a, b = pair
    first = store.acquire_update_lease(a, "2.0", TTL)  # a dies without a word
    clock.now += TTL - 1
    assert _refused(store.acquire_update_lease, b, "2.0", TTL).reason == "busy"
    clock.now += 1
    store.node_heartbeat(TEST_NODE)  # the relay node holding the tunnels is alive all along
    assert store.group_rollout("default").lease is None
    second = store.acquire_update_lease(b, "2.0", TTL)
    assert second.token > first.token
    assert _refused(store.renew_update_lease, a, first.token, TTL).reason == "stale"


def test_renewal_extends_the_lease(store, pair, clock):
    a, b = pair
    lease = store.acquire_update_lease(a, "2.0", TTL)
    clock.now += TTL * 2 / 3
    renewed = store.renew_update_lease(a, lease.token, TTL)
    assert renewed.expires == clock.now + TTL and renewed.token == lease.token
    clock.now += TTL * 2 / 3  # past the first expiry, within the renewed one
    assert _refused(store.acquire_update_lease, b, "2.0", TTL).reason == "busy"


def test_a_stale_holder_is_refused_on_renewal(store, pair):
    a, b = pair
    first = store.acquire_update_lease(a, "2.0", TTL)
    again = store.acquire_update_lease(a, "2.0", TTL)  # the updater restarted and asked again
    assert again.token > first.token
    assert _refused(store.renew_update_lease, a, first.token, TTL).reason == "stale"
    assert store.renew_update_lease(a, again.token, TTL).token == again.token
    # Another connector cannot renew with the holder's token.
    assert _refused(store.renew_update_lease, b, again.token, TTL).reason == "stale"


def test_a_holder_moved_to_another_group_loses_its_lease(store, pair):
    a, b = pair
    lease = store.acquire_update_lease(a, "2.0", TTL)
    store.create_group("east")
    store.assign_connector(a, "east")
    assert _refused(store.renew_update_lease, a, lease.token, TTL).reason == "stale"
    _enroll(store, "c-c")  # b is no longer alone in default
    assert store.acquire_update_lease(b, "2.0", TTL).connector_id == b


def test_a_revoked_holder_frees_the_group(store, pair):
    a, b = pair
    store.acquire_update_lease(a, "2.0", TTL)
    _enroll(store, "c-c")
    store.revoke_connector(a)
    assert store.acquire_update_lease(b, "2.0", TTL).connector_id == b


def test_the_fencing_token_grows_across_a_store_reopen(store_location, clock):
    store = open_store(store_location, clock=clock)
    a, _ = _enroll(store, "c-a"), _enroll(store, "c-b")
    tokens = []
    for _ in range(3):
        lease = store.acquire_update_lease(a, "2.0", TTL)
        tokens.append(lease.token)
        assert _report(store, a, "healthy", lease.token).released
    store.close()
    store = open_store(store_location, clock=clock)  # a relay restart
    try:
        tokens.append(store.acquire_update_lease(a, "2.0", TTL).token)
    finally:
        store.close()
    assert tokens == sorted(set(tokens)), tokens


def test_a_report_with_an_old_token_does_not_release_the_new_lease(store, pair, clock):
    a, b = pair
    old = store.acquire_update_lease(a, "2.0", TTL)
    clock.now += TTL  # a's lease expires; b takes the group's lease
    store.node_heartbeat(TEST_NODE)
    new = store.acquire_update_lease(b, "2.0", TTL)
    outcome = _report(store, a, "healthy", old.token)
    assert not outcome.released
    assert store.group_rollout("default").lease == new
    # Nor does a report without a token, nor one with the right token from the wrong connector.
    assert not _report(store, a, "healthy", None).released
    assert not _report(store, a, "healthy", new.token).released
    assert store.group_rollout("default").lease == new
    assert _report(store, b, "healthy", new.token).released
    assert store.group_rollout("default").lease is None


def test_progress_reports_keep_the_lease(store, pair):
    a, _ = pair
    lease = store.acquire_update_lease(a, "2.0", TTL)
    for step in ("downloaded", "installed", "switched"):
        assert not _report(store, a, step, lease.token).released
    assert store.group_rollout("default").lease == lease
    assert _report(store, a, "refused", lease.token, reason="bad_hash").released


# -- halt, pause, resume


def test_a_rolled_back_update_halts_the_group_until_resumed(store, pair):
    a, b = pair
    lease = store.acquire_update_lease(a, "2.0", TTL)
    outcome = _report(store, a, "rolled_back", lease.token, reason="not ready within 60 s")
    assert outcome.released and outcome.halted and outcome.group == "default"
    state = store.group_rollout("default")
    assert (state.halted, state.halted_connector, state.halted_version) == ("not ready within 60 s", a, "2.0")
    assert [(f.connector_id, f.connector, f.version, f.step) for f in state.failures] == [(a, "name-c-a", "2.0", "rolled_back")]
    refusal = _refused(store.acquire_update_lease, b, "2.0", TTL)
    assert refusal.reason == "halted" and "not ready within 60 s" in str(refusal)
    # A second failure does not overwrite the first one's reason.
    assert not _report(store, b, "failed", None, reason="other").halted
    assert store.group_rollout("default").halted == "not ready within 60 s"
    assert store.group_rollout("default").failures_total == 2
    assert store.resume_rollout("default") == ["default"]
    assert store.group_rollout("default").halted is None
    assert store.acquire_update_lease(b, "2.0", TTL).connector_id == b


def test_a_halt_stays_in_its_group(store, pair):
    store.create_group("east")
    e1, _ = _enroll(store, "c-e1", "east"), _enroll(store, "c-e2", "east")
    _report(store, pair[0], "failed", None, reason="self-test failed")
    assert store.group_rollout("default").halted == "self-test failed"
    assert store.group_rollout("east").halted is None
    assert store.acquire_update_lease(e1, "2.0", TTL).group == "east"


def test_pause_and_resume(store, pair):
    a, _ = pair
    store.create_group("east")
    assert store.pause_rollout("default") == ["default"]
    assert store.pause_rollout("default") == []
    refusal = _refused(store.acquire_update_lease, a, "2.0", TTL)
    assert refusal.reason == "paused" and "rollout resume --group default" in str(refusal)
    assert [(r.group, r.paused) for r in store.list_rollouts()] == [("default", True), ("east", False)]
    assert store.resume_rollout("default") == ["default"]
    assert store.resume_rollout("default") == []
    assert store.acquire_update_lease(a, "2.0", TTL).connector_id == a
    assert store.pause_rollout(None) == ["default", "east"]
    assert all(r.paused for r in store.list_rollouts())
    assert store.resume_rollout(None) == ["default", "east"]
    with pytest.raises(NotFound):
        store.pause_rollout("nowhere")


def test_pausing_keeps_a_lease_already_granted(store, pair):
    a, _ = pair
    lease = store.acquire_update_lease(a, "2.0", TTL)
    store.pause_rollout("default")
    # The update under way finishes; only new ones wait.
    assert store.renew_update_lease(a, lease.token, TTL).token == lease.token
    assert _report(store, a, "healthy", lease.token).released


# -- history, versions


def test_the_report_history_is_bounded_per_connector(store, pair):
    a, b = pair
    for n in range(KEEP + 5):
        _report(store, a, "downloaded", None, version=f"2.{n}")
    _report(store, b, "downloaded", None)
    kept = store.update_reports(a)
    assert len(kept) == KEEP
    assert [r.version for r in kept] == [f"2.{n}" for n in range(5, KEEP + 5)]  # the oldest went first
    assert len(store.update_reports(b)) == 1


def test_the_failures_kept_are_bounded_per_connector(store, pair, clock):
    a, _ = pair
    for n in range(5):
        clock.now += 1
        store.report_update(a, f"2.{n}", "failed", "boom", None, keep=KEEP, keep_failures=3)
    state = store.group_rollout("default")
    assert sorted(f.version for f in state.failures) == ["2.2", "2.3", "2.4"]
    assert store.group_rollout("default", listed_failures=1).failures[0].version == "2.4"
    assert store.group_rollout("default", listed_failures=1).failures_total == 3


def test_versions_are_counted_per_group(store, pair):
    _enroll(store, "c-c", version="0.9")
    assert store.group_rollout("default").versions == {"0.9": 1, "1.0": 2}
    assert store.set_connector_version(pair[0], "2.0") is True
    assert store.set_connector_version(pair[0], "2.0") is False  # unchanged: nothing written
    assert store.get_connector(pair[0]).version == "2.0"
    assert store.group_rollout("default").versions == {"0.9": 1, "1.0": 1, "2.0": 1}


def test_unknown_connectors_are_refused(store):
    for call in (
        lambda: store.acquire_update_lease("c-nope", "2.0", TTL),
        lambda: store.renew_update_lease("c-nope", 1, TTL),
        lambda: _report(store, "c-nope", "healthy", 1),
    ):
        with pytest.raises(NotFound):
            call()


# -- several relay worker processes at once


def _race(path: str, connector_id: str, barrier, results) -> None:
    store = open_store(path)
    try:
        barrier.wait(30)
        try:
            lease = store.acquire_update_lease(connector_id, "2.0", TTL)
            results.put((connector_id, "granted", lease.token))
        except LeaseRefused as exc:
            results.put((connector_id, exc.reason, None))
    finally:
        store.close()


def test_processes_racing_for_the_lease_grant_it_once(store_location):
    store = open_store(store_location)
    ids = [_enroll(store, f"c-{n}") for n in range(4)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(ids)), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(store_location), cid, barrier, results)) for cid in ids]
    try:
        for p in procs:
            p.start()
        answers = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    granted = [a for a in answers if a[1] == "granted"]
    assert len(granted) == 1, answers
    assert sorted(a[1] for a in answers) == ["busy", "busy", "busy", "granted"]
    assert store.group_rollout("default").lease.connector_id == granted[0][0]
    store.close()
