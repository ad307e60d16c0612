"""Several relay nodes on one PostgreSQL store, behind a load balancer: the e2e harness.

Node ``i`` runs on its own loopback address, 127.0.0.(i+1), with its own data dir, listen
port and HTTP edge port; every node binds every TCP app on its own address, at the app's
port, as nodes behind DNS or a load balancer would. ``Cluster.balancer`` puts haproxy (TCP
mode, health checks on each node's listen port, redispatch on a failed connect) in front
of one app port. Readiness is always a real request (a node's /v1/health, the node list,
an echo through an app), never a sleep or a log line. Every process started here is
stopped by ``stop()``, which the test calls in a ``finally``.
"""

from __future__ import annotations

import json
import shutil
import ssl
import time
import urllib.request
from pathlib import Path

from .harness import BACKHAUL, Proc, System, echoes, free_port, wait_until

#: How long a node is given to answer /v1/health after it starts (a cold start forks
#: workers, migrates, registers).
NODE_START_TIMEOUT = 30.0


class Node:
    """One relay node: its address, ports, data dir and process."""

    def __init__(self, cluster: "Cluster", index: int) -> None:
        self.index = index
        self.host = f"127.0.0.{index + 1}"
        self.port = free_port()
        self.http_port = free_port()
        self.data_dir = cluster.workdir / f"node{index}"
        self.url = f"https://{self.host}:{self.port}"
        self.listen = f"{self.host}:{self.port}"
        self.proc: Proc | None = None
        self.id = ""

    def health(self) -> dict:
        ctx = ssl.create_default_context(cafile=str(self.data_dir / "ca.pem"))
        with urllib.request.urlopen(f"{self.url}/v1/health", context=ctx, timeout=2) as response:
            return json.loads(response.read())

    def api(self, path: str, method: str = "GET", body: dict | None = None):
        """Call the node's control API with the admin token (the one of this node's data dir)."""
        ctx = ssl.create_default_context(cafile=str(self.data_dir / "ca.pem"))
        token = (self.data_dir / "admin.token").read_text().strip()
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, context=ctx, timeout=5) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()


