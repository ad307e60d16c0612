"""Relay nodes in the store, on both backends: registration, heartbeats and freshness, the
tunnels each node holds, the nodes connectors are told about, and the change log (with its
NOTIFY on PostgreSQL). Time is the only thing injected."""

from __future__ import annotations

import pytest

from backhaul.config import ClusterSettings
from backhaul.store import App, Conflict, Connector, LimitReached, Node, NotFound, open_store

from .conftest import is_postgres
from .fakes import Clock

pytestmark = pytest.mark.codec_independent

FRESH = ClusterSettings().node_fresh
DAY = 86400.0
A, B, C = "n-aaaaaaaaaaaa", "n-bbbbbbbbbbbb", "n-cccccccccccc"


@pytest.fixture
def clock():
    return Clock(1_000_000.0)


@pytest.fixture
def store(store_location, clock):
    s = open_store(store_location, clock=clock)
    yield s
    s.close()


def _node(node_id: str, port: int = 8443) -> Node:
    return Node(node_id, f"127.0.0.1:{port}", f"127.0.0.1:{port}", "1.2.3", 0.0, 0.0)


def _enroll(store, cid: str, group: str = "default") -> str:
    store.create_token(f"hash-{cid}", group, 10**12, 1)
    return store.enroll(
        f"hash-{cid}",
        Connector(
            id=cid, name=cid, hostname="h", version="1", group="", created=0, last_seen=0, source_addr="127.0.0.1",
            cert_serial=1, cert_expires=10**10,
        ),
    ).id


def test_a_node_registers_heartbeats_goes_stale_and_stays_listed(store, clock):
    store.register_node(_node(A))
    [node] = store.list_nodes(FRESH)
    assert (node.id, node.listen, node.peer, node.version, node.state) == (A, "127.0.0.1:8443", "127.0.0.1:8443", "1.2.3", "running")
    assert (node.started, node.last_seen, node.status) == (clock.now, clock.now, "up")
    started = clock.now
    clock.now += FRESH - 1
    store.node_heartbeat(A)
    clock.now += FRESH - 1
    [node] = store.list_nodes(FRESH)
    assert (node.status, node.started, node.last_seen) == ("up", started, started + FRESH - 1)
    clock.now += 2  # no heartbeat for longer than node_fresh: down, still listed
    [node] = store.list_nodes(FRESH)
    assert (node.status, node.state, node.to_dict()["status"]) == ("down", "running", "down")
    assert "fresh" not in node.to_dict()
    store.register_node(_node(A, 9443))  # a restart: the same id, new addresses, up again
    [node] = store.list_nodes(FRESH)
    assert (node.status, node.listen, node.started) == ("up", "127.0.0.1:9443", clock.now)


def test_a_clean_stop_is_down_at_once_and_drops_its_tunnels(store, clock):
    cid = _enroll(store, "c-aaaaaaaaaaaa")
    store.register_node(_node(A))
    store.register_node(_node(B, 8444))
    store.tunnel_changed(cid, A, 0, +1, "p")
    store.tunnel_changed(cid, B, 0, +1, "p")
    store.tunnel_changed(cid, B, 1, +1, "p")
    assert {n.id: n.tunnels for n in store.list_nodes(FRESH)} == {A: 1, B: 2}
    assert store.get_connector(cid).tunnels == 3
    store.node_stopped(B)
    assert {n.id: (n.status, n.state, n.tunnels) for n in store.list_nodes(FRESH)} == {
        A: ("up", "running", 1), B: ("down", "stopped", 0)
    }
    assert store.get_connector(cid).tunnels == 1
    with pytest.raises(NotFound, match="not registered as running"):
        store.node_heartbeat(B)  # a stopped node's heartbeat does not bring it back; registering does
    store.tunnel_changed(cid, B, 0, +1, "p")  # a late tunnel of the stopped node does not count
    assert store.get_connector(cid).tunnels == 1


def test_a_dead_node_leaves_no_connector_falsely_active(store, clock):
    """The freshness rules: nothing clears a dead node's rows, yet within node_fresh its
    tunnels stop counting everywhere (status, origin reports, update leases, pruning)."""
    store.create_app(App("db", "default", "tcp", 5000, "10.0.0.1:5432"))
    on_dead = _enroll(store, "c-aaaaaaaaaaaa")
    on_live = _enroll(store, "c-bbbbbbbbbbbb")
    store.register_node(_node(A))
    store.register_node(_node(B, 8444))
    store.tunnel_changed(on_dead, A, 0, +1, "p")
    store.tunnel_changed(on_live, B, 0, +1, "p")
    assert {c.id: c.status for c in store.list_connectors()} == {on_dead: "active", on_live: "active"}
    clock.now += FRESH + 1  # A dies without a word; B keeps its heartbeat
    store.node_heartbeat(B)
    assert {c.id: (c.status, c.tunnels) for c in store.list_connectors()} == {on_dead: ("inactive", 0), on_live: ("active", 1)}
    assert [r.connector_id for r in store.origin_health()["db"]] == [on_live]
    assert {n.id: (n.status, n.tunnels) for n in store.list_nodes(FRESH)} == {A: ("down", 0), B: ("up", 1)}
    assert store.group_nodes(FRESH) == {"default": [B]}
    clock.now += 10 * DAY
    store.node_heartbeat(B)
    assert store.prune(10 * DAY) == [on_dead]  # its only tunnel is on the dead node: it is removed
    assert [c.id for c in store.list_connectors()] == [on_live]


