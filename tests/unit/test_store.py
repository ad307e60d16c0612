"""The store, on both backends: SQLite on real files in tmp_path and a real PostgreSQL
database (tests/postgres.py); time is the only thing injected."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from backhaul.store import (
    App,
    Conflict,
    Connector,
    ConnectorStats,
    InvalidToken,
    LimitReached,
    NotFound,
    StoreLimits,
    Unavailable,
    open_store,
)
from backhaul.errors import ConfigError
from .conftest import TEST_NODE, count_tunnel, is_postgres, raw_execute, writer_lock_held
from .fakes import Clock

pytestmark = pytest.mark.codec_independent

DAY = 86400.0


@pytest.fixture
def clock():
    return Clock(1_000_000.0)


@pytest.fixture
def store(store_location, clock):
    s = open_store(store_location, clock=clock)
    yield s
    s.close()


def _connector(cid: str, serial: int = 1, expires: float = 2_000_000.0) -> Connector:
    return Connector(
        id=cid, name=cid, hostname="h", version="1", group="", created=0, last_seen=0, source_addr="127.0.0.1",
        cert_serial=serial, cert_expires=expires,
    )


def _enroll(store, cid: str, group: str = "default", serial: int = 1) -> Connector:
    store.create_token(f"hash-{cid}", group, 10**12, 1)
    return store.enroll(f"hash-{cid}", _connector(cid, serial))


def test_fresh_store_has_default_group_and_version(store):
    assert [g.name for g in store.list_groups()] == ["default"]
    assert store.config_version() >= 1
    assert store.admin_token_hash() is None


def test_reopen_keeps_data_and_does_not_rerun_migrations(store_location):
    s = open_store(store_location)
    s.create_group("g1")
    s.set_admin_token_hash("abc")
    s.close()
    s = open_store(store_location if is_postgres(store_location) else store_location / "store.sqlite")
    assert [g.name for g in s.list_groups()] == ["default", "g1"]
    assert s.admin_token_hash() == "abc"
    s.close()


def test_newer_schema_is_refused(store_location):
    open_store(store_location).close()
    raw_execute(store_location, "INSERT INTO schema_migrations VALUES (999, 0)")
    with pytest.raises(ConfigError, match="newer backhaul"):
        open_store(store_location)


def test_every_routing_change_bumps_the_version(store):
    seen = [store.config_version()]

    def bumped():
        v = store.config_version()
        assert v > seen[-1]
        seen.append(v)

    store.create_group("g1"); bumped()
    store.create_app(App("db", "g1", "tcp", 5000, "10.0.0.1:5432")); bumped()
    store.update_app("db", App("db", "g1", "tcp", 5001, "10.0.0.1:5432")); bumped()
    c = _enroll(store, "c-aaaaaaaaaaaa"); bumped()
    store.assign_connector(c.id, "g1"); bumped()
    store.rename_group("g1", "g2"); bumped()
    store.revoke_connector(c.id); bumped()
    store.delete_app("db"); bumped()
    store.delete_group("g2"); bumped()
    before = store.config_version()
    other = _enroll(store, "c-bbbbbbbbbbbb")
    before = store.config_version()
    store.list_apps()
    store.heartbeat(other.id, ConnectorStats(cpu=1.0), "p")
    count_tunnel(store, other.id, +1, worker=0, peer="p")
    assert store.config_version() == before  # reads, heartbeats and tunnels are not config


def test_token_uses_and_expiry(store, clock):
    store.create_token("t", "default", clock.now + 60, 2)
    assert store.check_token("t") == "default"
    _ = store.enroll("t", _connector("c-aaaaaaaaaaaa"))
    store.enroll("t", _connector("c-bbbbbbbbbbbb"))
    with pytest.raises(InvalidToken):
        store.enroll("t", _connector("c-cccccccccccc"))
    assert store.get_connector("c-cccccccccccc") is None
    store.create_token("u", "default", clock.now + 60, 5)
    clock.now += 61
    with pytest.raises(InvalidToken):
        store.check_token("u")
    with pytest.raises(InvalidToken):
        store.enroll("u", _connector("c-dddddddddddd"))
    with pytest.raises(InvalidToken):
        store.check_token("never-issued")


def test_a_clash_the_checks_do_not_cover_is_a_conflict_and_uses_nothing(store):
    _enroll(store, "c-aaaaaaaaaaaa")
    store.create_token("hash-again", "default", 10**12, 1)
    with pytest.raises(Conflict, match="clashes with a stored record"):
        store.enroll("hash-again", _connector("c-aaaaaaaaaaaa"))  # the same connector id again
    assert store.check_token("hash-again") == "default"  # rolled back: the use is not spent
    assert [c.id for c in store.list_connectors()] == ["c-aaaaaaaaaaaa"]


def test_token_for_unknown_group_is_refused(store):
    with pytest.raises(NotFound, match="nope"):
        store.create_token("t", "nope", 10**12, 1)


def test_enroll_puts_connector_in_the_tokens_group(store):
    store.create_group("branch")
    c = _enroll(store, "c-aaaaaaaaaaaa", group="branch")
    assert c.group == "branch"
    assert store.get_connector(c.id).group == "branch"


def test_tunnels_add_up_over_workers_and_worker_down_clears(store, clock):
    cid = _enroll(store, "c-aaaaaaaaaaaa").id
    assert store.get_connector(cid).status == "inactive"
    clock.now += 5
    count_tunnel(store, cid, +1, worker=0, peer="127.0.0.1:1")
    count_tunnel(store, cid, +1, worker=0, peer="127.0.0.1:2")
    count_tunnel(store, cid, +1, worker=1, peer="127.0.0.1:3")
    c = store.get_connector(cid)
    assert (c.tunnels, c.status, c.last_seen, c.source_addr) == (3, "active", clock.now, "127.0.0.1:3")
    store.mark_worker_down(TEST_NODE, 0)
    assert store.get_connector(cid).tunnels == 1
    count_tunnel(store, cid, -1, worker=1, peer="127.0.0.1:3")
    count_tunnel(store, cid, -1, worker=1, peer="127.0.0.1:3")  # never below zero
    assert store.get_connector(cid).tunnels == 0
    assert store.get_connector(cid).status == "inactive"
    count_tunnel(store, "c-unknownxxxxx", +1, worker=0, peer="x")  # a deleted connector is ignored
    assert store.get_connector("c-unknownxxxxx") is None


def test_connector_config_lists_its_groups_apps_and_etag_tracks_them(store):
    store.create_group("g1")
    cid = _enroll(store, "c-aaaaaaaaaaaa", group="g1").id
    store.create_app(App("db", "g1", "tcp", 5000, "10.0.0.1:5432"))
    store.create_app(App("other", "default", "tcp", 5001, "10.0.0.2:22"))
    store.create_app(App("web", "g1", "http", None, "intranet:80", "web.example.com", "http://intranet/", "passthrough"))
    cfg = store.connector_config(cid, 60)
    assert cfg["connector_id"] == cid and cfg["group"] == "g1" and cfg["refresh_interval"] == 60
    assert cfg["apps"] == [
        {"name": "db", "proto": "tcp", "target": "10.0.0.1:5432", "internal_url": None, "health_path": None},
        {
            "name": "web", "proto": "http", "target": "intranet:80", "internal_url": "http://intranet/",
            "health_path": None, "backend_ca": None, "backend_insecure": False,
        },
    ]
    assert cfg["version"] == store.config_version()
    store.create_app(App("more", "default", "tcp", 5002, "10.0.0.3:22"))
    assert store.connector_config(cid, 60)["etag"] == cfg["etag"]  # another group's change
    store.delete_app("db")
    assert store.connector_config(cid, 60)["etag"] != cfg["etag"]
    with pytest.raises(NotFound):
        store.connector_config("c-unknownxxxxx")


def test_app_conflicts_are_refused_with_the_culprit(store):
    store.create_app(App("db", "default", "tcp", 5000, "10.0.0.1:5432"))
    store.create_app(App("dns", "default", "udp", 5000, "10.0.0.1:53"))  # same number, other protocol
    with pytest.raises(Conflict, match="already used by app 'db'"):
        store.create_app(App("db2", "default", "tcp", 5000, "10.0.0.1:5432"))
    with pytest.raises(Conflict, match="already exists"):
        store.create_app(App("db", "default", "tcp", 5001, "10.0.0.1:5432"))
    store.create_app(App("web", "default", "http", None, "a:80", "web.example.com", "http://a/", "passthrough"))
    with pytest.raises(Conflict, match="web.example.com"):
        store.create_app(App("web2", "default", "http", None, "a:80", "web.example.com", "http://a/", "passthrough"))
    with pytest.raises(NotFound, match="nope"):
        store.create_app(App("x", "nope", "tcp", 6000, "10.0.0.1:1"))
    store.update_app("db", App("db", "default", "tcp", 5000, "10.0.0.9:5432"))  # keeping its own port is fine
    assert store.get_app("db").target == "10.0.0.9:5432"
    assert [a.name for a in store.list_apps()] == ["db", "dns", "web"]


def test_group_delete_refused_while_in_use_names_the_members(store):
    store.create_group("g1")
    store.create_app(App("db", "g1", "tcp", 5000, "10.0.0.1:5432"))
    cid = _enroll(store, "c-aaaaaaaaaaaa", group="g1").id
    with pytest.raises(Conflict) as info:
        store.delete_group("g1")
    assert "db" in str(info.value) and cid in str(info.value)
    store.delete_app("db")
    store.assign_connector(cid, "default")
    store.delete_group("g1")
    assert store.get_group("g1") is None
    with pytest.raises(Conflict):
        store.delete_group("default")
    with pytest.raises(NotFound):
        store.delete_group("g1")


def test_rename_moves_everything(store):
    store.create_group("old")
    store.create_app(App("db", "old", "tcp", 5000, "10.0.0.1:5432"))
    cid = _enroll(store, "c-aaaaaaaaaaaa", group="old").id
    store.create_token("t", "old", 10**12, 1)
    g = store.rename_group("old", "new")
    assert (g.name, g.apps, g.connectors) == ("new", 1, 1)
    assert store.get_app("db").group == "new"
    assert store.get_connector(cid).group == "new"
    assert store.check_token("t") == "new"
    with pytest.raises(Conflict):
        store.rename_group("new", "default")
    store.create_group("other")
    with pytest.raises(Conflict):
        store.rename_group("new", "other")


def test_revocation_and_renewal_serials(store, clock):
    cid = _enroll(store, "c-aaaaaaaaaaaa", serial=11).id
    c = store.get_connector(cid)
    assert c.accepts_serial(11, clock.now) and not c.accepts_serial(12, clock.now) and not c.accepts_serial(None, clock.now)
    store.renew_connector_cert(cid, 12, clock.now + 90 * DAY)
    c = store.get_connector(cid)
    assert c.cert_serial == 12 and c.accepts_serial(12, clock.now)
    assert c.accepts_serial(11, clock.now)  # until the old certificate expires
    assert not c.accepts_serial(11, 2_000_000.0 + 1)
    store.revoke_connector(cid)
    c = store.get_connector(cid)
    assert c.revoked and not c.accepts_serial(12, clock.now)
    assert cid not in [x.id for x in store.list_connectors()]
    with pytest.raises(NotFound):
        store.revoke_connector(cid)


def test_big_serials_survive(store):
    serial = (1 << 159) - 3
    cid = _enroll(store, "c-aaaaaaaaaaaa", serial=serial).id
    assert store.get_connector(cid).cert_serial == serial


def test_heartbeat_records_stats(store, clock):
    cid = _enroll(store, "c-aaaaaaaaaaaa").id
    clock.now += 30
    store.heartbeat(cid, ConnectorStats(version="2.0", cpu=81.5, memory=1e9, streams=7, bytes_in=10, bytes_out=20), "127.0.0.1")
    c = store.get_connector(cid)
    assert (c.version, c.cpu, c.active_streams, c.bytes_in, c.bytes_out, c.last_seen) == ("2.0", 81.5, 7, 10, 20, clock.now)


def test_prune_removes_unseen_inactive_connectors_after_ten_days(store, clock):
    idle = _enroll(store, "c-aaaaaaaaaaaa").id
    busy = _enroll(store, "c-bbbbbbbbbbbb").id
    fresh = _enroll(store, "c-cccccccccccc").id
    count_tunnel(store, busy, +1, worker=0, peer="p")
    clock.now += 10 * DAY - 10
    store.heartbeat(fresh, ConnectorStats(), "p")
    store.node_heartbeat(TEST_NODE)  # the relay node holding busy's tunnel is alive all along
    assert store.prune(10 * DAY) == []
    clock.now += 20
    store.node_heartbeat(TEST_NODE)
    assert store.prune(10 * DAY) == [idle]
    assert store.get_connector(idle) is None
    assert {c.id for c in store.list_connectors()} == {busy, fresh}


def test_prune_drops_revoked_records_once_their_certs_expired(store, clock):
    cid = _enroll(store, "c-aaaaaaaaaaaa").id
    store.heartbeat(cid, ConnectorStats(), "p")
    store.revoke_connector(cid)
    assert store.prune(10**9) == []
    clock.now = 2_000_001.0
    assert store.prune(10**9) == [cid]


def test_limits_are_enforced(store_location, clock):
    s = open_store(store_location, limits=StoreLimits(max_groups=2, max_apps=1, max_connectors=1, max_tokens=2), clock=clock)
    s.create_group("g1")
    with pytest.raises(LimitReached):
        s.create_group("g2")
    s.create_app(App("a", "default", "tcp", 5000, "h:1"))
    with pytest.raises(LimitReached):
        s.create_app(App("b", "default", "tcp", 5001, "h:1"))
    s.create_token("t1", "default", clock.now + 10, 5)
    s.create_token("t2", "default", clock.now + 10, 5)
    with pytest.raises(LimitReached):
        s.create_token("t3", "default", clock.now + 10, 5)
    clock.now += 11  # expired tokens are purged, making room
    s.create_token("t3", "default", clock.now + 10, 5)
    s.enroll("t3", _connector("c-aaaaaaaaaaaa"))
    with pytest.raises(LimitReached):
        s.enroll("t3", _connector("c-bbbbbbbbbbbb"))
    assert s.check_token("t3") == "default"  # the refused enrollment used nothing
    assert len(s.list_groups()) == 2 and len(s.list_apps()) == 1 and len(s.list_connectors()) == 1
    s.close()


def _hammer(path: str, worker: int, rounds: int) -> None:
    store = open_store(path)
    for i in range(rounds):
        count_tunnel(store, "c-aaaaaaaaaaaa", +1, worker=worker, peer=f"w{worker}")
        store.create_app(App(f"app-{worker}-{i}", "default", "tcp", 10000 + worker * 1000 + i, "10.0.0.1:80"))
    store.close()


def test_concurrent_writer_processes_lose_nothing(store_location):
    store = open_store(store_location)
    _enroll(store, "c-aaaaaaaaaaaa")
    before = store.config_version()
    workers, rounds = 4, 40
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(store_location), w, rounds)) for w in range(workers)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert store.get_connector("c-aaaaaaaaaaaa").tunnels == workers * rounds
    assert len(store.list_apps()) == workers * rounds
    assert store.config_version() == before + workers * rounds
    store.close()


def test_a_store_held_busy_too_long_is_reported_and_recovers(store_location):
    store = open_store(store_location, limits=StoreLimits(busy_timeout=0.2))
    try:
        with writer_lock_held(store_location):
            with pytest.raises(Unavailable, match="try again"):
                store.create_group("g1")
            assert [g.name for g in store.list_groups()] == ["default"]  # readers are not blocked (WAL, snapshots)
        store.create_group("g1")  # the failed transaction left nothing behind
        assert [g.name for g in store.list_groups()] == ["default", "g1"]
    finally:
        store.close()


def test_tokens_are_listed_by_id_without_secrets_and_can_be_revoked(store, clock):
    first = store.create_token("hash-one", "default", clock.now + 60, 2)
    clock.now += 1
    store.create_group("branch")
    second = store.create_token("hash-two", "branch", clock.now + 600, 1)
    assert first != second and len(first) == 12 and all(c in "0123456789abcdef" for c in first)
    listed = store.list_tokens()
    assert [(t.id, t.group, t.uses_left) for t in listed] == [(first, "default", 2), (second, "branch", 1)]
    assert listed[0].expires == clock.now - 1 + 60 and listed[0].created == clock.now - 1
    assert not any("hash" in str(value) for t in listed for value in t.to_dict().values())
    store.enroll("hash-one", _connector("c-aaaaaaaaaaaa"))
    assert [t.uses_left for t in store.list_tokens()] == [1, 1]
    store.revoke_token(first)
    assert [t.id for t in store.list_tokens()] == [second]
    with pytest.raises(InvalidToken) as refused:
        store.enroll("hash-one", _connector("c-bbbbbbbbbbbb"))
    assert refused.value.reason == "unknown"  # revoked: gone, like a used-up one
    assert store.get_connector("c-bbbbbbbbbbbb") is None
    with pytest.raises(NotFound, match="token list"):
        store.revoke_token(first)
    with pytest.raises(NotFound):
        store.revoke_token("no-such-id")
    clock.now += 601  # expired tokens are not listed
    assert store.list_tokens() == []


def test_refused_tokens_say_why_for_the_log_only(store, clock):
    token_id = store.create_token("hash-t", "default", clock.now + 10, 1)
    with pytest.raises(InvalidToken) as unknown:
        store.check_token("hash-never")
    assert (unknown.value.reason, unknown.value.token_id) == ("unknown", None)
    clock.now += 11
    with pytest.raises(InvalidToken) as expired:
        store.check_token("hash-t")
    assert (expired.value.reason, expired.value.token_id) == ("expired", token_id)
    # The message the client gets is the same whatever the reason.
    assert str(unknown.value) == str(expired.value)


def test_migration_gives_existing_tokens_an_id(tmp_path, clock):
    """SQLite only: its step 4 (the PostgreSQL schema had token ids from its first step)."""
    s = open_store(tmp_path, clock=clock)
    s.create_token("hash-old", "default", clock.now + 60, 1)
    s.close()
    # A store from before migration 4: the token has no id column yet.
    db = sqlite3.connect(tmp_path / "store.sqlite")
    db.execute("DROP INDEX tokens_id")
    db.execute("ALTER TABLE tokens DROP COLUMN id")
    db.execute("DELETE FROM schema_migrations WHERE version = 4")
    db.commit()
    db.close()
    s = open_store(tmp_path, clock=clock)
    try:
        (token,) = s.list_tokens()
        assert len(token.id) == 12
        s.revoke_token(token.id)
        assert s.list_tokens() == []
    finally:
        s.close()


def test_previous_certificate_is_retired_once_the_new_one_is_used(store, clock):
    cid = _enroll(store, "c-aaaaaaaaaaaa", serial=11).id
    store.renew_connector_cert(cid, 12, clock.now + 90 * DAY, presented=11)
    c = store.get_connector(cid)
    assert c.accepts_serial(11, clock.now + DAY)  # the new one is unused: the old one is good until it expires
    store.retire_previous_cert(cid, 11, clock.now + 60)  # not the current serial: nothing happens
    assert store.get_connector(cid).accepts_serial(11, clock.now + DAY)
    store.retire_previous_cert(cid, 12, clock.now + 60)
    c = store.get_connector(cid)
    assert c.accepts_serial(11, clock.now + 59) and not c.accepts_serial(11, clock.now + 60)
    assert c.accepts_serial(12, clock.now + DAY)
    store.retire_previous_cert(cid, 12, clock.now + 3600)  # a later use never extends the grace
    assert store.get_connector(cid).previous_expires == clock.now + 60


def test_renewal_asked_with_the_old_certificate_keeps_it(store, clock):
    """A renewal whose answer was lost: the connector asks again with the certificate it holds."""
    cid = _enroll(store, "c-aaaaaaaaaaaa", serial=11).id
    store.renew_connector_cert(cid, 12, clock.now + 90 * DAY, presented=11)  # answer lost
    store.renew_connector_cert(cid, 13, clock.now + 90 * DAY, presented=11)  # asked again with 11
    c = store.get_connector(cid)
    assert (c.cert_serial, c.previous_serial) == (13, 11)
    assert c.accepts_serial(11, clock.now) and c.accepts_serial(13, clock.now) and not c.accepts_serial(12, clock.now)
    store.renew_connector_cert(cid, 14, clock.now + 90 * DAY, presented=13)  # the normal case
    c = store.get_connector(cid)
    assert (c.cert_serial, c.previous_serial) == (14, 13)


def test_store_files_are_private_whatever_the_umask(tmp_path, clock):
    """SQLite only: the store's files (PostgreSQL keeps its own)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        s = open_store(tmp_path, clock=clock)
        assert os.umask(0o022) == 0o022  # the store put the process umask back
        s.create_group("g")
        names = [p.name for p in tmp_path.iterdir() if p.name.startswith("store.sqlite")]
        assert "store.sqlite" in names and "store.sqlite-wal" in names
        for name in names:
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        s.close()
    finally:
        os.umask(old)


