"""A connector's life through the CLI: register, group, publish, serve, stop, crash.

Everything runs as real processes on 127.0.0.1: the relay, two connectors, two echo
backends, and every `backhaul admin` call is a CLI run, as an admin would type it.
"""

from __future__ import annotations

import json

import pytest

from .harness import echoes, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: The relay must mark a stopped or crashed connector inactive within this many seconds.
INACTIVE_WITHIN = 30.0


def _connectors(system) -> dict[str, dict]:
    """`backhaul admin --json connector list`, keyed by connector name."""
    listed = json.loads(system.admin("--json", "connector", "list").stdout)
    return {c["name"]: c for c in listed}


def _statuses(system) -> dict[str, tuple[str, str]]:
    return {name: (c["group"], c["status"]) for name, c in _connectors(system).items()}


def _one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backhaul: "), result.stderr
    return lines[0]


def test_two_connectors_two_groups_stop_and_crash(system, backend):
    # -- enroll two connectors; both start in the token's group, `default`
    token = system.admin("token", "create", "--uses", "2").stdout.strip()
    assert token.startswith("bht_")
    ids = {}
    for name in ("east", "west"):
        state = system.workdir / f"conn-{name}"
        system.cli(
            "connector", "register", "--service", system.url, "--token", token,
            "--ca-sha256", system.ca_sha256, "--state-dir", str(state), "--name", name,
        )
        ids[name] = json.loads((state / "connector.json").read_text())["connector_id"]
    used_up = system.cli(
        "connector", "register", "--service", system.url, "--token", token, "--ca-sha256", system.ca_sha256,
        "--state-dir", str(system.workdir / "conn-third"), "--name", "third", check=False,
    )
    assert "used up" in _one_line_error(used_up)
    assert _statuses(system) == {"east": ("default", "inactive"), "west": ("default", "inactive")}

    # -- a second group, west moved into it, one TCP app per group
    system.admin("group", "create", "branch")
    assigned = system.admin("connector", "assign", ids["west"], "branch")
    assert f"connector {ids['west']} is now in group branch" in assigned.stdout
    assert _statuses(system) == {"east": ("default", "inactive"), "west": ("branch", "inactive")}
    echo_hq, echo_branch = backend("echo"), backend("echo")
    port_hq = system.publish_tcp("hq-app", echo_hq.target, group="default")
    port_branch = system.publish_tcp("branch-app", echo_branch.target, group="branch")

    refused = system.admin("group", "delete", "branch", check=False)
    line = _one_line_error(refused)
    assert "branch-app" in line and ids["west"] in line, line
    assert "branch" in {g["name"] for g in system.admin_json("group", "list")}

    # -- both connectors up: both active in their groups, traffic flows to each app
    east = system.start_connector("east")
    west = system.start_connector("west")
    system.wait_app(port_hq)
    system.wait_app(port_branch)
    wait_until(
        lambda: _statuses(system) == {"east": ("default", "active"), "west": ("branch", "active")},
        INACTIVE_WITHIN, "both connectors to be listed active in their groups", interval=0.5,
    )
    listed = _connectors(system)
    assert listed["east"]["id"] == ids["east"] and listed["west"]["id"] == ids["west"]
    assert listed["east"]["tunnels"] >= 1 and listed["west"]["tunnels"] >= 1

    # -- SIGTERM east: inactive within the bound, west untouched, only hq-app goes dark
    east.stop()
    wait_until(
        lambda: _statuses(system)["east"] == ("default", "inactive"),
        INACTIVE_WITHIN, "the stopped connector to be listed inactive", interval=0.5,
    )
    assert _statuses(system)["west"] == ("branch", "active")
    assert echoes(port_branch), "the other group's app must keep working"
    assert not echoes(port_hq), "no connector of the default group is left to serve hq-app"

    # -- SIGKILL west (a crash): the relay sees the dropped connection, inactive within the bound
    west.kill()
    wait_until(
        lambda: _statuses(system)["west"] == ("branch", "inactive"),
        INACTIVE_WITHIN, "the killed connector to be listed inactive", interval=0.5,
    )
    assert not echoes(port_branch)
    assert all(c["tunnels"] == 0 for c in _connectors(system).values())

    # -- still refused while a connector is assigned, even an inactive one
    system.admin("app", "delete", "branch-app")
    refused = system.admin("group", "delete", "branch", check=False)
    line = _one_line_error(refused)
    assert ids["west"] in line and "branch-app" not in line, line
    system.admin("connector", "assign", ids["west"], "default")
    system.admin("group", "delete", "branch")
    assert [g["name"] for g in system.admin_json("group", "list")] == ["default"]
