"""Several relay nodes on one PostgreSQL store, through the CLI as an operator would: the first
node creates the service, a second joins it with a copy of the cluster key (and is refused
without it, or with a wrong one), both run, `admin node list` on either lists both up, and a
clean stop shows the node down at once. Real processes, the real PostgreSQL fixture."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from tests.postgres import PostgresServer, find_bin_dir, require_bin_dir

from .harness import Backend, System, echoes, free_port, running_relay, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]

#: A password the store URL carries: it must be written nowhere but service.json.
PASSWORD = "s3cret-pw-Zq9"


def _init(node: System, url: str, *extra: str, check: bool = True):
    return node.cli("service", "init", "--data-dir", str(node.data_dir), "--store", url, "--name", "127.0.0.1", "--json", *extra, check=check)


def _nodes(node: System) -> dict[str, dict]:
    return {n["id"]: n for n in node.admin_json("node", "list")}


def test_two_nodes_share_one_service_and_list_each_other(tmp_path, postgres_url):
    url = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@", 1)
    assert PASSWORD in url
    one, two = System(tmp_path / "one"), System(tmp_path / "two")
    try:
        # -- the first node creates the service
        made = _init(one, url)
        first = json.loads(made.stdout)
        assert first["joined"] is False and first["cluster_key_file"] == str(one.data_dir / "cluster.key")
        assert PASSWORD not in made.stdout + made.stderr
        for name in ("cluster.key", "service.json", "ca.key", "admin.token"):
            assert stat.S_IMODE((one.data_dir / name).stat().st_mode) == 0o600, name
        service = json.loads((one.data_dir / "service.json").read_text())
        assert (service["store"], service["node_id"]) == (url, first["node_id"])
        assert not (one.data_dir / "store.sqlite").exists()  # the service lives in PostgreSQL

        # -- a second node: refused without the cluster key, and with a wrong one; nothing written
        refused = _init(two, url, check=False)
        assert refused.returncode == 2 and "--cluster-key-file" in refused.stderr and "already holds a relay service" in refused.stderr
        wrong = tmp_path / "wrong.key"
        wrong.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        refused = _init(two, url, "--cluster-key-file", str(wrong), check=False)
        assert refused.returncode == 2 and "is not this service's" in refused.stderr
        assert not two.data_dir.exists() or sorted(p.name for p in two.data_dir.iterdir()) == []

        # -- ... and it joins with a copy of the key
        copy = tmp_path / "copy.key"
        copy.write_bytes((one.data_dir / "cluster.key").read_bytes())
        joined = _init(two, url, "--cluster-key-file", str(copy))
        second = json.loads(joined.stdout)
        assert second["joined"] is True and second["ca_sha256"] == first["ca_sha256"]
        assert second["node_id"] != first["node_id"]
        assert (two.data_dir / "ca.pem").read_bytes() == (one.data_dir / "ca.pem").read_bytes()
        assert (two.data_dir / "admin.token").read_bytes() == (one.data_dir / "admin.token").read_bytes()
        assert (two.data_dir / "cluster.key").read_bytes() == (one.data_dir / "cluster.key").read_bytes()
        assert (two.data_dir / "service.pem").read_bytes() != (one.data_dir / "service.pem").read_bytes()
        for node in (one, two):  # the password is in service.json and nowhere else
            holders = [p.name for p in node.data_dir.iterdir() if p.is_file() and PASSWORD.encode() in p.read_bytes()]
            assert holders == ["service.json"], holders

        # -- both run (one with two workers: registered before its workers fork)
        one.start_relay(workers=1)
        two.start_relay(workers=2)
        for node in (one, two):
            listed = _nodes(node)  # each registered before its listen port opened (its health answered)
            assert {i: (n["status"], n["listen"], n["tunnels"]) for i, n in listed.items()} == {
                first["node_id"]: ("up", f"127.0.0.1:{one.port}", 0),
                second["node_id"]: ("up", f"127.0.0.1:{two.port}", 0),
            }
            assert all(n["version"] and n["last_seen"] > 0 for n in listed.values())
        human = one.admin("node", "list").stdout
        assert first["node_id"] in human and second["node_id"] in human and "up" in human

        # -- a change made on one node is seen through the other (one store)
        one.admin("app", "publish", "db", "--tcp", "25432", "--target", "10.0.0.1:5432")
        assert [a["name"] for a in two.admin_json("app", "list")] == ["db"]

        # -- a clean stop: down at once, still listed
        assert two.relay.stop() == 0
        listed = _nodes(one)
        assert (listed[second["node_id"]]["status"], listed[second["node_id"]]["state"]) == ("down", "stopped")
        assert listed[first["node_id"]]["status"] == "up"
        for proc in (one.relay, two.relay):
            assert PASSWORD not in proc.log_path.read_text(errors="replace")
    finally:
        one.stop()
        two.stop()


def test_a_one_node_sqlite_relay_lists_itself(tmp_path):
    with running_relay(tmp_path) as system:
        node_id = json.loads((system.data_dir / "service.json").read_text())["node_id"]
        [node] = system.admin_json("node", "list")
        assert (node["id"], node["status"], node["listen"], node["tunnels"]) == (node_id, "up", f"127.0.0.1:{system.port}", 0)


@pytest.mark.slow  # its own server, a refused change waits out the store's busy_timeout (10 s)
def test_a_database_outage_keeps_relaying_refuses_changes_and_catches_up(tmp_path):
    server = PostgresServer(require_bin_dir(find_bin_dir(), os.environ))
    node = System(tmp_path / "node")
    try:
        server.start()
        node.ca_sha256 = json.loads(_init(node, server.url()).stdout)["ca_sha256"]
        node.start_relay(workers=1)
        backend = Backend("echo", tmp_path, node.procs)
        port = node.publish_tcp("db", backend.target)
        node.start_connector("c1")
        node.wait_tunnels("c1", 2)
        node.wait_app(port)

        server.halt()
        assert echoes(port)  # a new user connection while the database is away: relayed
        later = free_port()
        refused = node.admin("app", "publish", "web", "--tcp", str(later), "--target", backend.target, check=False)
        assert refused.returncode != 0 and "unavailable" in refused.stderr, refused.stderr
        assert echoes(port) and node.relay.alive()
        assert node.health()["status"] == "ok"
        # A connector that restarts while the database is away serves the config it saved, and
        # the relay accepts its tunnels on the record it last read of it: the app is served again.
        node.connectors["c1"].kill()
        node.start_connector("c1")
        node.wait_app(port, timeout=30)

        server.launch()
        # The pool reconnects with a backoff: the first changes may still be refused.
        wait_until(
            lambda: node.admin("app", "publish", "web", "--tcp", str(later), "--target", backend.target, check=False).returncode == 0,
            30, "a change accepted once the database is back", interval=0.5,
        )
        node.wait_app(later, timeout=10)  # the relay caught up with the change
        # The tunnels that came up during the outage are counted once the store answers again.
        node.wait_tunnels("c1", 2)
        assert {n["status"] for n in node.admin_json("node", "list")} == {"up"}
    finally:
        node.stop()
        server.stop()
