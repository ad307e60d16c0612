"""The rollout endpoints of the control API over real TLS: connector calls with the connector's
certificate, admin calls with the admin token, a real SQLite store."""

from __future__ import annotations

import logging

import orjson
import pytest

from backhaul.connector import control_client
from backhaul.admin.commands import release_rollout
from backhaul.control.rollout_api import UPDATE_REPORTS, release_groups, rollout_for_group

from .test_control_api import Service, clock, run, service_dir  # noqa: F401 (fixtures)
from .conftest import count_tunnel

pytestmark = pytest.mark.codec_independent


async def _connector_call(state, path: str, body) -> tuple[int, dict]:
    async with control_client.connector_session(state) as session:
        async with session.post(state.service_url + path, data=orjson.dumps(body)) as resp:
            return resp.status, orjson.loads(await resp.read())


async def _two_active(s: Service, tmp_path):
    states = [await s.register(tmp_path / f"conn-{n}") for n in range(2)]
    for state in states:
        count_tunnel(s.store, state.connector_id, +1, worker=0, peer="127.0.0.1")  # as a relay worker does at tunnel up
    return states


def test_lease_renew_and_report_over_mtls(run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="backhaul.control.api")

    async def go(s: Service):
        a, b = await _two_active(s, tmp_path)
        status, lease = await _connector_call(a, "/v1/updates/lease", {"version": "2.0"})
        assert status == 200 and lease["group"] == "default" and lease["token"] >= 1
        assert lease["renew_every"] == pytest.approx(200.0) and lease["expires"] > s.ctx.clock()
        status, refused = await _connector_call(b, "/v1/updates/lease", {"version": "2.0"})
        assert status == 409 and refused["reason"] == "busy" and refused["error"] == "lease_refused"
        assert a.connector_id in refused["detail"]
        status, renewed = await _connector_call(a, "/v1/updates/lease/renew", {"token": lease["token"]})
        assert status == 200 and renewed["expires"] >= lease["expires"]
        status, stale = await _connector_call(b, "/v1/updates/lease/renew", {"token": lease["token"]})
        assert status == 409 and stale["reason"] == "stale"
        for step in ("downloaded", "installed", "switched"):
            status, answer = await _connector_call(a, "/v1/updates/report", {"version": "2.0", "step": step, "token": lease["token"]})
            assert (status, answer) == (200, {"status": "ok", "released": False, "halted": False})
        status, answer = await _connector_call(a, "/v1/updates/report", {"version": "2.0", "step": "healthy", "reason": None, "token": lease["token"]})
        assert answer == {"status": "ok", "released": True, "halted": False}
        status, lease_b = await _connector_call(b, "/v1/updates/lease", {"version": "2.0"})
        assert status == 200 and lease_b["token"] > lease["token"]
        assert s._runner.app[UPDATE_REPORTS] == {"downloaded": 1, "installed": 1, "switched": 1, "healthy": 1}
        assert [r.step for r in s.store.update_reports(a.connector_id)] == ["downloaded", "installed", "switched", "healthy"]
        status, listed, _ = await s.call("GET", f"/v1/connectors/{a.connector_id}/updates")
        assert status == 200 and [(r["step"], r["token"]) for r in listed][-1] == ("healthy", lease["token"])
        status, _, _ = await s.call("GET", "/v1/connectors/c-nope/updates")
        assert status == 404
        return a

    a = run(go)
    steps = [r for r in caplog.records if r.getMessage() == "update step reported"]
    assert [(r.connector_id, r.group, r.version, r.step) for r in steps][-1] == (a.connector_id, "default", "2.0", "healthy")
    assert any(r.getMessage() == "update lease refused" and r.reason == "busy" for r in caplog.records)


