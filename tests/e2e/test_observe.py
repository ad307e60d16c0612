"""Logs, metrics and status of a running connector and relay, driven as an operator would.

Real processes on 127.0.0.1: a relay and a connector with two workers each, real TCP
traffic through published apps, the CLI for every switch and status, and a real
Prometheus text parser for every scrape.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import stat
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backhaul import __version__

from .harness import System, free_port, wait_until

pytestmark = pytest.mark.e2e

KiB = 1024


def _exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` through an echo app, half-close, and read the whole echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(256 * KiB):
            got += chunk
    return got


def _refused(port: int) -> bytes:
    """Connect to an app whose target is down; the relay closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return sock.recv(1024)


def _scrape(port: int) -> dict:
    """{(sample name, ((label, value), ...)): value} of one scrape, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


#: Workers publish their figures once a second; a figure is settled once unchanged for longer.
SETTLE = 1.5


def _settled(port: int) -> dict:
    """A scrape taken once no stream counter has moved for SETTLE seconds (every worker has published since)."""
    last, since = None, time.monotonic()

    def quiet():
        nonlocal last, since
        now = {k: v for k, v in _scrape(port).items() if "stream" in k[0] and k[0].endswith(("_total", "_count"))}
        if now != last:
            last, since = now, time.monotonic()
            return None
        return _scrape(port) if time.monotonic() - since >= SETTLE else None

    return wait_until(quiet, 20, f"the figures on port {port} to settle", interval=0.2)


def _wait_deltas(port: int, before: dict, expected: dict) -> dict:
    """The first scrape in which every series in ``expected`` moved by exactly that much since ``before``
    (workers publish once a second, so the counts of one burst may show up over two scrapes)."""
    missing = {}

    def arrived():
        now = _scrape(port)
        missing.clear()
        for key, want in expected.items():
            got = now.get(key, 0) - before.get(key, 0)
            if got != want:
                missing[key] = got
        return None if missing else now

    try:
        return wait_until(arrived, 15, f"the counters on port {port} to move")
    except AssertionError:
        raise AssertionError(f"counters that did not move as expected (series: moved by): {missing}") from None


def _workers(pid: int) -> list[int]:
    """The worker processes a supervisor forked."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(kid) for kid in children.read().split()]


def _switch(system, state, switch: str):
    """`connector session-log on|off`, repeated until every worker has confirmed it (bounded)."""
    def confirmed():
        done = system.cli("connector", "session-log", switch, "--state-dir", str(state))
        return done if "so far" not in done.stderr else None

    return wait_until(confirmed, 20, f"every connector worker to switch its session log {switch}")


