"""A connector of a service of several relay nodes: tunnels to two distinct nodes, re-homed
when one drains (GOAWAY) or dies (SIGKILL), without a failed connection through the node
that stays.

Four real relay processes on 127.0.0.1..4, one data dir each from the same CA (each node
certificate carries its own address and node id) over one SQLite store file, so the store
lists the four nodes and the relays tell the connector (hello, CONTROL ``nodes``) as they
would on PostgreSQL. A real connector, an echo backend, a TCP app every node serves on its
own address.
"""

from __future__ import annotations

import json
import shutil
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from backhaul import pki
from backhaul.connector.nodes import NodeAddress, rank

from .harness import BACKHAUL, EchoLoad, FaultProxy, Proc, System, echoes, free_port, wait_until

pytestmark = pytest.mark.e2e

class Node:
    """One relay node: its own address, data dir, certificate and node id."""

    def __init__(self, system: System, index: int) -> None:
        self.host = f"127.0.0.{index + 1}"
        self.dir = system.data_dir if index == 0 else system.workdir / f"node-{index}"
        self.id = json.loads((system.data_dir / "service.json").read_text())["node_id"] if index == 0 else pki.new_node_id()
        self.port = system.port if index == 0 else free_port()
        self.listen = f"{self.host}:{self.port}"
        self.proc: Proc | None = None
        if index:
            self._make_dir(system.data_dir)

    def _make_dir(self, first: Path) -> None:
        self.dir.mkdir(mode=0o700)
        for name in ("ca.pem", "ca.key", "admin.token"):
            shutil.copy2(first / name, self.dir / name)
        record = json.loads((first / "service.json").read_text())
        pki.write_file(self.dir / "service.json", json.dumps({**record, "node_id": self.id}).encode())
        key, cert = pki.make_service_cert(pki.load_ca(first), [self.host], node_id=self.id)
        pki.write_private(self.dir / "service.key", pki.key_to_pem(key))
        pki.write_file(self.dir / "service.pem", pki.cert_to_pem(cert))
        (self.dir / "store.sqlite").symlink_to(first / "store.sqlite")  # one store for every node

    def start(self, system: System) -> None:
        argv = BACKHAUL + ["service", "run", "--data-dir", str(self.dir), "--listen", f"{self.host}:{self.port}", "--workers", "1"]
        self.proc = Proc(f"relay-{self.host}", argv, system.workdir, system.env)
        system.procs.append(self.proc)
        ctx = ssl.create_default_context(cafile=str(self.dir / "ca.pem"))

        def healthy() -> bool:
            assert self.proc.alive(), f"relay {self.host} exited:\n{self.proc.log()[-3000:]}"
            with urllib.request.urlopen(f"https://{self.host}:{self.port}/v1/health", context=ctx, timeout=2) as r:
                return json.loads(r.read()).get("status") == "ok"

        wait_until(healthy, 20, f"relay {self.host}'s /v1/health")


