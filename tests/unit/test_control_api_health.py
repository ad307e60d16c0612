"""Origin health through the control API: heartbeats carry it, GET /v1/apps shows it,
and an http app's health path is validated. Real TLS, real store (fixtures of test_control_api)."""

from __future__ import annotations

import pytest

from backhaul.connector import control_client
from backhaul.control import validate
from backhaul.errors import ServiceError

from .test_control_api import Service, clock, run, service_dir  # noqa: F401 (fixtures)
from .conftest import count_tunnel

pytestmark = pytest.mark.codec_independent

STATS = {"version": "1", "cpu": 1.0, "memory": 1.0, "streams": 0, "bytes_in": 0, "bytes_out": 0}


def test_heartbeat_health_shows_in_the_app_list(run, tmp_path):
    async def go(s: Service):
        for name, port in (("web", 15000), ("db", 15001)):
            status, body, _ = await s.call("POST", "/v1/apps", {"name": name, "proto": "tcp", "port": port, "target": f"10.0.0.1:{port}"})
            assert status == 201, body
        one = await s.register(tmp_path / "one")
        two = await s.register(tmp_path / "two")
        for state in (one, two):
            count_tunnel(s.store, state.connector_id, +1, worker=0, peer="127.0.0.1:1")
        async with control_client.connector_session(one) as session:
            await control_client.heartbeat(one, session, {**STATS, "apps": {"web": True, "db": False}})
        async with control_client.connector_session(two) as session:
            await control_client.heartbeat(two, session, {**STATS, "apps": {"web": True}})
            await control_client.heartbeat(two, session, STATS)  # an older connector: nothing changes
        status, apps, _ = await s.call("GET", "/v1/apps")
        assert status == 200
        by_name = {a["name"]: a["reachability"] for a in apps}
        assert (by_name["web"]["active"], by_name["web"]["reachable"], by_name["web"]["unreachable"]) == (2, 2, 0)
        db = by_name["db"]
        assert (db["active"], db["reachable"], db["unreachable"]) == (2, 0, 1)
        assert {c["id"]: c["reachable"] for c in db["connectors"]} == {one.connector_id: False, two.connector_id: None}
        assert all(c["name"] == "test-connector" for c in db["connectors"])

    run(go)


@pytest.mark.parametrize(
    "apps, wording",
    [
        (["web"], "object"),
        ({"web": "yes"}, "true (reachable) or false"),
        ({"bad name!": True}, "app name"),
        ({f"a{i}": True for i in range(10001)}, "too large"),
    ],
)
def test_malformed_health_in_a_heartbeat_is_refused_and_changes_nothing(run, tmp_path, apps, wording):
    async def go(s: Service):
        await s.call("POST", "/v1/apps", {"name": "web", "proto": "tcp", "port": 15000, "target": "10.0.0.1:80"})
        state = await s.register(tmp_path / "one")
        count_tunnel(s.store, state.connector_id, +1, worker=0, peer="127.0.0.1:1")
        async with control_client.connector_session(state) as session:
            await control_client.heartbeat(state, session, {**STATS, "apps": {"web": True}})
            with pytest.raises(ServiceError) as refused:
                await control_client.heartbeat(state, session, {**STATS, "apps": apps})
        assert wording in str(refused.value)
        assert [r.reachable for r in s.store.origin_health()["web"]] == [True]

    run(go)


def test_health_path_is_an_http_app_option_and_is_validated(run):
    async def go(s: Service):
        base = {"name": "web", "proto": "http", "external_host": "web.example.com", "internal_url": "https://intranet/"}
        status, app, _ = await s.call("POST", "/v1/apps", {**base, "health_path": "/healthz?deep=1"})
        assert status == 201 and app["health_path"] == "/healthz?deep=1"
        status, app, _ = await s.call("PATCH", "/v1/apps/web", {"health_path": "/status"})
        assert status == 200 and app["health_path"] == "/status"
        for bad in ("healthz", "/with space", "/frag#x", "/" + "x" * 1024, 7):
            status, body, _ = await s.call("PATCH", "/v1/apps/web", {"health_path": bad})
            assert status == 400 and "health path" in body["detail"], (bad, body)
        status, body, _ = await s.call(
            "POST", "/v1/apps", {"name": "db", "proto": "tcp", "port": 15001, "target": "10.0.0.1:5432", "health_path": "/x"}
        )
        assert status == 400 and "health_path is only for http apps" in body["detail"]
        assert s.store.get_app("web").health_path == "/status" and s.store.get_app("db") is None

    run(go)


def test_health_report_size_is_bounded_even_below_the_body_limit():
    assert validate.health_map({"a": True, "b": False}, 2) == {"a": True, "b": False}
    with pytest.raises(validate.Invalid, match="at most 2"):
        validate.health_map({"a": True, "b": False, "c": True}, 2)
