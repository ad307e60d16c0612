#!/usr/bin/env python3
"""The data path's own CPU cost, compiled and pure, without TLS and without other processes.

One process, one uvloop: a user socket -> ``Pipe`` -> relay ``Tunnel`` -> a loopback TCP
connection -> connector ``Tunnel`` -> ``Pipe`` -> a backend socket, and back. Everything
that runs is backhaul's data path plus the test's own client and backend, so the process's
CPU time (``time.process_time``) per round trip and per GB, minus the same client and
backend connected directly, is what the mux, the tunnels and the pipes cost. CPU time,
not wall time: the figure stays meaningful on a shared machine, where bench/compare.py's
throughput does not. Each build runs in its own child process (the twins are picked at
import: ``backhaul.twins``). TLS is left out on purpose: its cost is the same for every
build (bench/compare.py measures the whole path, TLS included).

    .venv/bin/python bench/datapath.py [--round-trips N] [--megabytes M] [--builds cython,python]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

ROUND_TRIP_BYTES = 100
BULK_CHUNK = 256 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=20_000, help="round trips over 16 connections (default 20000)")
    parser.add_argument("--megabytes", type=int, default=1024, help="MB of the one-stream bulk run (default 1024)")
    parser.add_argument("--builds", default="cython,python", help="which twins to measure (default cython,python)")
    parser.add_argument("--child", choices=("cython", "python"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- the child


class _Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class _Sink(asyncio.Protocol):
    """The bulk backend: counts bytes and says when the expected number arrived."""

    def __init__(self, expected: int, done: asyncio.Future) -> None:
        self.expected = expected
        self.done = done
        self.got = 0

    def data_received(self, data):
        self.got += len(data)
        if self.got >= self.expected and not self.done.done():
            self.done.set_result(self.got)


class _PingPong(asyncio.Protocol):
    """A client that sends 100 bytes and waits for them back, ``rounds`` times."""

    def __init__(self, rounds: int, done: asyncio.Future) -> None:
        self.rounds = rounds
        self.done = done
        self.payload = b"x" * ROUND_TRIP_BYTES
        self.pending = 0

    def connection_made(self, transport):
        self.transport = transport
        self._send()

    def _send(self):
        self.pending = ROUND_TRIP_BYTES
        self.transport.write(self.payload)

    def data_received(self, data):
        self.pending -= len(data)
        if self.pending > 0:
            return
        self.rounds -= 1
        if self.rounds:
            self._send()
        elif not self.done.done():
            self.done.set_result(None)
            self.transport.close()


class _Blaster(asyncio.Protocol):
    """A client that writes ``total`` bytes as fast as the path takes them."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.chunk = b"\0" * BULK_CHUNK
        self.paused = False

    def connection_made(self, transport):
        self.transport = transport
        self._fill()

    def _fill(self):
        while self.total > 0 and not self.paused:
            n = min(self.total, BULK_CHUNK)
            self.transport.write(self.chunk[:n] if n < BULK_CHUNK else self.chunk)
            self.total -= n
        if self.total <= 0:
            self.transport.write_eof()

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self._fill()