def _session_lines(log_dir) -> list[dict]:
    lines = []
    for path in sorted(log_dir.glob("session.log*")):
        if path.name.endswith(".lock"):
            continue
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def test_session_log_switched_live_checked_and_rotated(system, backend):
    echo = backend("echo")
    state = system.register("one")
    connector_id = json.loads((state / "connector.json").read_text())["connector_id"]
    log_dir = system.workdir / "logs-one"
    system.start_connector(
        "one", workers=2, extra=("--log-dir", str(log_dir), "--log-max-bytes", "2048", "--log-backups", "2")
    )
    # "dead" first: a relay worker applies whole config versions, so once "echo" answers,
    # "dead" listens too.
    dead_port = system.publish_tcp("dead", f"127.0.0.1:{free_port()}")
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)

    # -- off by default: the readiness probe went through and left no session line
    assert not (log_dir / "session.log").exists()
    run_dir = state / "run"
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "control.sock").stat().st_mode) == 0o600

    # -- a second `connector run` on the same state dir is refused at once, in words
    second = system.cli("connector", "run", "--state-dir", str(state), "--workers", "1", check=False, timeout=30)
    assert second.returncode != 0
    assert "already running" in second.stderr and len(second.stderr.strip().splitlines()) == 1

    # -- switched on at run time, no restart; every transaction gets its line
    on = _switch(system, state, "on")
    assert str(log_dir / "session.log") in on.stdout
    sizes = [1000, 1001, 1002, 1003]
    for size in sizes:
        assert _exchange(port, b"s" * size) == b"s" * size
    assert _refused(dead_port) == b""

    def all_lines():
        got = _session_lines(log_dir)
        # The readiness probes ("ping") may end after the switch under load: only ours count.
        echoed = {line["bytes_client_to_app"] for line in got if line["app"] == "echo"}
        return got if set(sizes) <= echoed and any(line["app"] == "dead" for line in got) else None

    lines = wait_until(all_lines, 15, "a session line for each of the five transactions")
    ok = {line["bytes_client_to_app"]: line for line in lines if line["app"] == "echo" and line["bytes_client_to_app"] in sizes}
    assert sorted(ok) == sizes
    assert all(line["bytes_client_to_app"] in (*sizes, len(b"ping")) for line in lines if line["app"] == "echo")
    for size, line in ok.items():
        assert line["bytes_app_to_client"] == size
        assert (line["result"], line["code"], line["reason"]) == ("ok", "NO_ERROR", "completed")
        assert line["target"] == echo.target and line["connector"] == connector_id
        assert re.fullmatch(r"127\.0\.0\.1:\d+", line["client"])
        assert re.fullmatch(r"[0-9a-f]{16}", line["id"]) and line["stream"] > 0
        assert line["user"] is None, "a TCP app has no user"
        assert 0 <= line["duration"] < 10
        started = datetime.datetime.fromisoformat(line["time"])
        assert abs((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()) < 60
    assert len({line["id"] for line in ok.values()}) == len(sizes)
    failed = [line for line in lines if line["app"] == "dead"]
    assert failed and failed[0]["result"] == "failed" and failed[0]["code"] == "CONNECT_REFUSED"
    assert failed[0]["bytes_client_to_app"] == 0 and "refused" in failed[0]["reason"]

    # -- switched off, a transaction leaves no line; switched on again, the next one does
    _switch(system, state, "off")
    assert _exchange(port, b"o" * 2222) == b"o" * 2222
    _switch(system, state, "on")
    assert _exchange(port, b"n" * 3333) == b"n" * 3333
    wait_until(lambda: any(l["bytes_client_to_app"] == 3333 for l in _session_lines(log_dir)), 15, "the line of the 3333-byte exchange")
    assert not any(l["bytes_client_to_app"] == 2222 for l in _session_lines(log_dir)), "logged while switched off"

    # -- more transactions: the files rotate and stay bounded (3 files of about 2 KiB)
    for i in range(20):
        assert _exchange(port, b"r" * (100 + i)) == b"r" * (100 + i)
    wait_until(lambda: any(l["bytes_client_to_app"] == 119 for l in _session_lines(log_dir)), 15, "the last line")
    files = sorted(p.name for p in log_dir.glob("session.log*") if not p.name.endswith(".lock"))
    assert files == ["session.log", "session.log.1", "session.log.2"]
    for name in files:
        assert (log_dir / name).stat().st_size <= 2048 + 3 * 600, name

    # -- the admin log holds key events, not per-stream lines
    admin = [json.loads(line) for p in sorted(log_dir.glob("admin.log*")) if not p.name.endswith(".lock") for line in p.read_text().splitlines()]
    messages = {entry["msg"] for entry in admin}
    assert {"config applied", "tunnel up", "session log switched"} <= messages
    assert "stream ended" not in messages and "target connect failed" not in messages
    registered = [json.loads(line) for line in (state / "logs" / "admin.log").read_text().splitlines()]
    assert [(e["msg"], e["connector_id"]) for e in registered] == [("connector registered", connector_id)]


def test_metrics_and_status_follow_real_traffic(tmp_path, backend):
    relay_metrics, connector_metrics = free_port(), free_port()
    system = System(tmp_path)
    try:
        system.init()
        system.start_relay(workers=2, extra=("--metrics", f"127.0.0.1:{relay_metrics}"))
        echo = backend("echo")
        state = system.register("one")
        connector_id = json.loads((state / "connector.json").read_text())["connector_id"]
        system.start_connector("one", workers=2, tunnels=2, extra=("--metrics", f"127.0.0.1:{connector_metrics}"))
        dead_port = system.publish_tcp("dead", f"127.0.0.1:{free_port()}")  # first: see above
        port = system.publish_tcp("echo", echo.target)
        system.wait_app(port)
        _check_metrics_and_status(system, state, connector_id, port, dead_port, relay_metrics, connector_metrics)
    finally:
        system.stop()


def _check_metrics_and_status(system, state, connector_id, port, dead_port, relay_metrics, connector_metrics):
    C = (("connector", connector_id),)

    def conn(name, labels=C):
        return _scrape(connector_metrics).get((f"backhaul_connector_{name}", labels), 0)

    # every relay worker holds a tunnel of the connector; both families report two workers
    wait_until(lambda: conn("tunnels") >= 2 and conn("workers") == 2, 15, "two connector workers and two tunnels")
    assert _scrape(relay_metrics)[("backhaul_relay_workers", ())] == 2
    # the installed version is a label: one series per connector, 1 however many workers report it
    info = [(labels, v) for (name, labels), v in _scrape(connector_metrics).items() if name == "backhaul_connector_info"]
    assert info == [((("connector", connector_id), ("version", __version__)), 1)], info

    before, relay_before = _settled(connector_metrics), _settled(relay_metrics)
    payload = bytes(range(256)) * 256  # 64 KiB
    for _ in range(5):
        assert _exchange(port, payload) == payload
    for _ in range(2):
        assert _refused(dead_port) == b""

    def delta(now, then, name, labels=C):
        return now.get((name, labels), 0) - then.get((name, labels), 0)

    failed = (("connector", connector_id), ("reason", "CONNECT_REFUSED"))
    _wait_deltas(connector_metrics, before, {
        ("backhaul_connector_streams_opened_total", C): 7,
        ("backhaul_connector_streams_failed_total", failed): 2,
        ("backhaul_connector_stream_open_seconds_count", C): 5,
        # all seven passed the allow-list and were dialed: the two to the dead port failed there
        ("backhaul_connector_events_total", (("connector", connector_id), ("event", "streams_dialed"))): 7,
    })
    def bytes_moved():
        now = _scrape(connector_metrics)
        moved = all(
            delta(now, before, f"backhaul_connector_{name}") > 5 * len(payload)
            for name in ("tunnel_received_bytes_total", "tunnel_sent_bytes_total")
        )
        return now if moved else None

    after = wait_until(bytes_moved, 15, "tunnel bytes both ways to cover the payloads")
    assert delta(after, before, "backhaul_connector_frames_received_total") >= 5
    assert delta(after, before, "backhaul_connector_frames_sent_total") >= 5
    assert after[("backhaul_connector_cpu_seconds_total", C)] > 0
    assert after[("backhaul_connector_memory_bytes", C)] > 10 * 1024 * 1024
    assert after[("backhaul_connector_config_version", C)] >= 1
    expiry = after[("backhaul_connector_certificate_expiry_timestamp_seconds", C)]
    assert 80 * 86400 < expiry - datetime.datetime.now().timestamp() < 91 * 86400
    assert after[("backhaul_connector_session_log_enabled", C)] == 0

    # the relay counts the same streams, by app, and the tunnels by connector
    echo, dead = (("app", "echo"),), (("app", "dead"),)

    relay = _wait_deltas(relay_metrics, relay_before, {
        ("backhaul_relay_streams_opened_total", echo): 5,
        ("backhaul_relay_streams_opened_total", dead): 2,
        ("backhaul_relay_streams_failed_total", (("app", "dead"), ("reason", "CONNECT_REFUSED"))): 2,
        ("backhaul_relay_stream_bytes_total", (("app", "echo"), ("direction", "client_to_app"))): 5 * len(payload),
        ("backhaul_relay_stream_bytes_total", (("app", "echo"), ("direction", "app_to_client"))): 5 * len(payload),
        ("backhaul_relay_stream_open_seconds_count", echo): 5,
    })
    assert relay[("backhaul_relay_tunnels", C)] >= 2

    def relay_bytes_moved():
        now = _scrape(relay_metrics)
        return now if delta(now, relay_before, "backhaul_relay_tunnel_sent_bytes_total", C) > 5 * len(payload) else None

    relay = wait_until(relay_bytes_moved, 15, "the relay's tunnel bytes to cover the payloads")
    assert not any(labels and dict(labels).get("client") for _, labels in relay), "never labelled by client"

    # a stream held open shows as active on both sides while it lasts
    with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
        held.sendall(b"hello")
        assert held.recv(5) == b"hello"
        wait_until(lambda: conn("streams_active") == 1, 15, "the connector to show one active stream")
        wait_until(lambda: _scrape(relay_metrics).get(("backhaul_relay_streams_active", echo)) == 1, 15, "the relay to show it")
        status = json.loads(system.cli("connector", "status", "--state-dir", str(state), "--json").stdout)
        assert status["running"] is True and status["streams_active"] == 1
    wait_until(lambda: conn("streams_active") == 0, 15, "the held stream to end")

    # `connector status` shows the same live figures as the metrics
    figures = _scrape(connector_metrics)

    def status_agrees():
        status = json.loads(system.cli("connector", "status", "--state-dir", str(state), "--json").stdout)
        opened = _scrape(connector_metrics)[("backhaul_connector_streams_opened_total", C)]
        return status if status["streams_opened"] == opened else None

    status = wait_until(status_agrees, 15, "status and metrics to agree")
    assert status["workers"] == 2 and status["tunnels"] >= 2
    assert status["streams_failed"] == {"CONNECT_REFUSED": 2}
    assert status["stream_open_seconds"]["count"] == figures[("backhaul_connector_stream_open_seconds_count", C)]
    assert status["tunnel_bytes_received"] >= figures[("backhaul_connector_tunnel_received_bytes_total", C)]
    assert status["metrics"] == f"127.0.0.1:{connector_metrics}"
    assert status["connector_id"] == connector_id and status["certificate_days_left"] > 80
    table = system.cli("connector", "status", "--state-dir", str(state)).stdout
    assert re.search(rf"streams opened\s+{status['streams_opened']}\b", table)
    assert re.search(r"streams failed\s+2 \(CONNECT_REFUSED 2\)", table)
    assert re.search(r"workers\s+2\b", table) and f"http://127.0.0.1:{connector_metrics}/metrics" in table

    # a deleted app's series leave the relay's metrics (label sets follow the store)
    system.admin("app", "delete", "dead")
    wait_until(
        lambda: not any(dict(labels).get("app") == "dead" for _, labels in _scrape(relay_metrics)),
        15, "the deleted app's series to go",
    )

    # a worker killed outright is restarted; its counts stay in the totals, its gauges leave
    opened = _scrape(connector_metrics)[("backhaul_connector_streams_opened_total", C)]
    workers = _workers(system.connectors["one"].pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)

    def restarted():
        now = _scrape(connector_metrics)
        assert now[("backhaul_connector_streams_opened_total", C)] >= opened, "a counter went back"
        fresh = set(_workers(system.connectors["one"].pid)) - set(workers)
        return now if fresh and now[("backhaul_connector_workers", C)] == 2 and now[("backhaul_connector_tunnels", C)] >= 2 else None

    now = wait_until(restarted, 30, "the killed worker to be replaced")
    assert now[("backhaul_connector_streams_opened_total", C)] == opened
    assert len(list((state / "run" / "stats").glob("*.json"))) == 3, "one snapshot per live worker, plus retired.json"

    # stopped, the connector's status says so and still shows what the state dir knows
    system.connectors["one"].stop()
    stopped = system.cli("connector", "status", "--state-dir", str(state), "--json")
    info = json.loads(stopped.stdout)
    assert info["running"] is False and "not running" in info["note"] and info["connector_id"] == connector_id
    table = system.cli("connector", "status", "--state-dir", str(state)).stdout
    assert re.search(r"running\s+no", table)
    off = system.cli("connector", "session-log", "on", "--state-dir", str(state), check=False)
    assert off.returncode != 0 and "not running" in off.stderr
