"""Small requests through one relay node with a local tunnel, beside the same through a
forwarded node (user -> node A -> relay-to-relay link -> node B -> B's tunnel -> connector).

Both nodes are RelayWorkers on one event loop thread of this process (tests/e2e/test_peer_links.py
sets them up: own data dirs and node certificates, one store; A's peer directory filled by
hand), the connector and the echo backend are real processes. So the forwarded row pays for
its second relay on the same core as the first: read the ratio, on this machine, in one run.
The users are threads of a client process of their own.

For each path: request/response round trips of ``--size`` bytes over ``--clients`` kept-open
user connections for ``--seconds`` (requests per second, p50, p99), then new connections per
second (connect, one round trip, close) from one client.

    PYTHONPATH=src .venv/bin/python bench/peer_hop.py --seconds 5
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.harness import Backend, echoes, wait_until  # noqa: E402
from tests.e2e.test_peer_links import HOST_A, TwoNodes  # noqa: E402


def _round_trips(port: int, size: int, seconds: float, clients: int) -> tuple[int, list[float]]:
    payload = b"x" * size
    latencies: list[list[float]] = [[] for _ in range(clients)]
    end = time.monotonic() + seconds

    def client(mine: list[float]) -> None:
        with socket.create_connection((HOST_A, port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while time.monotonic() < end:
                started = time.perf_counter()
                sock.sendall(payload)
                got = 0
                while got < size:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise RuntimeError("the app closed the connection")
                    got += len(chunk)
                mine.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(mine,)) for mine in latencies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    flat = sorted(x for mine in latencies for x in mine)
    return len(flat), flat


def _connections(port: int, seconds: float) -> int:
    end = time.monotonic() + seconds
    done = 0
    while time.monotonic() < end:
        if echoes(port, b"hello"):
            done += 1
    return done


def _measure(port: int, args) -> dict:
    count, flat = _round_trips(port, args.size, args.seconds, args.clients)
    return {
        "rps": count / args.seconds,
        "p50": statistics.median(flat) * 1000,
        "p99": flat[int(len(flat) * 0.99) - 1] * 1000,
        "cps": _connections(port, args.seconds) / args.seconds,
    }


def _row(name: str, port: int, args) -> str:
    """Measured by a client process of its own: the relays' process holds its GIL."""
    argv = [sys.executable, __file__, "--client", str(port), "--seconds", str(args.seconds),
            "--size", str(args.size), "--clients", str(args.clients)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=4 * args.seconds + 60, check=True).stdout
    got = json.loads(out)
    return f"| {name} | {got['rps']:,.0f} | {got['p50']:.3f} | {got['p99']:.3f} | {got['cps']:,.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)  # the measuring process: this app port
    args = parser.parse_args()
    if args.client:
        print(json.dumps(_measure(args.client, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        nodes = TwoNodes(work)
        procs: list = []
        try:
            system = nodes.system
            echo = Backend("echo", work, procs)
            port = system.publish_tcp("echo", echo.target)
            nodes.reload()
            system.register("remote", service=nodes.b_url)
            system.start_connector("remote", tunnels=1)
            wait_until(lambda: nodes.local_tunnels(nodes.b) == 1, 30, "the connector's tunnel on B")
            nodes.a_knows_b()
            wait_until(lambda: echoes(port), 30, "the app through A -> B", interval=0.2)
            forwarded = _row("forwarded (A -> B -> connector)", port, args)
            assert nodes.stat(nodes.b, "peer_streams_bridged") > 0
            system.register("local")
            system.start_connector("local", tunnels=1)
            wait_until(lambda: nodes.local_tunnels(nodes.a) == 1, 30, "the local connector's tunnel on A")
            before = nodes.stat(nodes.b, "peer_streams_bridged")
            local = _row("local tunnel (A -> connector)", port, args)
            assert nodes.stat(nodes.b, "peer_streams_bridged") == before, "the local row went through B"
        finally:
            for proc in procs:
                proc.stop()
            nodes.stop()
    print(f"{args.clients} clients, {args.size}-byte requests, {args.seconds:g} s per figure")
    print("| path | req/s | p50 ms | p99 ms | new connections/s |")
    print("| --- | --- | --- | --- | --- |")
    print(local)
    print(forwarded)


if __name__ == "__main__":
    main()
