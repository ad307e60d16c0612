"""Several relay nodes on one PostgreSQL store (issue 13), driven as an operator and users would.

Three nodes on 127.0.0.1-3 (tests/e2e/cluster.py), a real PostgreSQL server started by the
fixture, connectors holding tunnels on two of the nodes, users on any node, haproxy in front
where the test is about a node going away. The figures the closing note quotes (config
propagation, re-home time) are printed with ``-s``.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from .cluster import Cluster
from .harness import EchoLoad, echoes, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path, postgres_url):
    """Three initialized nodes on one PostgreSQL store, not started; all stopped at the end."""
    system = Cluster(tmp_path, postgres_url, count=3)
    try:
        system.init()
        yield system
    finally:
        system.stop()


def _serving_nodes(cluster: Cluster, want: int, timeout: float = 20.0) -> list:
    """Wait until exactly ``want`` nodes hold tunnels (the connector's homes); those nodes."""
    return wait_until(
        lambda: (lambda held: held if len(held) == want else None)(cluster.holding()),
        timeout, f"the connector's tunnels on {want} nodes", interval=0.1,
    )


def _echo_transfer(host: str, port: int, chunks: int, pause: float, errors: list) -> None:
    """One long stream: ``chunks`` 16 KiB echoes, ``pause`` s apart; what went wrong goes in ``errors``."""
    try:
        with socket.create_connection((host, port), timeout=15) as sock:
            for _ in range(chunks):
                data = os.urandom(16 * 1024)
                sock.sendall(data)
                got = b""
                while len(got) < len(data):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise AssertionError(f"the transfer was cut after {len(got)} of {len(data)} bytes of a chunk")
                    got += chunk
                if got != data:
                    raise AssertionError("the echo came back different")
                time.sleep(pause)
    except Exception as exc:  # reported by the test, with every other failure
        errors.append(f"{type(exc).__name__}: {exc}")


def test_users_reach_apps_through_any_node_and_changes_reach_every_node(cluster, backend):
    cluster.start_all()
    echo = backend("echo")
    http = backend("http")
    port = cluster.publish_tcp("echo", echo.target)
    cluster.start_connector("c1", tunnels=None)
    homes = _serving_nodes(cluster, 2)
    [away] = [n for n in cluster.nodes if n not in homes]

    # A user on the node without a tunnel is carried over a relay-to-relay link; the others are local.
    for node in cluster.nodes:
        cluster.wait_app_on(node.index, port)
    assert cluster.tunnels_per_node()[away.listen] == 0, "the forwarding node holds no tunnel of its own"

    # An HTTP app published through one node is served by the HTTP edge of the node without a tunnel.
    cluster.nodes[1].api(
        "/v1/apps", "POST", {"name": "web", "proto": "http", "external_host": "web.test", "internal_url": f"http://{http.target}/"}
    )

    def answered_on_away() -> bool:
        import http.client

        conn = http.client.HTTPConnection(away.host, away.http_port, timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": "web.test"})
            response = conn.getresponse()
            response.read()
            return response.status == 200
        finally:
            conn.close()

    wait_until(answered_on_away, 20, "web.test through the node without a tunnel", interval=0.1)

    # A change made on node 0 reaches node 2 within about a second (timed from the request).
    _, seconds = cluster.publish_timed(0, 2, "echo2", echo.target)
    print(f"\nconfig change on node 0 served by node 2 after {seconds:.3f} s")
    assert seconds < 3.0, f"a published app took {seconds:.2f} s to reach node 2"

    # Revoking the connector on node 1 closes its tunnels on every node, and it stops.
    [entry] = [c for c in cluster.nodes[1].api("/v1/connectors") if c["name"] == "c1"]
    cluster.nodes[1].api(f"/v1/connectors/{entry['id']}", "DELETE")
    wait_until(lambda: sum(cluster.tunnels_per_node().values()) == 0, 10, "no tunnel left on any node", interval=0.1)
    assert cluster.connectors["c1"].popen.wait(20) is not None
    for node in cluster.nodes:
        assert not echoes(port, host=node.host), f"node {node.index} still serves the app after the revocation"


def test_a_killed_node_fails_no_new_connection_and_its_connectors_re_home(cluster, backend):
    cluster.start_all()
    echo = backend("echo")
    port = cluster.publish_tcp("echo", echo.target)
    cluster.start_connector("c1", tunnels=None)
    homes = _serving_nodes(cluster, 2)
    for node in cluster.nodes:
        cluster.wait_app_on(node.index, port)
    lb = cluster.balancer(port)

    load = EchoLoad(lb, clients=6, seconds=8.0, max_each=3000).start()
    time.sleep(2.0)  # load before the crash; the load itself is bounded by its own clock
    victim = homes[0]
    cluster.kill_node(victim.index)
    killed_at = time.monotonic()
    # haproxy checks every 300 ms and takes a node out after 2 failures; a connection started
    # after that must not fail (nor, thanks to redispatch, most of those before).
    noticed = killed_at + 1.0

    survivors = [n for n in cluster.nodes if n is not victim]
    rehomed = wait_until(
        lambda: time.monotonic() if len([n for n in cluster.holding() if n is not victim]) == 2 else None,
        20, "the connector to hold tunnels on the two surviving nodes", interval=0.1,
    )
    print(f"\nconnector re-homed {rehomed - killed_at:.2f} s after the node was killed")
    attempts = load.join()
    late_failures = [a for a in attempts if not a.ok and a.started >= noticed]
    assert attempts and not late_failures, f"{len(late_failures)} connections started after the balancer noticed failed: {late_failures[:3]}"

    down_at = wait_until(
        lambda: time.monotonic() if cluster.node_status(survivors[0].index)[victim.listen]["status"] == "down" else None,
        15, "the killed node to be listed down", interval=0.2,
    )
    print(f"killed node listed down after {down_at - killed_at:.2f} s")
    status = cluster.node_status(survivors[0].index)
    assert set(status) == {n.listen for n in cluster.nodes}, "a down node stays listed"
    assert status[victim.listen]["tunnels"] == 0, "a down node's tunnels no longer count"
    info = cluster.connector_info("c1") if cluster.nodes[0].alive() else {
        c["name"]: c for c in survivors[0].api("/v1/connectors")
    }["c1"]
    live = sum(status[n.listen]["tunnels"] for n in survivors)
    assert info["tunnels"] == live, f"the connector counts {info['tunnels']} tunnels but the live nodes hold {live}"


def test_a_rolling_restart_of_every_node_loses_nothing(cluster, backend):
    cluster.start_all()
    echo = backend("echo")
    port = cluster.publish_tcp("echo", echo.target)
    cluster.start_connector("c1", tunnels=None)
    _serving_nodes(cluster, 2)
    for node in cluster.nodes:
        cluster.wait_app_on(node.index, port)
    lb = cluster.balancer(port)

    errors: list[str] = []
    transfers = [
        threading.Thread(target=_echo_transfer, args=("127.0.0.1", lb, 24, 0.25, errors), daemon=True) for _ in range(3)
    ]
    for thread in transfers:
        thread.start()
    load = EchoLoad(lb, clients=4, seconds=40.0, max_each=20000).start()
    for node in cluster.nodes:
        assert cluster.stop_node(node.index) == 0, f"node {node.index} did not drain and exit cleanly"
        cluster.start_node(node.index)
        cluster.wait_nodes_up(len(cluster.nodes))
        _serving_nodes(cluster, 2)
    for thread in transfers:
        thread.join(60)
    attempts = load.join(90)
    failed = [a for a in attempts if not a.ok]
    assert not errors, f"transfers cut during the rolling restart: {errors}"
    assert attempts and not failed, f"{len(failed)} of {len(attempts)} new connections failed: {failed[:3]}"


def test_a_node_whose_database_connections_were_killed_catches_up(cluster, backend, postgres_server, postgres_shared_db):
    for index in (0, 1):
        cluster.start_node(index)
    cluster.wait_nodes_up(2)
    echo = backend("echo")
    cluster.start_connector("c1", tunnels=None)
    _serving_nodes(cluster, 2)

    killed = postgres_server.terminate_connections(postgres_shared_db)
    assert killed >= 2, "each node holds store connections (its pool and its listener)"
    # A change made right away: node 1's listener is reconnecting, its notification is lost.
    _, seconds = cluster.publish_timed(0, 1, "echo", echo.target)
    print(f"\nnode 1 served an app published just after its store connections were killed after {seconds:.3f} s")
    assert cluster.nodes[1].alive() and cluster.nodes[0].alive(), "losing the store's connections must not end a node"
    status = cluster.node_status()
    assert [status[n.listen]["status"] for n in cluster.nodes[:2]] == ["up", "up"], status