def test_a_connector_holds_two_nodes_and_rehomes_on_goaway_and_on_sigkill(tmp_path, backend):
    echo = backend("echo")
    system = System(tmp_path)
    try:
        system.init()
        nodes = [Node(system, i) for i in range(4)]
        for node in nodes:
            node.start(system)
        port = system.publish_tcp("echo", echo.target)  # every node serves it on its own address
        state = system.register("c")  # enrolled at node 0's address
        connector_id = json.loads((state / "connector.json").read_text())["connector_id"]
        system.start_connector("c", workers=1, tunnels=1, extra=("--relay-nodes", "2"))

        # Which nodes hold tunnels is the node list's to say: with peer links every node serves the app.
        def held() -> set:
            return {n["listen"] for n in system.api("/v1/nodes") if n["status"] == "up" and n["tunnels"] > 0}

        # Two nodes, not four: the best ranked for this connector (rendezvous), or node 0 that its
        # first tunnel reached through the enrolled address, and the best ranked other.
        homes = wait_until(lambda: (lambda h: h if len(h) == 2 else None)(held()), 30, "the connector's tunnels on two nodes", interval=0.1)
        by_id = {n.id: n for n in nodes}
        ranked = [by_id[a.id] for a in rank(connector_id, [NodeAddress(n.id, n.host, n.port) for n in nodes])]
        assert homes in ({ranked[0].listen, ranked[1].listen}, {nodes[0].listen, next(n for n in ranked if n is not nodes[0]).listen}), homes
        home = nodes[0]  # the users' node all along (it never goes away)
        spare = [n for n in nodes if n.listen not in homes]
        for node in spare:  # a node without a tunnel forwards (once its poll has seen where they are)
            wait_until(lambda node=node: echoes(port, host=node.host), 10, f"the app through {node.host}, forwarded", interval=0.1)

        # 1. A held node other than node 0 drains: GOAWAY on its tunnels; the connector moves on.
        # Through node 0 (127.0.0.1) all along; bounded by time, not by count.
        load = EchoLoad(port, clients=4, seconds=8.0, max_each=100_000).start()
        wait_until(lambda: len(load.attempts) >= 20, 15, "the load through node 0 to get going")
        first = next(n for n in nodes[1:] if n.listen in homes)
        drained_at = time.monotonic()
        first.proc.signal(15)
        after_drain = wait_until(
            lambda: (lambda h: h if len(h) == 2 and first.listen not in h else None)(held()),
            15, "the connector to re-home off the draining node", interval=0.1,
        )
        rehome_drain = time.monotonic() - drained_at
        first.proc.popen.wait(15)

        # 2. Another held node (not node 0) dies: SIGKILL; the connector moves to the last one.
        second = next(n for n in nodes[1:] if n.listen in after_drain)
        [third] = [n for n in nodes[1:] if n is not first and n is not second]
        killed_at = time.monotonic()
        second.proc.kill()
        # The dead node's rows count until its heartbeat is stale: wait for the two left to hold tunnels.
        wait_until(lambda: {home.listen, third.listen} <= held(), 15, "the connector to re-home after a SIGKILL", interval=0.1)
        rehome_kill = time.monotonic() - killed_at
        attempts = load.join()
        # When node 0 holds no tunnel of its own it forwards to the held nodes: a connection
        # whose stream the SIGKILLed node carried is lost with it. No other may fail: not in
        # the drain, and not after the kill (a stream with no route waits for the re-homing).
        in_flight = [a for a in attempts if not a.ok and a.started < killed_at <= a.ended]
        failed = [a for a in attempts if not a.ok and a not in in_flight]
        assert not failed, f"{len(failed)} of {len(attempts)} through node 0 failed: {failed[:3]}"
        assert len(in_flight) <= 4, f"more lost than the 4 clients had in flight at the kill: {in_flight[:3]}"
        assert len([a for a in attempts if drained_at <= a.started <= killed_at + rehome_kill]) > 20  # it spanned both moves
        assert echoes(port, host=home.host)

        connector = system.connectors["c"]
        lost = connector.log_entries("relay node lost; moving to another")
        assert [e["node"] for e in lost] == [first.id, second.id]
        print(f"re-homed after a drain in {rehome_drain:.2f} s, after a SIGKILL in {rehome_kill:.2f} s; "
              f"{len(attempts)} connections through the node that stayed, none failed")

        # 3. A connector enrolled through a load balancer (a TCP forwarder to node 0): its
        # first tunnel's hello names node 0; it goes on with node 0 and one more at their
        # own addresses, and lets the load balancer's tunnel go once both are up.
        # The killed node is listed until its heartbeat is stale; then home and third are the up nodes.
        wait_until(
            lambda: {n["listen"]: n["status"] for n in system.api("/v1/nodes")}[f"{second.host}:{second.port}"] == "down",
            15, "the killed node to be listed down", interval=0.2,
        )
        system.admin("group", "create", "lb")
        port2 = system.publish_tcp("echo2", echo.target, group="lb")
        balancer = FaultProxy(home.port)
        try:
            system.register("lb", group="lb", service=balancer.url)
            lb = system.start_connector("lb", workers=1, tunnels=1)
            wait_until(lambda: echoes(port2, host=home.host) and echoes(port2, host=third.host), 30, "echo2 on both nodes")
            via = f"127.0.0.1:{balancer.port}"
            wait_until(
                lambda: any(e["relay"] == via for e in lb.log_entries("tunnels to a relay address retired")),
                10, "the load balancer's tunnel to be retired",
            )
            dialed = {e["relay"] for e in lb.log_entries("tunnels to a relay address")}
            assert dialed == {via, home.listen, third.listen}
        finally:
            balancer.close()
    finally:
        system.stop()


def test_users_on_a_node_without_the_tunnel_wait_out_the_rehoming_when_its_holder_dies(tmp_path, backend):
    """The gap the route wait covers (relay.opening, PeeringLimits.route_wait): the users'
    node holds no tunnel and forwards to the node that does; that node is SIGKILLed. Until
    the connector has re-homed to the users' node, no node has a route: the users'
    connections wait for one instead of being refused."""
    echo = backend("echo")
    system = System(tmp_path)
    try:
        system.init()
        nodes = [Node(system, i) for i in range(2)]
        for node in nodes:
            node.start(system)
        port = system.publish_tcp("echo", echo.target)
        system.register("c")
        system.start_connector("c", workers=1, tunnels=1, extra=("--relay-nodes", "1"))

        def holder() -> Node | None:
            held = [n for n in system.api("/v1/nodes") if n["status"] == "up" and n["tunnels"] > 0]
            return next((n for n in nodes if n.listen == held[0]["listen"]), None) if len(held) == 1 else None

        dying = wait_until(holder, 30, "the connector's tunnel on one node", interval=0.1)
        users = next(n for n in nodes if n is not dying)
        wait_until(lambda: echoes(port, host=users.host), 10, f"the app through {users.host}, forwarded", interval=0.1)

        load = EchoLoad(port, clients=4, seconds=6.0, max_each=100_000, host=users.host).start()
        wait_until(lambda: len(load.attempts) >= 20, 15, "the load through the users' node to get going")
        killed_at = time.monotonic()
        dying.proc.kill()
        attempts = load.join()
        # A connection whose stream the dying node carried at the kill is lost with it (its
        # bytes were committed); every one made after the kill waits for the new route.
        failed = [a for a in attempts if not a.ok and a.started >= killed_at]
        in_flight = [a for a in attempts if not a.ok and a.started < killed_at]
        assert not failed, f"{len(failed)} of {len(attempts)} made after the kill through {users.host} failed: {failed[:3]}"
        assert len(in_flight) <= 4, f"more lost than the 4 clients had in flight: {in_flight[:3]}"
        assert len([a for a in attempts if a.started >= killed_at]) > 20, "the load went on past the kill"
        assert echoes(port, host=users.host)
        waited = [a.ended - a.started for a in attempts if a.started >= killed_at]
        print(f"{len(attempts)} connections, {len(in_flight)} lost in flight at the kill, none after it; "
              f"the longest after the kill took {max(waited):.2f} s")
    finally:
        system.stop()
