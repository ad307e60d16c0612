#!/usr/bin/env python3
"""Compare backhaul's full path with reference relays, side by side, in one run; print one table.

Paths: direct to the backend, haproxy (mode tcp), OpenSSH ``ssh -R`` (aes128-gcm,
TCP_NODELAY), an stunnel mutual-TLS pair, v2ray's reverse proxy (bridge -> portal, VLESS +
TLS, mux), and backhaul (user -> relay app port -> TLS tunnel -> connector -> backend).
Small requests: ``wrk -t1 -c64 -dNs --latency`` against nginx serving a 100-byte body with
keep-alive. Bulk: ``iperf3 -c 127.0.0.1 -t N -P 1`` and ``-P 8``. Measurements of the
different paths are interleaved and repeated; the median of the repeats is reported, with
the CPU the path's own processes used per 1,000 requests and per GB. ``--plot`` draws the
table as a PNG. See bench/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chart  # noqa: E402  (bench/ is not a package; the line above makes it importable)
import peers  # noqa: E402
from peers import BenchError, Route  # noqa: E402

from backhaul.progress import Progress  # noqa: E402  (peers.py runs backhaul too: it is installed)

REPO = Path(__file__).resolve().parent.parent
PATH_KEYS = ("direct", "haproxy", "ssh", "stunnel", "v2ray", "backhaul")
PROGRAMS = ("nginx", "haproxy", "iperf3", "wrk", "ssh", "sshd", "ssh-keygen")
#: Peers measured only where their program is installed: path key -> (programs, any of
#: which will do; the Debian package that has them). A missing one is skipped, not fatal.
OPTIONAL_PEERS = {
    "stunnel": (("stunnel4", "stunnel"), "stunnel4"),
    "v2ray": (("v2ray",), "v2ray"),
}
#: The byte count CPU-seconds per "GB" are given for (decimal, as Gbit/s are).
GB = 1e9

#: The targets of BASELINES.md for backhaul's full path.
TARGET_RPS = 30_000
TARGET_P99_MS = 5.0
#: "aiming at OpenSSH -R with TCP_NODELAY (~0.85x a single haproxy hop)".
AIM_HAPROXY_RATIO = 0.85
#: A 1-minute load average above this before the run means another job shares the CPUs.
BUSY_LOAD = 0.5
#: How long a path may take to close the previous iperf3 test's connections at the server.
LINGER_TIMEOUT = 10.0

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each wrk run (default 5)")
    parser.add_argument(
        "--iperf-duration", type=float, default=None, help="seconds of each iperf3 run (default: --duration)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the median is shown")
    parser.add_argument(
        "--only",
        default=",".join(PATH_KEYS),
        help=f"comma-separated paths to measure, of {','.join(PATH_KEYS)} (default: all)",
    )
    parser.add_argument("--json", metavar="OUT", help="also write every result to this JSON file")
    parser.add_argument("--plot", metavar="FILE", help="also draw the table as a PNG chart (needs matplotlib)")
    parser.add_argument(
        "--backhaul", default=str(REPO / ".venv" / "bin" / "backhaul"), help="the backhaul command to drive"
    )
    parser.add_argument(
        "--workers",
        default="1",
        help="relay and connector worker counts to measure, comma-separated; 1 is always included "
        "(so --workers 2 reports both 1 and 2)",
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--nginx-workers", default="1", help="nginx worker_processes (default 1)")
    args = parser.parse_args(argv)
    if args.iperf_duration is None:
        args.iperf_duration = args.duration
    if args.duration < 1 or args.iperf_duration < 1:
        parser.error("--duration and --iperf-duration must be at least 1 second")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(only) - set(PATH_KEYS))
    if unknown or not only:
        parser.error(f"--only takes a comma-separated list of {', '.join(PATH_KEYS)}; got {args.only!r}")
    args.only = [k for k in PATH_KEYS if k in only]
    try:
        workers = {int(w) for w in args.workers.split(",") if w.strip()}
    except ValueError:
        parser.error(f"--workers takes comma-separated positive integers; got {args.workers!r}")
    if any(w < 1 for w in workers):
        parser.error("--workers values must be at least 1")
    args.workers = sorted(workers | {1})
    if args.plot:
        # Before any server starts or anything is measured.
        try:
            chart.require()
        except chart.ChartError as exc:
            parser.error(str(exc))
    return args


def missing_peer(key: str) -> str | None:
    """Why the optional peer ``key`` cannot be measured here (its program is missing), or None."""
    if key not in OPTIONAL_PEERS:
        return None
    programs, package = OPTIONAL_PEERS[key]
    if any(peers.find_program(p) for p in programs):
        return None
    return f"{' or '.join(programs)} is not installed (tools/bench-deps.sh installs Debian's {package})"


def ensure_programs(only: list[str]) -> None:
    """Install the benchmark's programs with tools/bench-deps.sh when any is missing.

    The optional peers' programs only for the paths selected; when they still cannot be
    found (or the script could not run) those paths are skipped later, with a line saying so."""
    missing = [p for p in PROGRAMS if peers.find_program(p) is None]
    peers_missing = [k for k in only if missing_peer(k)]
    if not missing and not peers_missing:
        return
    print(f"missing {', '.join(missing + peers_missing)}: running tools/bench-deps.sh", file=sys.stderr)
    done = subprocess.run(["bash", str(REPO / "tools" / "bench-deps.sh")])
    still = [p for p in PROGRAMS if peers.find_program(p) is None]
    if still:
        raise BenchError(f"tools/bench-deps.sh ran (status {done.returncode}) but {', '.join(still)} still cannot be found")


def _to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> dict:
    """req/s, p50/p99 in ms, request and error counts from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    requests = re.search(r"^\s*(\d+) requests in", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rps and requests and p50 and p99):
        raise BenchError(f"cannot read wrk output:\n{output}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _to_ms(p50.group(1)),
        "p99_ms": _to_ms(p99.group(1)),
        "requests": int(requests.group(1)),
        "errors": errors,
    }


