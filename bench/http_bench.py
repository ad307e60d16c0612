#!/usr/bin/env python3
"""The HTTP edge beside nginx, in one run: small GETs with wrk, and bulk bodies through the edge.

Small requests (``wrk -t1 -cC -dNs --latency``, 100-byte body, keep-alive) on three paths to
the same nginx backend:

- ``direct``       wrk straight to nginx;
- ``nginx-proxy``  nginx as an HTTP reverse proxy in front of it (one worker, upstream keep-alive);
- ``backhaul``     wrk -> relay ``--http`` edge (Host routing, header translation) -> TLS tunnel
                   -> connector -> nginx, set up through the CLI as a user would;
- ``backhaul-tcp`` the same relay and connector, but a TCP app: bytes only, no HTTP parsing,
                   so the difference to ``backhaul`` is what the HTTP layer costs.

Bulk (``--bulk-mib``, default 1024): one upload and one download of that many MiB through the
HTTP edge to an aiohttp app (tests/e2e/backend.py), with throughput and the relay's and
connector's peak RSS, which must stay flat (bodies stream under flow control).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (bench/ is not a package; the line above makes it importable)
from compare import parse_wrk  # noqa: E402
from peers import BenchError, Managed, Processes, free_port, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HOST = "bench.test"
MiB = 1024 * 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each wrk run (default 5)")
    parser.add_argument("--repeat", type=int, default=1, help="wrk runs per path; the median is shown")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--bulk-mib", type=int, default=1024, help="MiB uploaded and downloaded through the edge (0: skip)")
    parser.add_argument(
        "--backhaul",
        default=f"{sys.executable} -m backhaul",
        help="the backhaul command (default: this Python with the repository's src/ first on its path)",
    )
    args = parser.parse_args(argv)
    if args.duration < 1 or args.repeat < 1 or args.bulk_mib < 0:
        parser.error("--duration must be at least 1, --repeat at least 1, --bulk-mib at least 0")
    return args


def probe(port: int, host: str | None = None, path: str = "/") -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200 or (path == "/" and body != peers.BODY):
        raise BenchError(f"GET {path} (Host {host}) on port {port} answered {response.status} with {len(body)} bytes")


def start_nginx_proxy(procs: Processes, backend_port: int) -> tuple[int, Managed]:
    """nginx as an HTTP reverse proxy, one worker, keep-alive to its upstream (the usual setup)."""
    root = procs.workdir / "nginx-proxy"
    root.mkdir()
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(
        peers.nginx_conf(
            root,
            1,
            f"""upstream app {{
        server 127.0.0.1:{backend_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}""",
        )
    )
    nginx = procs.start("nginx-proxy", [peers.find_program("nginx"), "-p", f"{root}/", "-c", str(conf), "-e", f"{root}/error.log"])
    wait_until("nginx reverse proxy", lambda: probe(port), time.monotonic() + peers.READY_TIMEOUT, [nginx])
    return port, nginx


def _cli(backhaul: list[str], *args: str) -> str:
    return peers._run_cli(backhaul + list(args), " ".join(args[:2]))


def start_backhaul(
    procs: Processes, backhaul: list[str], apps: dict[str, str], tcp_target: str
) -> tuple[int, int, Managed, Managed]:
    """A relay with an HTTP edge and one connector; ``apps`` maps host name -> internal URL.

    Also a TCP app to ``tcp_target``; returns the HTTP edge's port and the TCP app's port.
    """
    root = procs.workdir / "backhaul"
    root.mkdir()
    svc, state = root / "svc", root / "conn"
    listen_port, http_port = free_port(), free_port()
    url = f"https://127.0.0.1:{listen_port}"
    init = peers._json_of(_cli(backhaul, "service", "init", "--data-dir", str(svc), "--name", "127.0.0.1", "--json"), "init")
    relay = procs.start(
        "backhaul-relay",
        backhaul + ["service", "run", "--data-dir", str(svc), "--listen", f"127.0.0.1:{listen_port}",
                    "--http", f"127.0.0.1:{http_port}", "--workers", "1"],
        cwd=root,
    )
    wait_until("relay /v1/health", lambda: peers.probe_health(listen_port, svc / "ca.pem"), time.monotonic() + peers.READY_TIMEOUT, [relay])
    admin = ["admin", "--service", url, "--data-dir", str(svc), "--json"]
    token = peers._json_of(_cli(backhaul, *admin, "token", "create"), "token create")["token"]
    _cli(backhaul, "connector", "register", "--service", url, "--token", token, "--ca-sha256", init["ca_sha256"],
         "--state-dir", str(state), "--name", "bench")
    for index, (host, internal) in enumerate(apps.items()):
        _cli(backhaul, *admin, "app", "publish", f"bench-{index}", "--http", host, "--internal-url", internal)
    tcp_port = free_port()
    _cli(backhaul, *admin, "app", "publish", "bench-tcp", "--tcp", str(tcp_port), "--target", tcp_target)
    connector = procs.start(
        "backhaul-connector", backhaul + ["connector", "run", "--state-dir", str(state), "--workers", "1"], cwd=root
    )
    wait_until("the HTTP app through backhaul", lambda: probe(http_port, HOST), time.monotonic() + peers.READY_TIMEOUT, [relay, connector])
    wait_until("the TCP app through backhaul", lambda: probe(tcp_port), time.monotonic() + peers.READY_TIMEOUT, [relay, connector])
    return http_port, tcp_port, relay, connector


def run_wrk(port: int, duration: float, connections: int, host: str | None) -> dict:
    argv = [peers.find_program("wrk"), "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    if host:
        argv += ["-H", f"Host: {host}"]
    argv.append(f"http://127.0.0.1:{port}/")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    if done.returncode != 0:
        raise BenchError(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


def _pattern(size: int):
    block = bytes(i % 251 for i in range(256 * 1024))
    while size > 0:
        yield block[: min(size, len(block))]
        size -= len(block)


def bulk(port: int, host: str | None, size: int, watched: list[Managed]) -> dict:
    """Upload then download ``size`` bytes; MB/s each way and the peak RSS of ``watched``."""
    def rss() -> int:
        return sum(m.usage()["rss_kib"] for m in watched)

    before = rss()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    headers = {"Host": host} if host else {}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        started = time.monotonic()
        conn.request("PUT", "/upload", body=_pattern(size), headers={**headers, "Content-Length": str(size)})
        response = conn.getresponse()
        answer = response.read()
        up = time.monotonic() - started
        if response.status != 200 or f'"size": {size}'.encode() not in answer:
            raise BenchError(f"upload answered {response.status}: {answer[:200]!r}")
        started = time.monotonic()
        conn.request("GET", f"/download?size={size}", headers=headers)
        response = conn.getresponse()
        got = 0
        while chunk := response.read(4 * MiB):
            got += len(chunk)
        down = time.monotonic() - started
        conn.close()
        if got != size:
            raise BenchError(f"download returned {got} of {size} bytes")
    finally:
        stop.set()
        sampler.join()
    return {
        "up_mb_s": size / up / 1e6,
        "down_mb_s": size / down / 1e6,
        "rss_before_mib": before / 1024,
        "rss_peak_mib": peak[0] / 1024,
    }


def start_bulk_app(procs: Processes) -> tuple[int, Managed]:
    """The aiohttp app of the e2e tests: /upload reads the whole body, /download streams one."""
    portfile = procs.workdir / "bulk-app.port"
    app = procs.start("bulk-app", [sys.executable, str(REPO / "tests" / "e2e" / "backend.py"), "http", str(portfile)])

    def ready() -> int:
        if not portfile.exists():
            raise BenchError("the bulk app has not written its port yet")
        return int(portfile.read_text())

    port = wait_until("the bulk app", ready, time.monotonic() + peers.READY_TIMEOUT, [app])
    return port, app


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for program in ("nginx", "wrk"):
        if peers.find_program(program) is None:
            print(f"http_bench: {program} is missing; run tools/bench-deps.sh", file=sys.stderr)
            return 1
    backhaul = shlex.split(args.backhaul)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-http-bench-"))
    procs = Processes(workdir)
    keep = False
    try:
        load = os.getloadavg()[0]
        backend = peers.Backend(procs, "1")
        backend.start()
        proxy_port, proxy = start_nginx_proxy(procs, backend.nginx_port)
        apps = {HOST: f"http://127.0.0.1:{backend.nginx_port}"}
        bulk_port = None
        if args.bulk_mib:
            bulk_port, _ = start_bulk_app(procs)
            apps["bulk.test"] = f"http://127.0.0.1:{bulk_port}"
        edge_port, tcp_port, relay, connector = start_backhaul(procs, backhaul, apps, f"127.0.0.1:{backend.nginx_port}")
        if bulk_port is not None:
            wait_until("the bulk app through backhaul", lambda: probe(edge_port, "bulk.test", "/ready"),
                       time.monotonic() + peers.READY_TIMEOUT, [relay, connector])
        paths = [
            ("direct", "wrk -> nginx", backend.nginx_port, None),
            ("nginx-proxy", "wrk -> nginx reverse proxy -> nginx", proxy_port, None),
            ("backhaul", "wrk -> relay HTTP edge -> tunnel -> connector -> nginx", edge_port, HOST),
            ("backhaul-tcp", "wrk -> relay TCP app -> tunnel -> connector -> nginx (no HTTP layer)", tcp_port, None),
        ]
        runs: dict[str, list[dict]] = {key: [] for key, *_ in paths}
        cpu_before = {"relay": relay.usage()["cpu_s"], "connector": connector.usage()["cpu_s"], "nginx-proxy": proxy.usage()["cpu_s"]}
        for repeat in range(args.repeat):
            order = paths[repeat % len(paths):] + paths[: repeat % len(paths)]
            for key, _, port, host in order:
                runs[key].append(run_wrk(port, args.duration, args.connections, host))
        cpu = {
            "relay": relay.usage()["cpu_s"] - cpu_before["relay"],
            "connector": connector.usage()["cpu_s"] - cpu_before["connector"],
            "nginx-proxy": proxy.usage()["cpu_s"] - cpu_before["nginx-proxy"],
        }
        print(f"\nsmall GETs: wrk -t1 -c{args.connections} -d{args.duration:g}s, 100-byte body, keep-alive; "
              f"median of {args.repeat}; load average before: {load:.2f}")
        print(f"{'path':<13} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}  {'vs direct':>9}  what")
        direct_rps = statistics.median(r["rps"] for r in runs["direct"])
        for key, label, *_ in paths:
            rps = statistics.median(r["rps"] for r in runs[key])
            p50 = statistics.median(r["p50_ms"] for r in runs[key])
            p99 = statistics.median(r["p99_ms"] for r in runs[key])
            errors = sum(r["errors"] for r in runs[key])
            print(f"{key:<13} {rps:>9.0f} {p50:>8.2f} {p99:>8.2f} {errors:>7}  {rps / direct_rps:>8.2f}x  {label}")
        print(f"CPU seconds during the wrk runs: relay {cpu['relay']:.1f}, connector {cpu['connector']:.1f}, "
              f"nginx proxy {cpu['nginx-proxy']:.1f}")
        if bulk_port is not None:
            size = args.bulk_mib * MiB
            direct = bulk(bulk_port, None, size, [])
            through = bulk(edge_port, "bulk.test", size, [relay, connector])
            print(f"\nbulk: {args.bulk_mib} MiB up then down, one connection, aiohttp app")
            print(f"{'path':<13} {'up MB/s':>9} {'down MB/s':>10}  relay+connector RSS")
            print(f"{'direct':<13} {direct['up_mb_s']:>9.0f} {direct['down_mb_s']:>10.0f}")
            print(f"{'backhaul':<13} {through['up_mb_s']:>9.0f} {through['down_mb_s']:>10.0f}  "
                  f"{through['rss_before_mib']:.0f} MiB before, {through['rss_peak_mib']:.0f} MiB at the peak")
        return 0
    except BenchError as exc:
        keep = True
        print(f"http_bench: {exc}\nhttp_bench: logs kept in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop_all()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
