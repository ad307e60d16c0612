"""Origin health in the store (both backends): what connectors report about reaching their apps."""

from __future__ import annotations

import pytest

from backhaul.store import App, NotFound, open_store

from .test_store import Clock, _enroll
from .conftest import TEST_NODE, count_tunnel

pytestmark = pytest.mark.codec_independent


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(store_location, clock):
    s = open_store(store_location, clock=clock)
    s.create_group("g")
    s.create_app(App("web", "g", "tcp", 5000, "10.0.0.1:80"))
    s.create_app(App("db", "g", "tcp", 5001, "10.0.0.2:5432"))
    s.create_app(App("elsewhere", "default", "tcp", 5002, "10.0.0.3:22"))
    for cid in ("c-aaaa", "c-bbbb", "c-idle"):
        _enroll(s, cid, group="g")
    for cid in ("c-aaaa", "c-bbbb"):
        count_tunnel(s, cid, +1, worker=0, peer="127.0.0.1:1")
    yield s
    s.close()


def _view(store) -> dict:
    return {app: {(r.connector, r.reachable) for r in reports} for app, reports in store.origin_health().items()}


def _rows(store) -> int:
    with store._read() as db:
        return db.execute("SELECT COUNT(*) FROM app_health").fetchone()[0]


def test_reports_per_active_connector_of_the_apps_group(store):
    store.set_app_health("c-aaaa", {"web": True, "db": False, "elsewhere": False, "nope": True})
    store.set_app_health("c-idle", {"web": False})  # no tunnel: not listed
    assert _view(store) == {
        "web": {("c-aaaa", True), ("c-bbbb", None)},
        "db": {("c-aaaa", False), ("c-bbbb", None)},
    }
    # an app of another group or no app at all is not stored
    with store._read() as db:
        assert {r[0] for r in db.execute("SELECT app FROM app_health WHERE connector_id = 'c-aaaa'")} == {"web", "db"}


def test_a_report_replaces_the_previous_one_and_since_moves_only_on_change(store, clock):
    store.set_app_health("c-aaaa", {"web": True, "db": True})
    first = {r.connector: r.since for r in store.origin_health()["web"] if r.reachable is not None}
    clock.now += 60
    store.node_heartbeat(TEST_NODE)  # the relay node holding the tunnels is alive all along
    store.set_app_health("c-aaaa", {"web": True, "db": False})
    web = {r.connector: r for r in store.origin_health()["web"]}
    db = {r.connector: r for r in store.origin_health()["db"]}
    assert web["c-aaaa"].since == first["c-aaaa"]  # unchanged state keeps its time
    assert db["c-aaaa"].reachable is False and db["c-aaaa"].since == clock.now
    store.set_app_health("c-aaaa", {})  # nothing known any more (e.g. the connector restarted)
    assert _view(store)["web"] == {("c-aaaa", None), ("c-bbbb", None)}


def test_rows_go_with_the_connector_the_app_and_app_changes(store, clock):
    store.set_app_health("c-aaaa", {"web": True, "db": True})
    store.set_app_health("c-bbbb", {"web": False, "db": True})
    assert _rows(store) == 4
    store.update_app("web", App("portal", "g", "tcp", 5000, "10.0.0.9:80"))  # renamed and retargeted
    assert _rows(store) == 2 and _view(store)["portal"] == {("c-aaaa", None), ("c-bbbb", None)}
    store.update_app("db", App("database", "g", "tcp", 5001, "10.0.0.2:5432"))
    assert _rows(store) == 0  # any change of an app resets what connectors said about it
    store.set_app_health("c-aaaa", {"portal": True, "database": True})
    store.set_app_health("c-bbbb", {"portal": True})
    store.delete_app("portal")
    assert _rows(store) == 1
    store.revoke_connector("c-aaaa")
    clock.now += 10**9  # its certificate expired long ago: pruned, rows cascade away
    count_tunnel(store, "c-aaaa", -1, worker=0, peer="p")
    store.prune(unseen_for=1)
    assert _rows(store) == 0


def test_moving_a_connector_to_another_group_hides_its_old_reports(store):
    store.set_app_health("c-aaaa", {"web": False})
    store.assign_connector("c-aaaa", "default")
    assert _view(store)["web"] == {("c-bbbb", None)}
    assert _view(store)["elsewhere"] == {("c-aaaa", None)}


def test_unknown_connector_is_refused(store):
    with pytest.raises(NotFound):
        store.set_app_health("c-none", {"web": True})
