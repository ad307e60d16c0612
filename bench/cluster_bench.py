#!/usr/bin/env python3
"""Two relay nodes on one PostgreSQL store: a local tunnel versus a forwarded one, in one run.

Node A (127.0.0.1) and node B (127.0.0.2) share a throwaway PostgreSQL server (started as
the tests start theirs, tests/postgres.py). One connector holds its tunnels on one node
only (``--relay-nodes 1``): that node serves the app through a local tunnel; the other one
carries each stream over its relay-to-relay link first. Small requests are ``wrk -t1 -c64
--latency`` against nginx (100-byte body) through the app's port on each node, interleaved
and repeated (the median is shown), as bench/compare.py does. Then the time a config change
made on one node takes to be served by the other (an app published through A's API, timed
from the request until a request through B's listener of the new app is answered).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))

import compare  # noqa: E402  (bench/ is not a package; the lines above make it importable)
import peers  # noqa: E402
from peers import BenchError  # noqa: E402

from tests.postgres import PostgresServer, find_bin_dir  # noqa: E402

#: Seconds a node, the connector or an app is given to come up.
READY_TIMEOUT = 60.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each wrk run (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the median is shown")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--changes", type=int, default=5, help="config changes timed from node A to node B (default 5)")
    parser.add_argument(
        "--backhaul", default=str(REPO / ".venv" / "bin" / "backhaul"), help="the backhaul command to drive"
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.repeat < 1 or args.changes < 1:
        parser.error("--duration must be at least 1 second, --repeat and --changes at least 1")
    return args


def _cli(args, *argv: str) -> str:
    return peers._run_cli([args.backhaul, *argv], " ".join(argv[:2]))


def _json(args, *argv: str) -> dict:
    return peers._json_of(_cli(args, *argv), " ".join(argv[:2]))


def _api(node: dict, path: str, body: dict | None = None):
    """GET (or with ``body``, POST) the node's control API with its admin token."""
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(node["dir"] / "ca.pem"))
    token = (node["dir"] / "admin.token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(f"https://{node['listen']}{path}", data=data, headers=headers)
    with urllib.request.urlopen(request, context=ctx, timeout=5) as response:
        return json.loads(response.read())


def start_cluster(procs: peers.Processes, args, store_url: str) -> list[dict]:
    """Nodes A and B, initialized and running; their facts (host, listen, dir, process)."""
    nodes = []
    key_file = None
    for index, host in enumerate(("127.0.0.1", "127.0.0.2")):
        data_dir = procs.workdir / f"node{index}"
        argv = ["service", "init", "--data-dir", str(data_dir), "--store", store_url, "--name", host, "--json"]
        if key_file is not None:
            argv += ["--cluster-key-file", str(key_file)]
        facts = _json(args, *argv)
        key_file = key_file or Path(facts["cluster_key_file"])
        port = peers.free_port()
        listen = f"{host}:{port}"
        proc = procs.start(
            f"node{index}",
            [args.backhaul, "service", "run", "--data-dir", str(data_dir), "--listen", listen, "--workers", "1"],
        )
        nodes.append({"name": "AB"[index], "host": host, "port": port, "listen": listen, "dir": data_dir, "proc": proc, "ca_sha256": facts["ca_sha256"]})
    deadline = time.monotonic() + READY_TIMEOUT
    for node in nodes:
        peers.wait_until(
            f"node {node['name']} /v1/health",
            lambda node=node: _health(node),
            deadline,
            [node["proc"]],
        )
    return nodes


def _health(node: dict) -> None:
    if _api(node, "/v1/health").get("status") != "ok":
        raise BenchError(f"node {node['name']} is not healthy yet")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for program in ("nginx", "wrk"):
        if peers.find_program(program) is None:
            print(f"cluster_bench: {program} is not installed; tools/bootstrap.sh installs it", file=sys.stderr)
            return 2
    bin_dir = find_bin_dir()
    if bin_dir is None:
        print("cluster_bench: PostgreSQL is not installed; tools/bootstrap.sh installs it", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-cluster-bench-"))
    procs = peers.Processes(workdir)
    atexit.register(procs.stop_all)
    server = PostgresServer(bin_dir)
    atexit.register(server.stop)
    try:
        server.start()
        store_url = server.url(server.create_database())
        backend = peers.Backend(procs, "1")
        backend.start()
        nodes = start_cluster(procs, args, store_url)
        a = nodes[0]
        admin = ["admin", "--service", f"https://{a['listen']}", "--data-dir", str(a["dir"]), "--json"]
        token = _json(args, *admin, "token", "create")["token"]
        state = workdir / "conn"
        _cli(args, "connector", "register", "--service", f"https://{a['listen']}", "--token", token,
             "--ca-sha256", a["ca_sha256"], "--state-dir", str(state), "--name", "bench")
        app_port = peers.free_port()
        _cli(args, *admin, "app", "publish", "bench-nginx", "--tcp", str(app_port), "--target", f"127.0.0.1:{backend.nginx_port}")
        connector = procs.start("connector", [args.backhaul, "connector", "run", "--state-dir", str(state), "--relay-nodes", "1"])
        deadline = time.monotonic() + READY_TIMEOUT

        def one_home() -> dict:
            held = {n["listen"]: n["tunnels"] for n in _api(a, "/v1/nodes") if n["status"] == "up"}
            homes = [n for n in nodes if held.get(n["listen"], 0) > 0]
            if len(homes) != 1:
                raise BenchError(f"the connector's tunnels are on {len(homes)} nodes, not 1")
            return homes[0]

        local = peers.wait_until("the connector's tunnels on one node", one_home, deadline, [connector])
        forwarded = next(n for n in nodes if n is not local)
        for node in nodes:
            peers.wait_until(f"the app through node {node['name']}", lambda node=node: peers.probe_http(app_port, node["host"]), deadline, [connector])
        for node in nodes:  # warm up: links dialed, caches filled
            compare.run_wrk(app_port, 1, args.connections, node["host"])
        rows = {"local": [], "forwarded": []}
        for rep in range(args.repeat):
            order = [("local", local), ("forwarded", forwarded)]
            for key, node in order if rep % 2 == 0 else order[::-1]:
                result = compare.run_wrk(app_port, args.duration, args.connections, node["host"])
                rows[key].append(result)
                print(f"[{key}] run {rep + 1}: {result['rps']:,.0f} req/s, p99 {result['p99_ms']:.2f} ms, {result['errors']} errors", file=sys.stderr)
        propagation = []
        for i in range(args.changes):
            port = peers.free_port()
            # Timed from the API request (a CLI process would add its own start-up).
            started = time.monotonic()
            _api(a, "/v1/apps", {"name": f"change-{i}", "proto": "tcp", "port": port, "target": f"127.0.0.1:{backend.nginx_port}"})
            peers.wait_until(f"change {i} on node B", lambda port=port: peers.probe_http(port, nodes[1]["host"]), time.monotonic() + 30, [connector])
            propagation.append(time.monotonic() - started)
        print(render(rows, local, forwarded, propagation, args))
        return 0
    except BenchError as exc:
        print(f"cluster_bench: {exc}\n(logs in {workdir})", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        server.stop()


def render(rows: dict, local: dict, forwarded: dict, propagation: list[float], args) -> str:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p99_ms")} for k, v in rows.items()}
    errors = {k: sum(r["errors"] for r in v) for k, v in rows.items()}
    lines = [
        f"two relay nodes on PostgreSQL; wrk -t1 -c{args.connections} -d{args.duration:g}s, median of {args.repeat}; "
        f"{len(os.sched_getaffinity(0))} cores",
        "",
        "| path | req/s | p99 ms | errors | vs local |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, label in (("local", f"node {local['name']}, local tunnel"), ("forwarded", f"node {forwarded['name']} -> node {local['name']}, forwarded")):
        ratio = med[key]["rps"] / med["local"]["rps"] if med["local"]["rps"] else 0
        lines.append(f"| {label} | {med[key]['rps']:,.0f} | {med[key]['p99_ms']:.2f} | {errors[key]} | {ratio:.2f}x |")
    lines += [
        "",
        f"config change on node A served by node B: median {statistics.median(propagation):.2f} s, "
        f"max {max(propagation):.2f} s over {len(propagation)} changes",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