def test_group_nodes_names_the_up_nodes_holding_usable_tunnels_per_group(store, clock):
    store.create_group("branch")
    a = _enroll(store, "c-aaaaaaaaaaaa")
    b = _enroll(store, "c-bbbbbbbbbbbb", group="branch")
    gone = _enroll(store, "c-cccccccccccc", group="branch")
    for node_id, port in ((A, 1), (B, 2), (C, 3)):
        store.register_node(_node(node_id, port))
    store.tunnel_changed(a, A, 0, +1, "p")
    store.tunnel_changed(a, C, 1, +1, "p")
    store.tunnel_changed(b, B, 0, +1, "p")
    store.tunnel_changed(b, B, 0, -1, "p")  # drained: not usable
    store.tunnel_changed(gone, C, 0, +1, "p")
    assert store.group_nodes(FRESH) == {"default": [A, C], "branch": [C]}
    store.revoke_connector(gone)
    assert store.group_nodes(FRESH) == {"default": [A, C]}
    store.tunnel_changed(b, B, 2, +1, "p")
    assert store.group_nodes(FRESH) == {"default": [A, C], "branch": [B]}
    clock.now += FRESH / 2
    store.node_heartbeat(A)
    store.node_heartbeat(B)
    assert store.group_nodes(FRESH / 2 + 1) == {"default": [A, C], "branch": [B]}
    assert store.group_nodes(FRESH / 2 - 1) == {"default": [A], "branch": [B]}  # C is stale for that window


def test_worker_down_clears_only_that_workers_rows_on_that_node(store):
    cid = _enroll(store, "c-aaaaaaaaaaaa")
    store.register_node(_node(A))
    store.register_node(_node(B, 8444))
    for node_id in (A, B):
        for worker in (0, 1):
            store.tunnel_changed(cid, node_id, worker, +1, "p")
    store.mark_worker_down(A, 0)
    assert {n.id: n.tunnels for n in store.list_nodes(FRESH)} == {A: 1, B: 2}
    assert store.get_connector(cid).tunnels == 3
    with pytest.raises(NotFound, match="not registered"):
        store.tunnel_changed(cid, C, 0, +1, "p")


def test_connector_config_lists_the_up_nodes(store, clock):
    cid = _enroll(store, "c-aaaaaaaaaaaa")
    assert store.connector_config(cid)["nodes"] == []  # an old data dir's relay before it registers
    store.register_node(_node(B, 8444))
    store.register_node(_node(A))
    cfg = store.connector_config(cid)
    assert cfg["nodes"] == [{"id": A, "listen": "127.0.0.1:8443"}, {"id": B, "listen": "127.0.0.1:8444"}]
    clock.now += FRESH / 2
    store.node_heartbeat(A)
    assert store.connector_config(cid)["etag"] == cfg["etag"]  # a heartbeat is not a change
    clock.now += FRESH / 2 + 1
    later = store.connector_config(cid)
    assert later["nodes"] == [{"id": A, "listen": "127.0.0.1:8443"}]  # B went stale
    assert later["etag"] != cfg["etag"]  # the connector fetches the new list
    store.node_stopped(A)
    assert store.connector_config(cid)["nodes"] == []


def test_nodes_are_bounded_and_a_down_one_can_be_removed(store_location, clock):
    s = open_store(store_location, clock=clock, cluster=ClusterSettings(max_nodes=2))
    try:
        s.register_node(_node(A))
        s.register_node(_node(B))
        with pytest.raises(LimitReached, match="admin node remove"):
            s.register_node(_node(C))
        s.register_node(_node(A, 9000))  # an upsert of a known node is not a new one
        with pytest.raises(Conflict, match="is up"):
            s.remove_node(B)
        s.node_stopped(B)
        s.remove_node(B)
        with pytest.raises(NotFound, match="no relay node"):
            s.remove_node(B)
        s.register_node(_node(C))
        assert [n.id for n in s.list_nodes(FRESH)] == [A, C]
    finally:
        s.close()


def test_every_bump_writes_one_change_log_row_and_the_log_is_bounded(store_location, clock):
    s = open_store(store_location, clock=clock, cluster=ClusterSettings(change_log_rows=3))
    try:
        start = s.config_version()
        s.create_group("g1")
        s.create_app(App("db", "g1", "tcp", 5000, "10.0.0.1:5432"))
        assert [(c["version"], c["kind"], c["subject"]) for c in s.changes_since(start)] == [
            (start + 1, "group_created", "g1"), (start + 2, "app_created", "db"),
        ]
        s.register_node(_node(A))
        s.node_heartbeat(A)  # nodes and tunnels are not config: no row
        assert s.config_version() == start + 2
        for name in ("x", "y", "z", "w"):
            s.create_group(name)
        rows = s.changes_since(0)
        assert [c["version"] for c in rows] == [start + 4, start + 5, start + 6]  # the newest 3
        assert rows[-1]["subject"] == "w" and rows[-1]["at"] == clock.now
    finally:
        s.close()


def test_on_postgresql_every_bump_notifies_its_version_at_commit(store_location):
    if not is_postgres(store_location):
        pytest.skip("NOTIFY is PostgreSQL's; one SQLite node polls")
    import psycopg

    s = open_store(store_location)
    try:
        with psycopg.connect(store_location, autocommit=True) as listener:
            listener.execute("LISTEN backhaul_config")
            s.create_group("g1")
            s.register_node(_node(A))  # not a bump: no notification
            s.create_group("g2")
            with pytest.raises(Conflict):
                s.create_group("g2")  # refused: rolled back, nothing sent
            got = [n.payload for n in listener.notifies(timeout=1.0, stop_after=3)]
        version = s.config_version()
        assert got == [str(version - 1), str(version)]
    finally:
        s.close()