# -- inactive connectors: when each became inactive, the grace, the removal date

GRACE = 30.0


def test_inactive_since_is_when_the_last_tunnel_went_and_the_next_one_clears_it(store, clock):
    enrolled = clock.now
    cid = _enroll(store, "c-aaaaaaaaaaaa").id
    c = store.get_connector(cid)
    # Never connected: inactive since its enrollment, and no grace (it never had a tunnel).
    assert (c.inactive_since, c.tunnel_lost, c.status_at(clock.now, GRACE)) == (enrolled, False, "inactive")
    assert c.removal_at(clock.now, GRACE, 10 * DAY) == c.last_seen + 10 * DAY
    clock.now += 5
    count_tunnel(store, cid, +1, worker=0)
    count_tunnel(store, cid, +1, worker=1)
    c = store.get_connector(cid)
    assert (c.inactive_since, c.status_at(clock.now, GRACE), c.removal_at(clock.now, GRACE, 10 * DAY)) == (None, "active", None)
    clock.now += 1
    store.tunnel_changed(cid, TEST_NODE, 0, -1, "p")  # worker 1 still holds one
    assert store.get_connector(cid).inactive_since is None
    clock.now += 1
    gone = clock.now
    store.tunnel_changed(cid, TEST_NODE, 1, -1, "p")
    store.tunnel_changed(cid, TEST_NODE, 1, -1, "p")  # a second loss moves nothing
    c = store.get_connector(cid)
    assert (c.tunnels, c.inactive_since, c.tunnel_lost, c.last_seen) == (0, gone, True, gone)
    # Within the grace it is still listed active, with neither date; then inactive with both.
    assert c.status == "inactive"
    assert (c.status_at(gone + GRACE - 0.5, GRACE), c.removal_at(gone + GRACE - 0.5, GRACE, 10 * DAY)) == ("active", None)
    assert (c.status_at(gone + GRACE, GRACE), c.removal_at(gone + GRACE, GRACE, 10 * DAY)) == ("inactive", gone + 10 * DAY)
    assert c.status_at(gone + 1, 0.0) == "inactive"
    data = c.lifecycle_dict(gone + 1, GRACE, 10 * DAY)
    assert (data["status"], data["inactive_since"], data["removal_at"]) == ("active", None, None)
    data = c.lifecycle_dict(gone + GRACE + 1, GRACE, 10 * DAY)
    assert (data["status"], data["inactive_since"], data["removal_at"]) == ("inactive", gone, gone + 10 * DAY)
    assert "tunnel_lost" not in data
    # A redial clears it.
    clock.now += 3
    count_tunnel(store, cid, +1)
    assert store.get_connector(cid).inactive_since is None