class Cluster(System):
    """``count`` relay nodes sharing the PostgreSQL store at ``store_url``, and their connectors.

    It is a System (tests/e2e/harness.py) whose relay is node 0: ``admin``, ``register``,
    ``start_connector`` and ``connector_info`` go to node 0 unless told otherwise.
    """

    def __init__(self, workdir: Path, store_url: str, count: int = 3, env: dict | None = None) -> None:
        super().__init__(workdir, env)
        self.store_url = store_url
        self.nodes = [Node(self, i) for i in range(count)]
        first = self.nodes[0]
        # System's own fields point at node 0, so its helpers work unchanged.
        self.data_dir, self.port, self.url, self.http_port = first.data_dir, first.port, first.url, first.http_port
        self.cluster_key_file: Path | None = None
        self._balancers: list[Proc] = []

    # -------------------------------------------------------------- nodes

    def init(self) -> None:
        """Create the service on node 0, then add the others with a copy of the cluster key."""
        first = self.nodes[0]
        out = json.loads(
            self.cli(
                "service", "init", "--data-dir", str(first.data_dir), "--store", self.store_url,
                "--name", first.host, "--json",
            ).stdout
        )
        self.ca_sha256 = out["ca_sha256"]
        self.cluster_key_file = Path(out["cluster_key_file"])
        for node in self.nodes[1:]:
            copy = self.workdir / f"cluster-key-{node.index}"
            shutil.copyfile(self.cluster_key_file, copy)
            copy.chmod(0o600)
            added = json.loads(
                self.cli(
                    "service", "init", "--data-dir", str(node.data_dir), "--store", self.store_url,
                    "--cluster-key-file", str(copy), "--name", node.host, "--json",
                ).stdout
            )
            assert added["ca_sha256"] == self.ca_sha256, added

    def start_node(self, index: int, workers: int = 1, extra: tuple[str, ...] = (), wait: bool = True) -> Node:
        node = self.nodes[index]
        node.proc = Proc(
            f"node{index}-{len(self.procs)}",
            BACKHAUL
            + ["service", "run", "--data-dir", str(node.data_dir), "--listen", node.listen, "--workers", str(workers)]
            + ["--http", f"{node.host}:{node.http_port}", *extra],
            self.workdir,
            self.env,
        )
        self.procs.append(node.proc)
        if index == 0:
            self.relay = node.proc
        if wait:
            self.wait_node(index)
        return node

    def start_all(self, workers: int = 1, extra: tuple[str, ...] = ()) -> None:
        for index in range(len(self.nodes)):
            self.start_node(index, workers, extra, wait=False)
        for index in range(len(self.nodes)):
            self.wait_node(index)
        self.wait_nodes_up(len(self.nodes))

    def wait_node(self, index: int, timeout: float = NODE_START_TIMEOUT) -> None:
        node = self.nodes[index]

        def ok() -> bool:
            if not node.alive():
                raise AssertionError(f"node {index} exited:\n{node.proc.log()[-3000:]}")
            return node.health().get("status") == "ok"

        wait_until(ok, timeout, f"node {index}'s /v1/health")

    def stop_node(self, index: int, timeout: float = 30.0) -> int | None:
        """SIGTERM the node (it drains) and wait for it to exit."""
        node = self.nodes[index]
        return node.proc.stop(timeout) if node.proc is not None else None

    def kill_node(self, index: int) -> None:
        """SIGKILL the node's whole process group, as a crashed machine would."""
        node = self.nodes[index]
        if node.proc is not None:
            node.proc.kill()

    def node_list(self, via: int | None = None) -> list[dict]:
        """`admin node list --json` through the API of node ``via`` (default: the first one alive)."""
        node = self.nodes[via] if via is not None else next(n for n in self.nodes if n.alive())
        return node.api("/v1/nodes")

    def node_status(self, via: int | None = None) -> dict[str, dict]:
        """Each node's entry in the node list, by its listen address."""
        return {entry["listen"]: entry for entry in self.node_list(via)}

    def wait_nodes_up(self, count: int, timeout: float = 20.0) -> None:
        wait_until(
            lambda: sum(1 for n in self.node_list() if n["status"] == "up") == count,
            timeout, f"{count} nodes up in the node list", interval=0.2,
        )

    def tunnels_per_node(self) -> dict[str, int]:
        """Usable tunnels each up node holds (all connectors), by listen address."""
        return {e["listen"]: e["tunnels"] for e in self.node_list() if e["status"] == "up"}

    def holding(self) -> list[Node]:
        """The nodes holding at least one tunnel now."""
        counts = self.tunnels_per_node()
        return [n for n in self.nodes if counts.get(n.listen, 0) > 0]

    # -------------------------------------------------------------- users

    def wait_app_on(self, index: int, port: int, timeout: float = 20.0) -> float:
        """Seconds until an echo through node ``index``'s listener of the app at ``port`` works."""
        node = self.nodes[index]
        started = time.monotonic()
        wait_until(lambda: echoes(port, host=node.host), timeout, f"the app on {node.host}:{port} to echo", interval=0.05)
        return time.monotonic() - started

    def publish_timed(self, via: int, on: int, name: str, target: str, timeout: float = 10.0) -> tuple[int, float]:
        """Publish a TCP app through node ``via``'s API: its port, and the seconds from the
        request until an echo through node ``on``'s listener of it works."""
        port = free_port()
        started = time.monotonic()
        self.nodes[via].api("/v1/apps", "POST", {"name": name, "proto": "tcp", "port": port, "target": target})
        self.wait_app_on(on, port, timeout=timeout)
        return port, time.monotonic() - started

    def balancer(self, app_port: int) -> int:
        """haproxy in front of every node's listener of the app at ``app_port``; its port.

        Each node is checked every 300 ms on its listen port (fall 2: out within ~0.6 s of
        dying); a connect that fails is retried on another node (redispatch), as a load
        balancer in front of relay nodes would be set up.
        """
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(haproxy).is_file():
            raise AssertionError("haproxy is not installed; tools/bootstrap.sh installs it (the load balancer of these tests)")
        port = free_port()
        root = self.workdir / f"haproxy-{port}"
        root.mkdir()
        servers = "\n".join(
            f"    server n{n.index} {n.host}:{app_port} check port {n.port} inter 300ms fall 2 rise 2" for n in self.nodes
        )
        conf = root / "haproxy.cfg"
        conf.write_text(
            f"""global
    maxconn 2000

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1

frontend app
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance roundrobin
{servers}
"""
        )
        proc = Proc(f"haproxy-{port}", [haproxy, "-db", "-f", str(conf)], self.workdir)
        self.procs.append(proc)
        self._balancers.append(proc)
        wait_until(lambda: echoes(port), 20, "an echo through haproxy", interval=0.1)
        return port
