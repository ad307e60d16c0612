"""The relay's side of automatic updates, end to end: a real relay, real connectors, the CLI,
and the connector endpoints called over mutual TLS with a registered connector's certificate
(as the updater calls them).

One connector of a group updates at a time, and only while another one is up (unless the
group allows downtime); a rolled-back update halts the group's rollout until an admin resumes
it; every step is in the relay's log and counted in its metrics; a connector's version is in
`connector list` as soon as its tunnels are up.
"""

from __future__ import annotations

import json

import pytest
import requests

from backhaul import __version__

from .harness import free_port, running_relay, wait_until
from .test_observe import _scrape

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]


class UpdaterCalls:
    """The updater's calls to the relay, with the connector's own certificate."""

    def __init__(self, system, state_dir) -> None:
        self.url = system.url
        self.session = requests.Session()
        self.session.cert = (str(state_dir / "cert.pem"), str(state_dir / "key.pem"))
        # Per request, not session.verify: a REQUESTS_CA_BUNDLE in the environment would override that.
        self.verify = str(system.data_dir / "ca.pem")

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        response = self.session.post(self.url + path, json=body, timeout=10, verify=self.verify)
        return response.status_code, response.json()

    def lease(self, version: str = "9.0") -> tuple[int, dict]:
        return self.post("/v1/updates/lease", {"version": version})

    def report(self, step: str, token: int | None, reason: str = "", version: str = "9.0") -> dict:
        status, body = self.post("/v1/updates/report", {"version": version, "step": step, "reason": reason, "token": token})
        assert status == 200, body
        return body

    def close(self) -> None:
        self.session.close()


def _rollout(system, cli: bool = False) -> dict:
    """The default group's entry of `rollout status --json` (or of the API it reads, which is quicker)."""
    groups = system.admin_json("rollout", "status") if cli else system.api("/v1/rollout")
    (default,) = [g for g in groups if g["group"] == "default"]
    return default


