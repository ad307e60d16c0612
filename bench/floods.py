"""The relay under floods: its memory and another app's latency while each runs, one table.

    PYTHONPATH=src .venv/bin/python bench/floods.py [--seconds 30] [--only ping,open,...] [--fd-limit 256]

Set up through the CLI as in the e2e tests (tests/e2e/harness.py): a relay with one
worker, a real connector with one tunnel in front of an echo backend (a TCP app) and an
HTTP backend (an HTTP app), and a hostile client holding a connector certificate of its
own group (tests/security/test_tunnel_floods.py's HostileConnector). Then one flood at a
time, each for ``--seconds``:

- ``ping``, ``open``, ``rst``, ``window``, ``datagram``: the hostile connector dials a tunnel
  and floods that frame without ever reading; when the relay cuts it off it dials again.
- ``idle-tls``: ``--connections`` TLS connections to the listen port with ALPN http/1.1 that
  send nothing.
- ``slow-body``: ``--connections`` HTTP edge requests with ``Content-Length: 100`` and no body.

Meanwhile the relay's RSS (supervisor and workers) is sampled and a second client makes
connect + echo round trips through the real connector (p50 / p99). The last row,
``fd-limit``, runs a second relay with RLIMIT_NOFILE lowered to ``--fd-limit`` and opens
user connections through an app until new ones are refused, and says whether a stream
opened before still carries traffic then. Read the rows against each other; absolute
figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import os
import resource
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.harness import Backend, System, echoes  # noqa: E402
from tests.security.test_tunnel_floods import FloodResult, HostileConnector  # noqa: E402

FRAME_FLOODS = ("ping", "open", "rst", "window", "datagram")
FLOODS = (*FRAME_FLOODS, "idle-tls", "slow-body", "fd-limit")
MiB = 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of each flood (default 30)")
    parser.add_argument("--only", default=",".join(FLOODS), help=f"comma-separated floods, of {','.join(FLOODS)}")
    parser.add_argument("--connections", type=int, default=500, help="connections of idle-tls and slow-body (default 500)")
    parser.add_argument("--fd-limit", type=int, default=256, help="RLIMIT_NOFILE of the fd-limit row's relay (default 256)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(FLOODS))
    if unknown:
        parser.error(f"unknown flood(s) {', '.join(unknown)}; choose from {', '.join(FLOODS)}")
    if args.seconds < 1:
        parser.error("--seconds must be at least 1")
    return args


# ---------------------------------------------------------------------------- probes


class Prober:
    """Connect + echo round trips through the real connector, back to back, in a thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.times: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            if echoes(self.port, b"probe"):
                self.times.append(time.monotonic() - started)
            else:
                self.failed += 1
            self._stop.wait(0.02)

    def __enter__(self) -> "Prober":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(20)

    def percentile(self, q: float) -> float | None:
        if not self.times:
            return None
        ordered = sorted(self.times)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def sample_while(system: System, future: concurrent.futures.Future, seconds: float) -> int:
    """Max RSS (KiB) of the relay while ``future`` runs (bounded by ``seconds`` + 30 s)."""
    peak = system.relay.rss_kib()
    deadline = time.monotonic() + seconds + 30
    while not future.done() and time.monotonic() < deadline:
        peak = max(peak, system.relay.rss_kib())
        time.sleep(0.2)
    return peak


# ---------------------------------------------------------------------------- floods


def frame_flood(hostile: HostileConnector, kind: str, seconds: float) -> str:
    """Flood, redialing each time the relay cuts the tunnel; describe how it was closed."""
    end = time.monotonic() + seconds
    results: list[FloodResult] = []
    dial_errors = 0
    while time.monotonic() < end:
        try:
            results.append(hostile.flood(kind, end - time.monotonic(), close_wait=2.0))
        except (OSError, ssl.SSLError):
            dial_errors += 1
            time.sleep(0.05)
    closed = [r for r in results if r.closed_after is not None]
    if not closed:
        return f"not closed ({len(results)} tunnel(s), {dial_errors} dial errors)"
    told = sum(r.goaway is not None for r in closed)
    median = statistics.median(r.closed_after for r in closed)
    return (
        f"closed by the relay {len(closed)}x, after {median:.2f} s (median); GOAWAY "
        f"ENHANCE_YOUR_CALM seen {told}x; {dial_errors} dial errors"
    )


async def _hold_connections(open_one, count: int, seconds: float) -> str:
    """Open ``count`` connections with ``open_one``, hold them ``seconds``; count the relay's closes."""
    readers = []
    refused = 0
    started = time.monotonic()
    for _ in range(count):
        try:
            readers.append(await asyncio.wait_for(open_one(), 5))
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            refused += 1
    closed_at: list[float] = []
    answers: collections.Counter = collections.Counter()

    async def watch(reader):
        try:
            data = await reader.read(256)
            if data:
                answers[data.split(b"\r\n", 1)[0].decode(errors="replace")[:40]] += 1
                while data:
                    data = await reader.read(4096)
        except (OSError, ssl.SSLError):
            pass
        closed_at.append(time.monotonic() - started)

    tasks = [asyncio.ensure_future(watch(reader)) for reader, _ in readers]
    await asyncio.wait(tasks, timeout=max(0.0, seconds - (time.monotonic() - started)))
    for task in tasks:
        task.cancel()
    for _, writer in readers:
        writer.transport.abort()
    text = f"{len(readers)} open, {refused} refused; {len(closed_at)} closed by the relay"
    if closed_at:
        text += f" (first after {min(closed_at):.1f} s)"
    if answers:
        text += "; answers: " + ", ".join(f"{k!r} x{v}" for k, v in answers.most_common(2))
    return text