def test_a_rolled_back_report_halts_and_resume_clears_it(run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="backhaul.control.api")

    async def go(s: Service):
        a, b = await _two_active(s, tmp_path)
        _, lease = await _connector_call(a, "/v1/updates/lease", {"version": "2.0"})
        # release list's rollout per group: who is updating to which version ...
        on_it = {"connectors": 2, "on": 0, "failed": 0, "rolled_back": 0, "halted": None}
        assert release_groups(s.store, ["2.0", "1.9"]) == {
            "2.0": {"default": {**on_it, "updating": "test-connector"}}, "1.9": {"default": {**on_it, "updating": None}},
        }
        assert release_rollout(release_groups(s.store, ["2.0"])["2.0"]) == "default: 0/2 on it, updating test-connector"
        report = {"version": "2.0", "step": "rolled_back", "reason": "not ready within 60 s", "token": lease["token"]}
        status, answer = await _connector_call(a, "/v1/updates/report", report)
        assert (status, answer) == (200, {"status": "ok", "released": True, "halted": True})
        # ... and, once it is rolled back, how many rolled it back and why the group halted (for that version only).
        groups = release_groups(s.store, ["2.0", "1.9"])
        assert groups["2.0"] == {"default": {**on_it, "updating": None, "rolled_back": 1, "halted": "not ready within 60 s"}}
        assert groups["1.9"] == {"default": {**on_it, "updating": None}}
        assert release_rollout(groups["2.0"]) == "default: 0/2 on it, rolled back 1, halted"
        assert release_rollout({}) == "-"
        assert rollout_for_group(s.store, "default") == {"paused": False, "halted": "not ready within 60 s"}
        status, refused = await _connector_call(b, "/v1/updates/lease", {"version": "2.0"})
        assert status == 409 and refused["reason"] == "halted" and "not ready within 60 s" in refused["detail"]
        status, groups, _ = await s.call("GET", "/v1/rollout")
        assert status == 200
        (default,) = groups
        assert default["halted"] == "not ready within 60 s" and default["halted_connector"] == a.connector_id
        assert default["halted_version"] == "2.0" and default["lease"] is None
        assert [(f["connector_id"], f["version"], f["step"]) for f in default["failures"]] == [(a.connector_id, "2.0", "rolled_back")]
        status, body, _ = await s.call("POST", "/v1/rollout/resume", {"group": "default"})
        assert (status, body) == (200, {"resumed": ["default"]})
        assert rollout_for_group(s.store, "default") == {"paused": False, "halted": None}
        status, body, _ = await s.call("POST", "/v1/rollout/pause", {})
        assert (status, body) == (200, {"paused": ["default"]})
        status, refused = await _connector_call(b, "/v1/updates/lease", {"version": "2.0"})
        assert refused["reason"] == "paused"
        assert rollout_for_group(s.store, "default")["paused"] is True

    run(go)
    assert any(r.getMessage() == "rollout halted: an update failed" and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize(
    "path, body, words",
    [
        ("/v1/updates/lease", {}, "version"),
        ("/v1/updates/lease", {"version": ""}, "version"),
        ("/v1/updates/lease", {"version": "2.0\n"}, "version"),
        ("/v1/updates/lease/renew", {}, "token"),
        ("/v1/updates/lease/renew", {"token": 0}, "token"),
        ("/v1/updates/lease/renew", {"token": "7"}, "token"),
        ("/v1/updates/lease/renew", {"token": True}, "token"),
        ("/v1/updates/report", {"version": "2.0", "step": "exploded"}, "step must be one of"),
        ("/v1/updates/report", {"version": "2.0"}, "step must be one of"),
        ("/v1/updates/report", {"version": "2.0", "step": "failed", "reason": "x" * 300}, "reason"),
        ("/v1/updates/report", {"version": "2.0", "step": "failed", "token": -1}, "token"),
    ],
)
def test_malformed_connector_requests_are_refused(run, tmp_path, path, body, words):
    async def go(s: Service):
        a, _ = await _two_active(s, tmp_path)
        status, answer = await _connector_call(a, path, body)
        assert status == 400 and words in answer["detail"], answer
        assert s.store.update_reports(a.connector_id) == [] and s.store.group_rollout("default").lease is None

    run(go)


def test_connector_calls_need_the_client_certificate(run):
    async def go(s: Service):
        for path in ("/v1/updates/lease", "/v1/updates/lease/renew", "/v1/updates/report"):
            status, body, _ = await s.call("POST", path, {"version": "2.0", "token": 1, "step": "healthy"}, token=None)
            assert status == 403 and body["error"] == "no_client_certificate"

    run(go)


def test_group_update_settings(run):
    async def go(s: Service):
        status, body, _ = await s.call("PATCH", "/v1/groups/default/updates", {"allow_downtime": True, "window": "Sun,Sat 02:00-04:00"})
        assert status == 200 and (body["allow_downtime"], body["window"]) == (True, "Sat,Sun 02:00-04:00")
        status, body, _ = await s.call("PATCH", "/v1/groups/default/updates", {"window": None})
        assert status == 200 and (body["allow_downtime"], body["window"]) == (True, None)
        for bad, words in (
            ({"window": "Sat 02:00-04:00 junk"}, "DAYS HH:MM-HH:MM"),
            ({"allow_downtime": "yes"}, "true or false"),
            ({"paused": True}, "unknown fields paused"),
        ):
            status, body, _ = await s.call("PATCH", "/v1/groups/default/updates", bad)
            assert status == 400 and words in body["detail"], body
        assert s.store.group_rollout("default").allow_downtime is True
        status, body, _ = await s.call("PATCH", "/v1/groups/nowhere/updates", {"allow_downtime": True})
        assert status == 404
        status, body, _ = await s.call("POST", "/v1/rollout/pause", {"group": "nowhere"})
        assert status == 404
        status, body, _ = await s.call("POST", "/v1/rollout/pause", {"groups": "default"})
        assert status == 400 and "unknown fields" in body["detail"]
        status, body, _ = await s.call("GET", "/v1/rollout", token=None)
        assert status == 401

    run(go)