def test_a_worker_or_node_stopping_records_when_its_connectors_became_inactive(store, clock):
    both = _enroll(store, "c-aaaaaaaaaaaa").id
    one = _enroll(store, "c-bbbbbbbbbbbb").id
    count_tunnel(store, both, +1, worker=0)
    count_tunnel(store, both, +1, worker=1)
    count_tunnel(store, one, +1, worker=0)
    clock.now += 2
    store.mark_worker_down(TEST_NODE, 0)
    assert (store.get_connector(one).inactive_since, store.get_connector(both).inactive_since) == (clock.now, None)
    clock.now += 2
    store.node_stopped(TEST_NODE)
    assert (store.get_connector(one).inactive_since, store.get_connector(both).inactive_since) == (clock.now - 2, clock.now)
    # Another node's tunnel keeps a connector active when this one stops.
    count_tunnel(store, both, +1, node="n-othernodeaaa")
    count_tunnel(store, both, +1)
    clock.now += 1
    store.node_stopped(TEST_NODE)
    assert store.get_connector(both).inactive_since is None


def test_a_dead_nodes_tunnels_make_a_connector_inactive_since_its_last_heartbeat(store, clock):
    cid = _enroll(store, "c-aaaaaaaaaaaa").id
    count_tunnel(store, cid, +1)
    heard = clock.now
    clock.now += store.cluster.node_fresh + 5  # the node dies without a word
    c = store.get_connector(cid)
    assert (c.tunnels, c.inactive_since, c.tunnel_lost) == (0, heard, True)
    store.remove_node(TEST_NODE)  # its rows go: the time is kept
    c = store.get_connector(cid)
    assert (c.tunnels, c.inactive_since, c.tunnel_lost) == (0, heard, True)


