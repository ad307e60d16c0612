#!/usr/bin/env python3
"""The HTTP edge's machine alone, both builds: CPU microseconds per keep-alive GET.

Sans-I/O, in one process per build: a RequestReader/ExchangeMachine fed wrk's request and
nginx's 100-byte answer, the actions cleared as a connection would carry them out (no
sockets, no tunnel). CPU time (process_time), best of ``--rounds``: the most stable figure
on a shared machine. Each build runs in a child with BACKHAUL_REQUIRE_EXT=1 or
BACKHAUL_PURE=1, so the table says which one was measured. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 18:34:38 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 99 + b"\n"
)


def measure(requests: int, rounds: int) -> None:
    """Run in the child: print "<reader build> <exchange build> <us per request>"."""
    from backhaul.config import HttpLimits
    from backhaul.relay.http import actions, exchange, reader
    from backhaul.relay.http.translate import Route
    from backhaul.store import App

    class Site:
        routes = {"bench.test": Route(App("web", "default", "http", None, None, "bench.test", "http://127.0.0.1:8080"))}
        closing = False
        gate = None

    machine = exchange.ExchangeMachine(
        HttpLimits(), Site(), scheme="http", conn_id="c0", client_ip="127.0.0.1", client="127.0.0.1:5000",
        clock=time.monotonic, trace=False,
    )
    acts, pacing = machine.actions, machine.pacing
    machine.receive(REQUEST)
    machine.link.accepted()
    machine.link.data(RESPONSE)
    acts.clear()
    answered = 0
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(requests):
            machine.receive(REQUEST)
            sent = acts[0] == actions.SEND
            acts.clear()
            pacing.due = None
            machine.link.data(RESPONSE)
            answered += sent and acts[0] == actions.WRITE
            acts.clear()
            pacing.due = None
        best = min(best, time.process_time() - started)
    if answered != rounds * requests:
        raise SystemExit(f"the machine sent and answered {answered} of {rounds * requests} requests")
    # (a tree from before the two builds has no IMPLEMENTATION: one build, Python)
    print(getattr(reader, "IMPLEMENTATION", "python"), getattr(exchange, "IMPLEMENTATION", "python"), f"{best / requests * 1e6:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40_000, help="requests per round (default 40000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is shown (default 5)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure(args.requests, args.rounds)
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    rows = []
    for name, switch in (("cython", "BACKHAUL_REQUIRE_EXT"), ("python", "BACKHAUL_PURE")):
        child_env = {k: v for k, v in env.items() if k not in ("BACKHAUL_PURE", "BACKHAUL_REQUIRE_EXT")}
        child_env[switch] = "1"
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--requests", str(args.requests), "--rounds", str(args.rounds)],
            env=child_env, capture_output=True, text=True,
        )
        if done.returncode != 0:
            print(f"http_machine: the {name} build failed: {done.stderr.strip()}", file=sys.stderr)
            return 1
        rows.append(done.stdout.split())
    print(f"HTTP edge machine, keep-alive GET (reader + exchange + heads), CPU us per request, best of {args.rounds}")
    print(f"{'reader':<8} {'exchange':<9} {'us/req':>7}")
    for reader_build, exchange_build, micros in rows:
        print(f"{reader_build:<8} {exchange_build:<9} {float(micros):>7.2f}")
    print(f"pure / compiled: {float(rows[1][2]) / float(rows[0][2]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
