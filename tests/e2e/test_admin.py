"""`backhaul admin` end to end against a running relay: tables, --json, errors, credentials."""

from __future__ import annotations

import json
import os

import pytest

from .harness import running_relay

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]


@pytest.fixture(scope="module")
def shared_system(tmp_path_factory):
    """One relay for the tests that only read or are refused (starting one costs seconds)."""
    with running_relay(tmp_path_factory.mktemp("admin")) as system:
        yield system


def _snapshot(system):
    """Apps, groups and connectors, read in-process (a CLI run costs half a second)."""
    from backhaul.admin.client import call, resolve_target

    target = resolve_target(service=system.url, token_file=None, data_dir=str(system.data_dir), environ={})
    return [call(target, "GET", path) for path in ("/v1/apps", "/v1/groups", "/v1/connectors")]


def _one_line_error(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backhaul: "), result.stderr
    return lines[0]


def test_groups_tokens_apps_round_trip(system):
    system.admin("group", "create", "branch")
    table = system.admin("group", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "APPS", "CONNECTORS", "DOWNTIME", "WINDOW", "ROLLOUT"]
    assert [line.split()[0] for line in table[1:]] == ["branch", "default"]
    token = system.admin("token", "create", "--group", "branch", "--ttl", "60", "--uses", "2")
    assert token.stdout.strip().startswith("bht_") and len(token.stdout.strip().splitlines()) == 1
    assert "branch" in token.stderr
    (listed,) = system.admin_json("token", "list")
    assert listed["group"] == "branch" and listed["uses_left"] == 2 and listed["id"] in token.stderr
    tokens = system.admin("token", "list").stdout
    assert tokens.splitlines()[0].split() == ["ID", "GROUP", "USES", "LEFT", "EXPIRES", "CREATED"]
    assert listed["id"] in tokens and token.stdout.strip() not in tokens
    system.admin("app", "publish", "db", "--group", "branch", "--tcp", "25432", "--target", "10.0.0.5:5432")
    system.admin("app", "publish", "dns", "--group", "branch", "--udp", "25353", "--target", "10.0.0.53:53")
    system.admin("app", "publish", "wiki", "--group", "branch", "--http", "wiki.example.com", "--internal-url", "http://wiki.lan:8080/", "--preauth", "oidc")
    apps = {a["name"]: a for a in system.admin_json("app", "list")}
    assert apps["db"]["proto"] == "tcp" and apps["db"]["port"] == 25432 and apps["db"]["target"] == "10.0.0.5:5432"
    assert apps["dns"]["proto"] == "udp"
    assert apps["wiki"]["external_host"] == "wiki.example.com" and apps["wiki"]["preauth"] == "oidc" and apps["wiki"]["target"] == "wiki.lan:8080"
    listing = system.admin("app", "list").stdout
    assert "wiki.example.com" in listing and "10.0.0.5:5432" in listing
    refused = system.admin("group", "delete", "branch", check=False)
    assert "db" in _one_line_error(refused) and "wiki" in refused.stderr
    system.admin("group", "rename", "branch", "site-a")
    assert {a["group"] for a in system.admin_json("app", "list")} == {"site-a"}
    for name in ("db", "dns", "wiki"):
        system.admin("app", "delete", name)
    system.admin("group", "delete", "site-a")
    assert [g["name"] for g in system.admin_json("group", "list")] == ["default"]
    # --json after the subcommand works too
    assert json.loads(system.admin("token", "create", "--json").stdout)["group"] == "default"


@pytest.mark.parametrize(
    "args, words",
    [
        (["app", "publish", "x", "--tcp", "25000", "--target", "nope"], "HOST:PORT"),
        (["app", "publish", "x", "--tcp", "25000"], "--target"),
        (["app", "publish", "x", "--http", "x.example", "--target", "a:1"], "--internal-url"),
        (["app", "publish", "x", "--http", "x.example", "--internal-url", "not a url"], "http://"),
        (["app", "publish", "x", "--group", "ghost", "--tcp", "25000", "--target", "a:1"], "ghost"),
        (["app", "delete", "ghost"], "no app"),
        (["group", "delete", "ghost"], "ghost"),
        (["connector", "assign", "c-aaaaaaaaaaaa", "default"], "no connector"),
        (["connector", "delete", "c-aaaaaaaaaaaa"], "no connector"),
        (["token", "create", "--uses", "0"], "uses"),
        (["token", "create", "--group", "ghost"], "ghost"),
        (["token", "revoke", "0123456789ab"], "no enrollment token"),
    ],
)
def test_refusals_are_one_clear_line(shared_system, args, words):
    before = _snapshot(shared_system)
    result = shared_system.admin(*args, check=False)
    assert words in _one_line_error(result)
    assert _snapshot(shared_system) == before


def test_port_clash_names_the_app(system):
    system.admin("app", "publish", "a", "--tcp", "25001", "--target", "10.0.0.1:1")
    clash = system.admin("app", "publish", "b", "--tcp", "25001", "--target", "10.0.0.1:2", check=False)
    assert "already used by app 'a'" in _one_line_error(clash)
    system.admin("app", "publish", "w1", "--http", "same.example.com", "--internal-url", "http://a/")
    dup = system.admin("app", "publish", "w2", "--http", "same.example.com", "--internal-url", "http://b/", check=False)
    assert "same.example.com" in _one_line_error(dup)
    assert [a["name"] for a in system.admin_json("app", "list")] == ["a", "w1"]


def test_wrong_token_is_refused_and_changes_nothing(shared_system, tmp_path):
    system = shared_system
    bad = tmp_path / "bad.token"
    bad.write_text("bha_wrong\n")
    result = system.cli(
        "admin", "--service", system.url, "--token-file", str(bad), "--ca", str(system.data_dir / "ca.pem"),
        "group", "create", "evil", check=False,
    )
    assert "admin token is wrong" in _one_line_error(result)
    assert [g["name"] for g in system.admin_json("group", "list")] == ["default"]


def test_credentials_from_the_environment(shared_system):
    system = shared_system
    env = {
        **os.environ,
        "BACKHAUL_SERVICE": system.url,
        "BACKHAUL_TOKEN": (system.data_dir / "admin.token").read_text().strip(),
        "BACKHAUL_CA": str(system.data_dir / "ca.pem"),
    }
    import subprocess

    from .harness import BACKHAUL

    result = subprocess.run(BACKHAUL + ["admin", "--json", "group", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["name"] == "default"
    no_ca = {k: v for k, v in env.items() if k != "BACKHAUL_CA"}
    result = subprocess.run(BACKHAUL + ["admin", "group", "list"], capture_output=True, text=True, env=no_ca, timeout=60)
    assert result.returncode == 2 and "BACKHAUL_CA" in result.stderr


def test_unreachable_service_and_wrong_ca(shared_system, tmp_path):
    system = shared_system
    from .harness import free_port

    down = system.cli("admin", "--service", f"https://127.0.0.1:{free_port()}", "--data-dir", str(system.data_dir), "group", "list", check=False)
    assert "cannot reach the service" in _one_line_error(down)
    other = tmp_path / "other"
    system.cli("service", "init", "--data-dir", str(other))
    wrong_ca = system.cli(
        "admin", "--service", system.url, "--data-dir", str(system.data_dir), "--ca", str(other / "ca.pem"), "group", "list", check=False
    )
    assert "expected CA" in _one_line_error(wrong_ca)


def test_connector_list_flags_high_cpu(shared_system):
    import asyncio

    from backhaul.connector import control_client
    from backhaul.connector.state import ConnectorState

    system = shared_system
    state = ConnectorState.load(system.register("busy"))

    async def beat():
        async with control_client.connector_session(state) as session:
            await control_client.heartbeat(state, session, {"version": "7.1", "cpu": 92.0, "memory": 1.0e9, "streams": 4, "bytes_in": 1, "bytes_out": 2})

    asyncio.run(beat())
    try:
        (conn,) = [c for c in system.admin_json("connector", "list") if c["name"] == "busy"]
        assert conn["cpu"] == 92.0 and conn["cpu_warning"] is True and conn["version"] == "7.1"
        human = system.admin("connector", "list").stdout
        assert f"warning: connector {conn['id']} (busy) is at 92% CPU" in human
        assert human.splitlines()[0].split()[:4] == ["ID", "NAME", "GROUP", "STATUS"]
    finally:
        system.admin("connector", "delete", state.connector_id)


def test_concurrent_admin_calls_across_relay_workers_lose_nothing(tmp_path):
    """Two relay worker processes share the store; parallel writes through both all land."""
    import asyncio

    from backhaul.admin.client import request, resolve_target

    with running_relay(tmp_path, workers=2) as system:
        target = resolve_target(service=system.url, token_file=None, data_dir=str(system.data_dir), environ={})

        async def burst():
            sem = asyncio.Semaphore(8)

            async def one(i):
                async with sem:
                    await request(target, "POST", "/v1/groups", {"name": f"g{i:02d}"})
                    await request(target, "POST", "/v1/apps", {"name": f"a{i:02d}", "group": f"g{i:02d}", "proto": "tcp", "port": 30000 + i, "target": "10.0.0.1:80"})

            await asyncio.gather(*(one(i) for i in range(24)))
            return await request(target, "GET", "/v1/groups"), await request(target, "GET", "/v1/apps")

        groups, apps = asyncio.run(asyncio.wait_for(burst(), 120))
        assert [g["name"] for g in groups] == ["default"] + [f"g{i:02d}" for i in range(24)]
        assert [a["name"] for a in apps] == [f"a{i:02d}" for i in range(24)]
        workers = {system.health()["worker"] for _ in range(40)}
        assert workers == {0, 1}, "the kernel should have spread connections over both workers"