async def _measure(args) -> dict:
    from backhaul.config import FlowControl, Keepalive
    from backhaul.protocol import framing, mux
    from backhaul.transport.pipe import Pipe
    from backhaul.transport.tunnel import Tunnel

    loop = asyncio.get_running_loop()
    flow = FlowControl()
    buffer = memoryview(bytearray(256 * 1024))
    tunnels: dict[str, Tunnel] = {}
    up = loop.create_future()
    backend_port = {"port": 0}

    class Owner:
        def __init__(self, side):
            self.side = side

        def tunnel_up(self, tunnel):
            tunnels[self.side] = tunnel
            if len(tunnels) == 2 and not up.done():
                up.set_result(None)

        def tunnel_down(self, tunnel, code, reason):
            pass

        def stream_opened(self, tunnel, stream_id, meta):
            pipe = Pipe(flow, {}, buffer)
            pipe.tunnel = tunnel
            pipe.stream_id = stream_id

            async def connect():
                await loop.create_connection(lambda: pipe, "127.0.0.1", backend_port["port"])
                tunnel.accept(stream_id, pipe)
                pipe.start()

            loop.create_task(connect())

        def control_received(self, tunnel, message):
            pass

        def goaway_received(self, tunnel, code, reason):
            pass

        def datagram_received(self, tunnel, flow_id, data):
            pass

    server = await loop.create_server(
        lambda: Tunnel(mux.Session(mux.Role.CONNECTOR, flow, Keepalive()), Owner("connector"), "connector", flow),
        "127.0.0.1", 0,
    )
    await loop.create_connection(
        lambda: Tunnel(mux.Session(mux.Role.RELAY, flow, Keepalive()), Owner("relay"), "relay", flow),
        "127.0.0.1", server.sockets[0].getsockname()[1],
    )
    await up

    class UserPipe(Pipe):
        __slots__ = ()

        def connection_made(self, transport):
            super().connection_made(transport)
            self.tunnel = tunnels["relay"]
            self.stream_id = self.tunnel.open({"app": "bench"}, self)

    edge = await loop.create_server(lambda: UserPipe(flow, {}, buffer), "127.0.0.1", 0)
    edge_port = edge.sockets[0].getsockname()[1]

    async def ping_pong(port: int) -> tuple[float, float]:
        per = args.round_trips // 16
        futures = [loop.create_future() for _ in range(16)]
        cpu, wall = time.process_time(), time.perf_counter()
        for fut in futures:
            await loop.create_connection(lambda f=fut: _PingPong(per, f), "127.0.0.1", port)
        await asyncio.wait_for(asyncio.gather(*futures), 120)
        return time.process_time() - cpu, time.perf_counter() - wall

    async def bulk(port: int, total: int) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        await loop.create_connection(lambda: _Blaster(total), "127.0.0.1", port)
        await asyncio.wait_for(sink_done[0], 120)
        return time.process_time() - cpu, time.perf_counter() - wall

    results = {"build": framing.IMPLEMENTATION, "mux": getattr(mux, "IMPLEMENTATION", "python")}
    echo = await loop.create_server(_Echo, "127.0.0.1", 0)
    backend_port["port"] = echo.sockets[0].getsockname()[1]
    direct_cpu, direct_wall = await ping_pong(backend_port["port"])
    results["direct_rtt_per_s"] = args.round_trips / direct_wall
    user, system = os.times()[:2]
    path_cpu, path_wall = await ping_pong(edge_port)
    user2, system2 = os.times()[:2]
    results["rtt_user_share"] = (user2 - user) / max(1e-9, (user2 - user) + (system2 - system))
    results["rtt_per_s"] = args.round_trips / path_wall
    results["rtt_cpu_us"] = (path_cpu - direct_cpu) / args.round_trips * 1e6
    echo.close()

    total = args.megabytes * 1_000_000
    sink_done = [loop.create_future()]
    sink = await loop.create_server(lambda: _Sink(total, sink_done[0]), "127.0.0.1", 0)
    backend_port["port"] = sink.sockets[0].getsockname()[1]
    direct_cpu, _ = await bulk(backend_port["port"], total)
    sink_done[0] = loop.create_future()
    path_cpu, path_wall = await bulk(edge_port, total)
    results["bulk_gbit_s"] = total * 8 / path_wall / 1e9
    results["bulk_cpu_s_gb"] = (path_cpu - direct_cpu) / (total / 1e9)
    return results


def child(args) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_measure(args))))


# ---------------------------------------------------------------------------- the table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    rows = []
    for build in args.builds.split(","):
        env = dict(os.environ)
        env.pop("BACKHAUL_PURE", None)
        env.pop("BACKHAUL_REQUIRE_EXT", None)
        env["BACKHAUL_PURE" if build == "python" else "BACKHAUL_REQUIRE_EXT"] = "1"
        out = subprocess.run(
            [sys.executable, __file__, "--child", build, "--round-trips", str(args.round_trips),
             "--megabytes", str(args.megabytes)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"data path in one process, no TLS: {args.round_trips} round trips of {ROUND_TRIP_BYTES} B over 16 "
          f"connections; {args.megabytes} MB one stream (CPU minus the same client and backend connected directly)")
    print("| build | round trips/s | CPU us per round trip | bulk Gbit/s | CPU s per GB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['build']} | {row['rtt_per_s']:,.0f} | {row['rtt_cpu_us']:.1f} | "
              f"{row['bulk_gbit_s']:.2f} | {row['bulk_cpu_s_gb']:.3f} |")
    if len(rows) == 2:
        slow = rows[1]["rtt_cpu_us"] / rows[0]["rtt_cpu_us"]
        print(f"pure / compiled CPU per round trip: {slow:.2f}x; per GB: "
              f"{rows[1]['bulk_cpu_s_gb'] / rows[0]['bulk_cpu_s_gb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