def test_a_node_that_is_up_cannot_be_removed_and_marks_nothing(store, clock):
    cid = _enroll(store, "c-aaaaaaaaaaaa").id
    count_tunnel(store, cid, +1)
    with pytest.raises(Conflict):
        store.remove_node(TEST_NODE)
    assert store.get_connector(cid).inactive_since is None


def test_migration_records_existing_inactive_connectors(store_location, clock):
    """A store from before inactive_since: connectors without a tunnel row are inactive since
    they were last seen; one with a tunnel stays active and gets its time when it goes."""
    s = open_store(store_location, clock=clock)
    try:
        idle = _enroll(s, "c-aaaaaaaaaaaa").id
        busy = _enroll(s, "c-bbbbbbbbbbbb").id
        count_tunnel(s, busy, +1)
        clock.now += 60
        s.heartbeat(idle, ConnectorStats(), "p")
        s.node_heartbeat(TEST_NODE)
    finally:
        s.close()
    step = 3 if is_postgres(store_location) else 8
    raw_execute(store_location, "ALTER TABLE connectors DROP COLUMN inactive_since")
    raw_execute(store_location, f"DELETE FROM schema_migrations WHERE version = {step}")
    clock.now += 5
    s = open_store(store_location, clock=clock)
    try:
        c = s.get_connector(idle)
        assert (c.inactive_since, c.tunnel_lost) == (clock.now - 5, True)
        assert s.get_connector(busy).inactive_since is None
        s.tunnel_changed(busy, TEST_NODE, 0, -1, "p")
        assert s.get_connector(busy).inactive_since == clock.now
    finally:
        s.close()