def test_one_connector_per_group_updates_and_a_rollback_halts_the_group(tmp_path):
    metrics = free_port()
    with running_relay(tmp_path, relay_args=("--metrics", f"127.0.0.1:{metrics}")) as system:
        states = {name: system.register(name) for name in ("a", "b")}
        for name in states:
            system.start_connector(name, tunnels=1)
        for name in states:
            system.wait_tunnels(name, 1)
        a, b = (UpdaterCalls(system, states[name]) for name in ("a", "b"))
        try:
            # Both up: the first asker gets the group's lease, the second is told who has it.
            status, lease = a.lease()
            assert status == 200 and lease["group"] == "default", lease
            status, refused = b.lease()
            assert status == 409 and refused["reason"] == "busy", refused
            a_id = system.connector_info("a")["id"]
            assert a_id in refused["detail"]
            status = system.admin("rollout", "status")
            assert f"{a_id} to 9.0" in status.stdout and "updating" in status.stdout
            status, renewed = a.post("/v1/updates/lease/renew", {"token": lease["token"]})
            assert status == 200 and renewed["expires"] >= lease["expires"]
            assert a.report("healthy", lease["token"])["released"] is True

            # b stopped (inactive): updating a would leave the group without a connector.
            system.connectors["b"].stop()
            wait_until(lambda: system.connector_info("b")["status"] == "inactive", 15, "b to be inactive")
            status, refused = a.lease()
            assert status == 409 and refused["reason"] == "alone", refused

            # ... unless the group allows downtime.
            system.admin("group", "update", "default", "--allow-downtime", "yes", "--window", "Sun,Sat 02:00-04:00")
            listed = system.admin("group", "list").stdout
            assert listed.splitlines()[0].split()[3:] == ["DOWNTIME", "WINDOW", "ROLLOUT"] and "Sat,Sun 02:00-04:00" in listed
            (group,) = system.admin_json("group", "list")
            assert (group["allow_downtime"], group["window"]) == (True, "Sat,Sun 02:00-04:00")
            status, lease = a.lease()
            assert status == 200, lease

            # A rolled-back update gives the lease back and halts the group's rollout.
            for step in ("downloaded", "installed", "switched"):
                a.report(step, lease["token"])
            answer = a.report("rolled_back", lease["token"], reason="not ready within 60 s")
            assert answer == {"status": "ok", "released": True, "halted": True}
            status, refused = a.lease()
            assert status == 409 and refused["reason"] == "halted" and "not ready within 60 s" in refused["detail"]
            human = system.admin("rollout", "status", "--group", "default").stdout
            assert "halted" in human and "not ready within 60 s" in human and f"version 9.0 failed on connector {a_id}" in human
            assert "rolled back: 9.0 on" in human
            default = _rollout(system, cli=True)
            assert (default["halted"], default["halted_connector"], default["halted_version"]) == ("not ready within 60 s", a_id, "9.0")
            assert default["versions"] == {__version__: 2} and default["lease"] is None
            assert [f["step"] for f in default["failures"]] == ["rolled_back"]

            # resume clears the halt; pause stops new leases until resumed again.
            assert "resumed the rollout of default" in system.admin("rollout", "resume", "--group", "default").stdout
            assert _rollout(system)["halted"] is None
            system.admin("rollout", "pause")
            status, refused = a.lease()
            assert status == 409 and refused["reason"] == "paused"
            assert _rollout(system)["paused"] is True
            system.admin("rollout", "resume")
            status, lease = a.lease()
            assert status == 200, lease
            a.report("healthy", lease["token"])
        finally:
            a.close()
            b.close()

        # The connector's history keeps the steps, newest last.
        history = system.admin("rollout", "history", a_id).stdout.splitlines()
        assert history[0].split() == ["AT", "GROUP", "VERSION", "STEP", "LEASE", "REASON"]
        assert "rolled_back" in history[5] and "not ready within 60 s" in history[5]
        assert [r["step"] for r in system.api(f"/v1/connectors/{a_id}/updates")][-1] == "healthy"

        # Every step is in the relay's log with connector, group, version, step and reason ...
        steps = system.relay.log_entries("update step reported")
        assert [(e["connector_id"], e["group"], e["version"], e["step"]) for e in steps][:5] == [
            (a_id, "default", "9.0", step) for step in ("healthy", "downloaded", "installed", "switched", "rolled_back")
        ]
        assert steps[4]["reason"] == "not ready within 60 s" and steps[4]["level"] == "warning"
        assert system.relay.log_entries("rollout halted: an update failed")
        # ... and counted by step in the relay's metrics (published once a second).
        wait_until(
            lambda: _scrape(metrics).get(("backhaul_relay_update_reports_total", (("step", "healthy"),))) == 2,
            10, "the update reports to be counted",
        )
        figures = _scrape(metrics)
        assert figures[("backhaul_relay_update_reports_total", (("step", "rolled_back"),))] == 1
        assert figures[("backhaul_relay_update_reports_total", (("step", "switched"),))] == 1


def test_a_connector_hello_shows_its_version_as_soon_as_its_tunnels_are_up(system):
    state = system.register("c")
    # The store says it runs an old version (as it would after an update the relay has not heard of yet).
    calls = UpdaterCalls(system, state)
    try:
        status, _ = calls.post("/v1/connector/heartbeat", {"version": "0.0.1"})
        assert status == 200
    finally:
        calls.close()
    assert system.connector_info("c")["version"] == "0.0.1"
    # Its heartbeats are ten minutes apart: only the hello can tell the relay.
    system.start_connector("c", tunnels=1, extra=("--heartbeat", "600"))
    system.wait_tunnels("c", 1)
    wait_until(lambda: system.connector_info("c")["version"] == __version__, 5, "the hello's version in the connector list")
    listed = system.admin("connector", "list").stdout
    assert __version__ in listed.splitlines()[1]
    assert json.loads(system.admin("--json", "connector", "list").stdout)[0]["version"] == __version__
    assert system.relay.log_entries("connector version recorded from its hello")