def run_wrk(port: int, duration: float, connections: int, host: str = "127.0.0.1") -> dict:
    """One ``wrk -t1 -cC -dNs --latency`` run against nginx through ``host:port``."""
    argv = [
        peers.find_program("wrk"),
        "-t1",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        f"http://{host}:{port}/",
    ]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk through port {port} did not finish") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    result = parse_wrk(done.stdout)
    if result["requests"] == 0:
        raise BenchError("wrk completed no request")
    return result


def run_iperf(route: Route, duration: float, parallel: int) -> dict:
    """One ``iperf3 -c -t N -P n -J`` run through the path; Gbit/s received by the server."""
    outcome: dict = {}
    if not route.iperf.wait_idle(LINGER_TIMEOUT):
        # The previous test's connections were never closed through this path; iperf3
        # would refuse this test as "busy". Note it and start a fresh server.
        outcome["lingered"] = route.iperf.busy_connections()
        route.iperf.start()
    argv = [
        peers.find_program("iperf3"),
        "-c", "127.0.0.1",
        "-p", str(route.iperf_port),
        "-t", f"{duration:g}",
        "-P", str(parallel),
        "--connect-timeout", "5000",
        "-J",
    ]
    try:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"iperf3 through port {route.iperf_port} did not finish") from exc
        try:
            report = json.loads(done.stdout)
        except ValueError as exc:
            raise BenchError(f"iperf3 printed no JSON (status {done.returncode}): {done.stderr.strip()}") from exc
        if "error" in report or done.returncode != 0:
            raise BenchError(f"iperf3: {report.get('error', f'exit status {done.returncode}')}")
    except BenchError:
        # A test that broke half-way can leave the one-test-at-a-time server stuck.
        route.iperf.start()
        raise
    outcome["gbps"] = report["end"]["sum_received"]["bits_per_second"] / 1e9
    outcome["bytes"] = report["end"]["sum_received"]["bytes"]
    return outcome