def idle_tls(system: System, count: int, seconds: float) -> str:
    ctx = ssl.create_default_context(cafile=str(system.data_dir / "ca.pem"))
    ctx.set_alpn_protocols(["http/1.1"])

    async def open_one():
        return await asyncio.open_connection("127.0.0.1", system.port, ssl=ctx, server_hostname="127.0.0.1")

    return asyncio.run(_hold_connections(open_one, count, seconds))


def slow_body(system: System, host: str, count: int, seconds: float) -> str:
    head = f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100\r\n\r\n".encode()

    async def open_one():
        reader, writer = await asyncio.open_connection("127.0.0.1", system.http_port)
        writer.write(head)
        return reader, writer

    return asyncio.run(_hold_connections(open_one, count, seconds))


def run_flood(name: str, system: System, hostile: HostileConnector, http_host: str, args) -> tuple:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        before = system.relay.rss_kib()
        with Prober(system.app_port) as prober:
            if name in FRAME_FLOODS:
                future = pool.submit(frame_flood, hostile, name, args.seconds)
            elif name == "idle-tls":
                future = pool.submit(idle_tls, system, args.connections, args.seconds)
            else:
                future = pool.submit(slow_body, system, http_host, args.connections, args.seconds)
            peak = sample_while(system, future, args.seconds)
            how = future.result(60)
        time.sleep(1.0)  # let the relay settle before the "after" sample
        after = system.relay.rss_kib()
    return name, before / MiB, peak / MiB, after / MiB, prober.percentile(0.5), prober.percentile(0.99), prober.failed, how


# ---------------------------------------------------------------------------- fd limit


def fd_limit_row(workdir: Path, limit: int) -> str:
    """A relay limited to ``limit`` descriptors: when are new users refused, and do established streams live?"""
    system = System(workdir)
    procs: list = []
    try:
        system.init()
        system.start_relay()
        for pid in system.relay.pids():
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        echo = Backend("echo", workdir, procs)
        system.start_connector("fd", tunnels=1)
        port = system.publish_tcp("echo", echo.target)
        system.wait_app(port)
        established = socket.create_connection(("127.0.0.1", port), timeout=5)
        established.sendall(b"x")
        assert established.recv(1) == b"x"
        opened: list[socket.socket] = []
        refused_run = 0
        first_refused = None
        for _ in range(limit * 2):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                sock.settimeout(2)
                sock.sendall(b"y")
                if sock.recv(1) != b"y":
                    raise OSError("no echo")
                opened.append(sock)
                refused_run = 0
            except OSError:
                first_refused = first_refused or len(opened) + 1
                refused_run += 1
                if refused_run >= 5:
                    break
        fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in system.relay.pids() if os.path.exists(f"/proc/{pid}/fd"))
        try:
            established.sendall(b"z")
            alive = established.recv(1) == b"z"
        except OSError:
            alive = False
        for sock in opened:
            sock.close()
        established.close()
        if first_refused is None:
            return f"limit {limit}: {len(opened)} users accepted, none refused; established stream echoes: {alive}"
        return (
            f"limit {limit}: new users refused from #{first_refused} ({len(opened)} held, relay fds {fds}); "
            f"established stream echoes: {'yes' if alive else 'NO'}"
        )
    finally:
        system.stop()
        for proc in procs:
            proc.stop()


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    fd_row = None
    with tempfile.TemporaryDirectory(prefix="backhaul-floods-") as tmp:
        workdir = Path(tmp)
        procs: list = []
        system = System(workdir / "main")
        (workdir / "main").mkdir()
        try:
            if any(name != "fd-limit" for name in args.only):
                system.init()
                system.start_relay()
                echo = Backend("echo", workdir / "main", procs)
                web = Backend("http", workdir / "main", procs)
                system.start_connector("real", tunnels=1)
                system.app_port = system.publish_tcp("echo", echo.target)
                http_host = "slow.bench.test"
                system.publish_http("web", http_host, f"http://{web.target}")
                system.wait_app(system.app_port)
                system.wait_http(http_host)
                system.admin("group", "create", "hostile")
                hostile = HostileConnector(system.port, system.register("evil", group="hostile"))
                for name in args.only:
                    if name == "fd-limit":
                        continue
                    print(f"flooding: {name} for {args.seconds:g} s ...", file=sys.stderr, flush=True)
                    rows.append(run_flood(name, system, hostile, http_host, args))
        finally:
            system.stop()
            for proc in procs:
                proc.stop()
        if "fd-limit" in args.only:
            print(f"fd-limit: a relay with RLIMIT_NOFILE {args.fd_limit} ...", file=sys.stderr, flush=True)
            (workdir / "fd").mkdir()
            fd_row = fd_limit_row(workdir / "fd", args.fd_limit)
    print(f"\nRelay under floods, {args.seconds:g} s each; probe = connect + echo through a real connector\n")
    header = ("flood", "RSS before", "max", "after MiB", "p50 ms", "p99 ms", "probes failed", "the flood's connections")
    table = [header]
    for name, before, peak, after, p50, p99, failed, how in rows:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        table.append((name, f"{before:.1f}", f"{peak:.1f}", f"{after:.1f}", fmt(p50), fmt(p99), str(failed), how))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    if fd_row is not None:
        print(f"\nfd-limit: {fd_row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