def warm_up(route: Route) -> None:
    """One small iperf3 transfer through the path, retried until the bulk port works too."""
    deadline = time.monotonic() + peers.READY_TIMEOUT

    def transfer() -> None:
        argv = [peers.find_program("iperf3"), "-c", "127.0.0.1", "-p", str(route.iperf_port), "-n", "4M", "-J"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired as exc:
            route.iperf.start()
            raise BenchError(f"iperf3 warm-up through {route.key} did not finish in 20 s") from exc
        if done.returncode != 0:
            route.iperf.start()
            raise BenchError(f"iperf3 warm-up through {route.key}: {done.stdout.strip()[-300:]}")

    peers.wait_until(f"{route.key} bulk port", transfer, deadline, list(route.roles.values()))


def start_routes(
    procs: peers.Processes, backend: peers.Backend, args
) -> tuple[list[Route], dict[str, str], dict[str, str]]:
    """Start every selected path; a path that fails to start is reported, not fatal, and an
    optional peer whose program is missing is skipped. Routes, failed and skipped (key -> why)."""
    routes, failed, skipped = [], {}, {}
    starters = []
    for key in args.only:
        reason = missing_peer(key)
        if reason:
            skipped[key] = reason
            print(f"[{key}] skipped: {reason}", file=sys.stderr)
        elif key == "direct":
            starters.append(("direct", backend.direct))
        elif key == "haproxy":
            starters.append(("haproxy", lambda: peers.start_haproxy(procs, backend)))
        elif key == "ssh":
            starters.append(("ssh", lambda: peers.start_ssh_tunnel(procs, backend)))
        elif key == "stunnel":
            starters.append(("stunnel", lambda: peers.start_stunnel(procs, backend, args.backhaul)))
        elif key == "v2ray":
            starters.append(("v2ray", lambda: peers.start_v2ray(procs, backend, args.backhaul)))
        else:
            for workers in args.workers:
                starters.append(
                    (f"backhaul-w{workers}", lambda w=workers: peers.start_backhaul(procs, backend, args.backhaul, w))
                )
    for key, start in starters:
        try:
            route = start()
            warm_up(route)
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            failed[key] = str(exc)
            print(f"[{key}] could not be set up: {exc}", file=sys.stderr)
            continue
        routes.append(route)
        print(f"[{key}] ready", file=sys.stderr)
    return routes, failed, skipped


def with_cpu(route: Route, run) -> dict:
    """``run(route)``'s outcome, with the CPU seconds each of the path's processes used
    during it (``cpu_s``: role -> seconds; empty for a path with no process of its own)."""
    before = route.cpu()
    outcome = run(route)
    after = route.cpu()
    outcome["cpu_s"] = {role: round(after[role] - before[role], 3) for role in before}
    return outcome


def cpu_cost(cpu_s: dict[str, float], amount: float, per: float) -> dict[str, float] | None:
    """CPU cost per ``per`` units of work, per process and in ``total``, from the CPU seconds
    of one run that did ``amount`` units: ``cpu_cost(cpu, bytes, GB)`` is CPU-seconds per GB,
    ``cpu_cost(cpu_ms, requests, 1000)`` CPU-ms per 1,000 requests. None without work or processes."""
    if not cpu_s or amount <= 0:
        return None
    cost = {role: seconds * per / amount for role, seconds in cpu_s.items()}
    cost["total"] = sum(cost.values())
    return cost


def median_cost(costs: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Per key (each process, and total), the median over the runs that have a cost."""
    present = [c for c in costs if c]
    if not present:
        return None
    return {key: statistics.median(c[key] for c in present) for key in present[0]}


def measure(routes: list[Route], args) -> dict[str, dict[str, list]]:
    """All measurements, interleaved across paths, ``--repeat`` times. key -> test -> results."""
    tests = [
        ("wrk", lambda route: run_wrk(route.http_port, args.duration, args.connections)),
        ("bulk1", lambda route: run_iperf(route, args.iperf_duration, 1)),
        ("bulk8", lambda route: run_iperf(route, args.iperf_duration, 8)),
    ]
    results: dict[str, dict[str, list]] = {r.key: {t: [] for t, _ in tests} for r in routes}
    runs = args.repeat * len(tests) * len(routes)
    # A line on a terminal (which run, how many left, the time); on a pipe only the run lines.
    with Progress("measuring", total=runs, unit="runs") as progress:
        for rep in range(args.repeat):
            for test, run in tests:
                # Rotate the order each repeat so no path always runs first (or right after another).
                shift = rep % len(routes)
                for route in routes[shift:] + routes[:shift]:
                    progress.stage(f"[{route.key}] {test} run {rep + 1}/{args.repeat}")
                    try:
                        with progress.ticking():
                            outcome = with_cpu(route, run)
                    except BenchError as exc:
                        outcome = {"error": str(exc)}
                        progress.echo(f"[{route.key}] {test} run {rep + 1} failed: {exc}")
                    results[route.key][test].append(outcome)
                    progress.advance(1)
                    progress.echo(f"[{route.key}] {test} run {rep + 1}: {_brief(outcome)}")
    return results


def _brief(outcome: dict) -> str:
    if "error" in outcome:
        return "error"
    if "rps" in outcome:
        return f"{outcome['rps']:,.0f} req/s, p50 {outcome['p50_ms']:.2f} ms, p99 {outcome['p99_ms']:.2f} ms"
    return f"{outcome['gbps']:.2f} Gbit/s"


def summarize(results: dict[str, dict[str, list]]) -> dict[str, dict]:
    """Median of the successful runs of each measurement; None where every run failed."""
    summary = {}
    for key, tests in results.items():
        row: dict = {}
        wrk_ok = [r for r in tests["wrk"] if "error" not in r]
        for field in ("rps", "p50_ms", "p99_ms"):
            row[field] = statistics.median(r[field] for r in wrk_ok) if wrk_ok else None
        row["wrk_errors"] = sum(r["errors"] for r in wrk_ok)
        # CPU-ms (seconds x 1000) per 1,000 requests.
        row["cpu_ms_per_1k_req"] = median_cost(
            [cpu_cost({k: v * 1000 for k, v in r.get("cpu_s", {}).items()}, r["requests"], 1000) for r in wrk_ok]
        )
        for test in ("bulk1", "bulk8"):
            ok = [r for r in tests[test] if "error" not in r]
            row[test] = statistics.median(r["gbps"] for r in ok) if ok else None
            row[f"cpu_s_per_gb_{test}"] = median_cost([cpu_cost(r.get("cpu_s", {}), r["bytes"], GB) for r in ok])
        row["failed_runs"] = sum(1 for runs in tests.values() for r in runs if "error" in r)
        row["lingered_runs"] = sum(1 for runs in tests.values() for r in runs if "lingered" in r)
        summary[key] = row
    return summary


def _one_line(reason: str) -> str:
    """The first line of an error, and its last (a server log's last word) when they differ."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if not lines:
        return "(no reason given)"
    text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    # It goes into a Markdown table cell.
    return text.replace("|", "/")


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ratio(value, base) -> str:
    if value is None or not base:
        return "—"
    return f"{value / base:.2f}×"


def _total(cost: dict | None):
    return None if cost is None else cost["total"]


def cpu_breakdown(cost: dict | None, spec: str) -> str:
    """``relay 2.10 + connector 2.60 = 4.70`` (one process: just its figure); — without one."""
    if cost is None:
        return "—"
    parts = [f"{role} {format(v, spec)}" for role, v in cost.items() if role != "total"]
    if len(parts) == 1:
        return parts[0]
    return " + ".join(parts) + f" = {format(cost['total'], spec)}"


def render(
    routes: list[Route],
    summary: dict,
    usage_before: dict,
    usage_after: dict,
    failed: dict,
    load: dict,
    args,
    skipped: dict | None = None,
) -> str:
    """The one table, ratios vs direct, CPU per unit of work, memory, and the BASELINES target lines."""
    lines = [
        f"backhaul comparison on {platform.node()} ({len(os.sched_getaffinity(0))} cores), "
        f"{time.strftime('%Y-%m-%d %H:%M')}; median of {args.repeat} interleaved run(s)",
        f"small requests: wrk -t1 -c{args.connections} -d{args.duration:g}s --latency, nginx 100-byte body, "
        f"keep-alive; bulk: iperf3 -t {args.iperf_duration:g} -P 1 / -P 8",
        f"load average (1 min) before the servers started: {load['before']:.2f}, after the run (its own load included): {load['after']:.2f}"
        + ("  — something else was using the CPU; figures are noisier" if load["before"] > BUSY_LOAD else ""),
        "",
        "| path | req/s | p50 ms | p99 ms | bulk 1 stream Gbit/s | bulk 8 streams Gbit/s "
        "| req/s vs direct | 1 stream vs direct | 8 streams vs direct "
        "| CPU-ms / 1k req | CPU-s / GB 1 stream | CPU-s / GB 8 streams |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    direct = summary.get("direct", {})
    for route in routes:
        row = summary[route.key]
        notes = []
        if row["wrk_errors"]:
            notes.append(f"{row['wrk_errors']} wrk errors")
        if row["failed_runs"]:
            notes.append(f"{row['failed_runs']} failed runs")
        if row["lingered_runs"]:
            notes.append(
                f"{row['lingered_runs']}× the previous iperf3 test's connections were still open "
                f"{LINGER_TIMEOUT:g} s later"
            )
        label = route.label + (f" ({'; '.join(notes)})" if notes else "")
        lines.append(
            f"| {label} | {_fmt(row['rps'], ',.0f')} | {_fmt(row['p50_ms'], '.2f')} | {_fmt(row['p99_ms'], '.2f')} "
            f"| {_fmt(row['bulk1'], '.2f')} | {_fmt(row['bulk8'], '.2f')} "
            f"| {_ratio(row['rps'], direct.get('rps'))} | {_ratio(row['bulk1'], direct.get('bulk1'))} "
            f"| {_ratio(row['bulk8'], direct.get('bulk8'))} "
            f"| {_fmt(_total(row['cpu_ms_per_1k_req']), '.1f')} | {_fmt(_total(row['cpu_s_per_gb_bulk1']), '.2f')} "
            f"| {_fmt(_total(row['cpu_s_per_gb_bulk8']), '.2f')} |"
        )
    dashes = " | —" * 11
    for key, reason in failed.items():
        lines.append(f"| {key}: not measured — {_one_line(reason)}{dashes} |")
    for key, reason in (skipped or {}).items():
        lines.append(f"| {key}: skipped — {_one_line(reason)}{dashes} |")
    lines += [
        "",
        "CPU of each path's own processes per unit of work, median of the runs (utime+stime of "
        "each process tree from /proc, read before and after every run; wrk, iperf3 and the "
        "backend are not counted):",
    ]
    for route in routes:
        row = summary[route.key]
        if not route.roles:
            continue
        lines.append(
            f"  {route.key}: CPU-ms per 1,000 requests {cpu_breakdown(row['cpu_ms_per_1k_req'], '.1f')}; "
            f"CPU-s per GB, 1 stream {cpu_breakdown(row['cpu_s_per_gb_bulk1'], '.2f')}, "
            f"8 streams {cpu_breakdown(row['cpu_s_per_gb_bulk8'], '.2f')}"
        )
    lines += [
        "",
        "memory idle before the measurements -> after the run, and CPU time used during them "
        "(VmRSS and utime+stime of each process tree, from /proc):",
    ]
    for route in routes:
        if usage_after.get(route.key):
            parts = [
                f"{role} {usage_before[route.key][role]['rss_kib'] / 1024:.1f} -> {v['rss_kib'] / 1024:.1f} MiB, "
                f"{v['cpu_s'] - usage_before[route.key][role]['cpu_s']:.1f} s CPU "
                f"({v['processes']} process{'es' if v['processes'] != 1 else ''})"
                for role, v in usage_after[route.key].items()
            ]
            lines.append(f"  {route.key}: " + ", ".join(parts))
    lines += ["", "targets for backhaul's full path (shared/BASELINES.md), measured beside the peers above:"]
    ssh = summary.get("ssh", {})
    haproxy = summary.get("haproxy", {})
    backhaul_keys = [r.key for r in routes if r.key.startswith("backhaul")]
    if not backhaul_keys:
        lines.append("  (backhaul's path was not measured)")
    for key in backhaul_keys:
        row = summary[key]
        lines.append(f"  {key}:")
        lines.append("    " + _verdict(
            f"bulk, one stream >= ssh -R aes128-gcm: {_fmt(row['bulk1'], '.2f')} vs {_fmt(ssh.get('bulk1'), '.2f')} Gbit/s"
            f" ({_ratio(row['bulk1'], ssh.get('bulk1'))})",
            None if row["bulk1"] is None or ssh.get("bulk1") is None else row["bulk1"] >= ssh["bulk1"],
        ))
        lines.append("    " + _verdict(
            f"small requests >= {TARGET_RPS:,} req/s (v2ray reverse): {_fmt(row['rps'], ',.0f')} req/s",
            None if row["rps"] is None else row["rps"] >= TARGET_RPS,
        ))
        lines.append("    " + _verdict(
            f"aim: ssh -R with TCP_NODELAY, {_fmt(ssh.get('rps'), ',.0f')} req/s here "
            f"({_ratio(row['rps'], ssh.get('rps'))}); {AIM_HAPROXY_RATIO}× haproxy = "
            f"{_fmt(haproxy['rps'] * AIM_HAPROXY_RATIO if haproxy.get('rps') else None, ',.0f')} req/s",
            None if row["rps"] is None or ssh.get("rps") is None else row["rps"] >= ssh["rps"],
            labels=("reached", "not yet"),
        ))
        lines.append("    " + _verdict(
            f"p99 at {args.connections} connections < {TARGET_P99_MS:g} ms: {_fmt(row['p99_ms'], '.2f')} ms",
            None if row["p99_ms"] is None else row["p99_ms"] < TARGET_P99_MS,
        ))
    return "\n".join(lines)


def _verdict(text: str, ok: bool | None, labels: tuple[str, str] = ("PASS", "FAIL")) -> str:
    mark = "n/a" if ok is None else labels[0] if ok else labels[1]
    return f"[{mark}] {text}"


def _raise_system_exit(signum, _frame) -> None:
    # Turn SIGTERM/SIGHUP into an exception so the finally clause stops every server.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; 0 when every selected path was measured without a failed run."""
    args = parse_args(argv)
    # Ctrl-C must reach the finally clause even when started from a shell that ignores
    # SIGINT in background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    signal.signal(signal.SIGHUP, _raise_system_exit)
    ensure_programs(args.only)
    workdir = Path(tempfile.mkdtemp(prefix="backhaul-bench-"))
    procs = peers.Processes(workdir)
    atexit.register(procs.stop_all)
    keep_logs = False
    load = {"before": os.getloadavg()[0]}
    try:
        backend = peers.Backend(procs, args.nginx_workers)
        backend.start()
        routes, failed, skipped = start_routes(procs, backend, args)
        if not routes:
            raise BenchError(
                "no path could be set up: "
                + "; ".join(f"{k}: {_one_line(v)}" for k, v in {**failed, **skipped}.items())
            )
        started = time.time()
        usage_before = {route.key: route.usage() for route in routes if route.roles}
        results = measure(routes, args)
        usage_after = {route.key: route.usage() for route in routes if route.roles}
        summary = summarize(results)
        load["after"] = os.getloadavg()[0]
        print(render(routes, summary, usage_before, usage_after, failed, load, args, skipped))
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "started": started,
                        "host": platform.node(),
                        "cores": len(os.sched_getaffinity(0)),
                        "load_average_1min": load,
                        "settings": {
                            "duration": args.duration,
                            "iperf_duration": args.iperf_duration,
                            "repeat": args.repeat,
                            "connections": args.connections,
                            "nginx_workers": args.nginx_workers,
                            "workers": args.workers,
                            "backhaul": args.backhaul,
                        },
                        "paths": {r.key: r.label for r in routes},
                        "median": summary,
                        "runs": results,
                        "usage_before": usage_before,
                        "usage_after": usage_after,
                        "not_measured": failed,
                        "skipped": skipped,
                    },
                    indent=2,
                )
                + "\n"
            )
        if args.plot:
            try:
                chart.draw(
                    [(r.key, r.label, summary[r.key]) for r in routes],
                    args.plot,
                    f"backhaul comparison on {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}: "
                    f"median of {args.repeat} run(s), wrk -c{args.connections} {args.duration:g} s, "
                    f"iperf3 {args.iperf_duration:g} s",
                )
            except (chart.ChartError, OSError) as exc:
                # The table and the JSON are out already; only the chart is lost.
                raise BenchError(f"could not write the chart to {args.plot}: {exc}") from exc
            print(f"compare: chart written to {args.plot}", file=sys.stderr)
        problems = list(failed) + [k for k, row in summary.items() if row["failed_runs"]]
        if problems:
            keep_logs = True
            print(f"compare: not every path was measured cleanly ({', '.join(problems)}); "
                  f"see the messages above and the logs in {workdir}", file=sys.stderr)
            return 1
        return 0
    except BenchError as exc:
        keep_logs = True
        print(f"compare: {exc}", file=sys.stderr)
        print(f"compare: logs kept in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare: interrupted; stopping every server it started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
