"""bench/compare.py's helpers: the CPU accounting of a path's processes, the figures derived
from it, the table, the PNG chart, and the configurations of the v2ray and stunnel peers.

The CPU tests measure real processes that burn a known amount of CPU; the peer tests that
need v2ray or stunnel run the real programs and are skipped where they are not installed.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
# bench/ is not a package: its scripts import each other by putting it on the path, as here.
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import chart  # noqa: E402
import compare  # noqa: E402
import peer_pki  # noqa: E402
import peers  # noqa: E402

pytestmark = pytest.mark.codec_independent

#: Reads a number of CPU-seconds per line on stdin, burns them, answers "done".
BURNER = """
import sys, time
for line in sys.stdin:
    end = time.process_time() + float(line)
    while time.process_time() < end:
        pass
    print("done", flush=True)
"""
#: The same burner, one process further down: the measured process only waits for it.
PARENT_OF_BURNER = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURNER!r}])"
BURN_SECONDS = 0.4
#: /proc counts in clock ticks (10 ms), and reading a line costs the burner a little more.
SLACK = 0.25


def _burner(code: str, tmp_path: Path) -> peers.Managed:
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    return peers.Managed("burner", proc, tmp_path / "burner.log")


def _burn(managed: peers.Managed, seconds: float) -> None:
    """Ask the burner to burn ``seconds`` of CPU and wait (at most 30 s) until it has."""
    managed.proc.stdin.write(f"{seconds}\n")
    managed.proc.stdin.flush()
    ready, _, _ = select.select([managed.proc.stdout], [], [], 30)
    assert ready, "the burner did not answer within 30 s"
    assert managed.proc.stdout.readline().strip() == "done"


def _stop(managed: peers.Managed) -> None:
    managed.proc.stdin.close()
    try:
        managed.proc.wait(10)
    except subprocess.TimeoutExpired:
        managed.proc.kill()
        managed.proc.wait(10)
    managed.proc.stdout.close()


@pytest.mark.parametrize("code", [BURNER, PARENT_OF_BURNER], ids=["process", "its-child"])
def test_with_cpu_measures_what_a_path_process_burns_during_the_run(code, tmp_path):
    burner = _burner(code, tmp_path)
    try:
        _burn(burner, 0.01)  # started, and the child (if any) too: its start-up is not measured
        route = peers.Route("p", "a path", 0, 0, iperf=None, roles={"burner": burner})
        outcome = compare.with_cpu(route, lambda r: _burn(burner, BURN_SECONDS) or {"requests": 1})
        assert outcome["requests"] == 1
        assert BURN_SECONDS - 0.02 <= outcome["cpu_s"]["burner"] <= BURN_SECONDS + SLACK
        # Nothing burns between runs: a second, idle measurement costs almost nothing.
        idle = compare.with_cpu(route, lambda r: {})
        assert idle["cpu_s"]["burner"] < 0.05
    finally:
        _stop(burner)


def test_tree_cpu_seconds_counts_descendants_and_is_zero_for_a_gone_process(tmp_path):
    burner = _burner(PARENT_OF_BURNER, tmp_path)
    try:
        _burn(burner, BURN_SECONDS)
        assert len(peers.process_tree(burner.proc.pid)) == 2
        # The parent only waited: the burn is its child's, and the tree has it.
        assert peers.cpu_seconds(burner.proc.pid) < 0.2
        assert peers.tree_cpu_seconds(burner.proc.pid) >= BURN_SECONDS - 0.02
    finally:
        _stop(burner)
    assert peers.tree_cpu_seconds(burner.proc.pid) == 0.0


def test_a_path_without_processes_has_no_cpu_figures():
    route = peers.Route("direct", "direct", 0, 0, iperf=None)
    assert compare.with_cpu(route, lambda r: {"rps": 1.0})["cpu_s"] == {}
    assert compare.cpu_cost({}, 1000, 1000) is None


def test_cpu_cost_per_process_and_total():
    cost = compare.cpu_cost({"relay": 1.0, "connector": 3.0}, 2 * compare.GB, compare.GB)
    assert cost == {"relay": 0.5, "connector": 1.5, "total": 2.0}
    # CPU-ms per 1,000 requests: 150 ms of CPU over 3,000 requests.
    assert compare.cpu_cost({"haproxy": 150.0}, 3000, 1000) == {"haproxy": 50.0, "total": 50.0}
    assert compare.cpu_cost({"relay": 1.0}, 0, compare.GB) is None


def test_median_cost_skips_runs_without_a_cost():
    costs = [{"a": 1.0, "total": 1.0}, None, {"a": 3.0, "total": 3.0}, {"a": 2.0, "total": 2.0}]
    assert compare.median_cost(costs) == {"a": 2.0, "total": 2.0}
    assert compare.median_cost([None, None]) is None


def _results() -> dict:
    """Two repeats of each measurement through a two-process path; one bulk run failed."""
    wrk = {"rps": 10_000.0, "p50_ms": 1.0, "p99_ms": 4.0, "errors": 0}
    return {
        "backhaul-w1": {
            "wrk": [
                {**wrk, "requests": 10_000, "cpu_s": {"relay": 0.2, "connector": 0.3}},
                {**wrk, "requests": 20_000, "cpu_s": {"relay": 0.2, "connector": 0.3}},
            ],
            "bulk1": [
                {"gbps": 4.0, "bytes": 2 * 10**9, "cpu_s": {"relay": 2.0, "connector": 2.0}},
                {"error": "iperf3: the server is busy", "cpu_s": {}},
            ],
            "bulk8": [
                {"gbps": 3.0, "bytes": 10**9, "cpu_s": {"relay": 1.0, "connector": 2.0}},
                {"gbps": 3.5, "bytes": 10**9, "cpu_s": {"relay": 1.0, "connector": 1.0}},
            ],
        }
    }


def test_summarize_gives_cpu_per_1000_requests_and_per_gb_for_each_process():
    row = compare.summarize(_results())["backhaul-w1"]
    # 200 + 300 CPU-ms over 10,000 and over 20,000 requests: the median of 50 and 25 per 1,000.
    assert row["cpu_ms_per_1k_req"] == pytest.approx({"relay": 15.0, "connector": 22.5, "total": 37.5})
    # The failed run has no figure; the other did 4 CPU-s over 2 GB.
    assert row["cpu_s_per_gb_bulk1"] == pytest.approx({"relay": 1.0, "connector": 1.0, "total": 2.0})
    assert row["cpu_s_per_gb_bulk8"] == pytest.approx({"relay": 1.0, "connector": 1.5, "total": 2.5})
    assert row["failed_runs"] == 1


def _args(**extra) -> argparse.Namespace:
    return argparse.Namespace(repeat=2, connections=64, duration=3.0, iperf_duration=3.0, **extra)


def test_render_shows_the_path_totals_the_per_process_breakdown_and_skipped_peers():
    summary = compare.summarize(_results())
    route = peers.Route("backhaul-w1", "backhaul full path, 1 worker", 0, 0, iperf=None, roles={"relay": None, "connector": None})
    usage = {"backhaul-w1": {}}
    text = compare.render(
        [route], summary, usage, usage, {}, {"before": 0.1, "after": 0.2}, _args(), {"v2ray": "v2ray is not installed"}
    )
    header = next(line for line in text.splitlines() if line.startswith("| path |"))
    assert header.endswith("| CPU-ms / 1k req | CPU-s / GB 1 stream | CPU-s / GB 8 streams |")
    row = next(line for line in text.splitlines() if line.startswith("| backhaul full path"))
    assert row.endswith("| 37.5 | 2.00 | 2.50 |")
    assert len(row.split("|")) == len(header.split("|"))
    assert "relay 15.0 + connector 22.5 = 37.5" in text
    assert "8 streams relay 1.00 + connector 1.50 = 2.50" in text
    skipped = next(line for line in text.splitlines() if line.startswith("| v2ray: skipped"))
    assert len(skipped.split("|")) == len(header.split("|"))


def test_only_accepts_the_new_peers():
    assert compare.parse_args(["--only", "v2ray,stunnel,direct"]).only == ["direct", "stunnel", "v2ray"]
    with pytest.raises(SystemExit):
        compare.parse_args(["--only", "v3ray"])


def test_plot_without_matplotlib_fails_before_measuring(monkeypatch, tmp_path, capsys):
    # None in sys.modules makes `import matplotlib` raise ImportError, as where it is not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "chart.png"
    with pytest.raises(SystemExit) as exc:
        compare.parse_args(["--plot", str(out)])
    assert exc.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not out.exists()


def test_plot_writes_a_png_of_the_table(tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (pip install 'backhaul[bench]')")
    summary = compare.summarize(_results())
    rows = [
        ("haproxy", "haproxy, mode tcp", {"rps": 30_000.0, "p99_ms": 3.5, "bulk1": 9.0, "bulk8": 8.0,
                                          "cpu_ms_per_1k_req": {"haproxy": 15.0, "total": 15.0},
                                          "cpu_s_per_gb_bulk1": {"haproxy": 0.7, "total": 0.7},
                                          "cpu_s_per_gb_bulk8": None}),
        ("backhaul-w1", "backhaul full path, 1 worker", summary["backhaul-w1"]),
        ("direct", "direct to the backend", {"rps": 70_000.0, "p99_ms": 2.0, "bulk1": 16.0, "bulk8": None}),
    ]
    out = tmp_path / "chart.png"
    chart.draw(rows, out, "a fixed table")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # The IHDR chunk: the figure's size in pixels (4 panels x 4.2 in wide at 110 dpi).
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (round(4 * 4.2 * 110), round((2 * 3.6 + 1.2) * 110))
    assert len(data) > 20_000


def test_panel_value_takes_the_total_of_a_per_process_figure():
    assert chart.panel_value({"x": {"a": 1.0, "total": 3.0}}, "x") == 3.0
    assert chart.panel_value({"x": 2.5}, "x") == 2.5
    assert chart.panel_value({"x": None}, "x") is None
    assert chart.panel_value({}, "x") is None


def _tls(tmp_path: Path) -> dict[str, Path]:
    return peer_pki.write_pki(tmp_path)


def test_peer_pki_makes_a_server_and_a_client_certificate_of_one_ca(tmp_path):
    tls = _tls(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls["ca"]))
    server.load_cert_chain(tls["server_cert"], tls["server_key"])
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(tls["ca"]))
    client.load_cert_chain(tls["client_cert"], tls["client_key"])
    # A real handshake over a socket pair: each side verifies the other against the CA.
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(10)
        b.settimeout(10)
        done = {}

        def serve():
            with server.wrap_socket(a, server_side=True) as tls_a:
                done["peer"] = tls_a.getpeercert()
                tls_a.sendall(b"ok")

        thread = threading.Thread(target=serve)
        thread.start()
        with client.wrap_socket(b, server_hostname=peer_pki.SERVER_NAME) as tls_b:
            assert tls_b.recv(2) == b"ok"
        thread.join(10)
    assert done["peer"]["subject"]
    assert (tls["server_key"].stat().st_mode & 0o777) == 0o600


def test_v2ray_configs_route_users_through_the_reverse_portal(tmp_path):
    tls = {key: tmp_path / name for key, name in peer_pki.FILES.items()}
    portal = peers.v2ray_portal_config(4000, {4001: 80, 4002: 5201}, tls)
    bridge = peers.v2ray_bridge_config(4000, tls)
    inbounds = {i["tag"]: i for i in portal["inbounds"]}
    assert inbounds["tunnel"]["port"] == 4000 and inbounds["tunnel"]["streamSettings"]["security"] == "tls"
    assert {(i["port"], i["settings"]["port"]) for t, i in inbounds.items() if t != "tunnel"} == {(4001, 80), (4002, 5201)}
    assert all(i["listen"] == "127.0.0.1" for i in portal["inbounds"])
    user_rule, tunnel_rule = portal["routing"]["rules"]
    assert set(user_rule["inboundTag"]) == {"user-4001", "user-4002"} and user_rule["outboundTag"] == "portal"
    assert tunnel_rule["domain"] == [f"full:{peers.V2RAY_REVERSE_DOMAIN}"]
    assert portal["reverse"]["portals"][0]["domain"] == bridge["reverse"]["bridges"][0]["domain"]
    tunnel = next(o for o in bridge["outbounds"] if o["tag"] == "tunnel")
    assert tunnel["settings"]["vnext"][0]["port"] == 4000
    assert tunnel["settings"]["vnext"][0]["users"][0]["id"] == inbounds["tunnel"]["settings"]["clients"][0]["id"]
    tls_settings = tunnel["streamSettings"]["tlsSettings"]
    assert tls_settings["serverName"] == peer_pki.SERVER_NAME and tls_settings["disableSystemRoot"] is True
    assert tls_settings["certificates"] == [{"usage": "verify", "certificateFile": str(tls["ca"])}]


def test_v2ray_accepts_both_configs(tmp_path):
    v2ray = peers.find_program("v2ray")
    if v2ray is None:
        pytest.skip("v2ray is not installed (tools/bench-deps.sh installs it)")
    tls = _tls(tmp_path)
    for name, config in (
        ("portal", peers.v2ray_portal_config(4000, {4001: 80}, tls)),
        ("bridge", peers.v2ray_bridge_config(4000, tls)),
    ):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        done = subprocess.run([v2ray, "-test", "-config", str(path)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "Configuration OK" in done.stdout, done.stdout + done.stderr


def test_stunnel_conf_sides(tmp_path):
    tls = {key: tmp_path / name for key, name in peer_pki.FILES.items()}
    client = peers.stunnel_conf("client", {"http": (4001, 5001)}, tls)
    server = peers.stunnel_conf("server", {"http": (5001, 80), "iperf3": (5002, 5201)}, tls)
    assert "client = yes" in client and f"cert = {tls['client_cert']}" in client
    assert f"checkHost = {peer_pki.SERVER_NAME}" in client and "requireCert" not in client
    assert "accept = 127.0.0.1:4001" in client and "connect = 127.0.0.1:5001" in client
    assert server.count("requireCert = yes") == 2 and server.count("verifyChain = yes") == 2
    assert f"cert = {tls['server_cert']}" in server and "[iperf3]" in server
    with pytest.raises(ValueError, match="client"):
        peers.stunnel_conf("middle", {}, tls)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


def _echo_through(port: int, context: ssl.SSLContext | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        sock = context.wrap_socket(raw, server_hostname=peer_pki.SERVER_NAME) if context else raw
        with sock:
            sock.sendall(b"ping")
            return sock.recv(4)


def test_stunnel_pair_carries_traffic_and_refuses_a_client_without_certificate(tmp_path):
    stunnel = peers.find_program("stunnel4") or peers.find_program("stunnel")
    if stunnel is None:
        pytest.skip("stunnel is not installed (tools/bench-deps.sh installs stunnel4)")
    tls = _tls(tmp_path)
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    procs = peers.Processes(tmp_path)
    try:
        user_port, tls_port = peers.free_port(), peers.free_port()
        started = []
        for side, services in (
            ("server", {"echo": (tls_port, echo.server_address[1])}),
            ("client", {"echo": (user_port, tls_port)}),
        ):
            conf = tmp_path / f"{side}.conf"
            conf.write_text(peers.stunnel_conf(side, services, tls))
            started.append(procs.start(f"stunnel-{side}", [stunnel, str(conf)]))

        def probe():
            if _echo_through(user_port) != b"ping":
                raise peers.BenchError("no echo through the stunnel pair yet")

        peers.wait_until("stunnel pair", probe, time.monotonic() + 20, started)
        with_cert = ssl.create_default_context(cafile=str(tls["ca"]))
        with_cert.load_cert_chain(tls["client_cert"], tls["client_key"])
        assert _echo_through(tls_port, with_cert) == b"ping"
        # The same server, CA and name, without a client certificate: refused.
        without = ssl.create_default_context(cafile=str(tls["ca"]))
        try:
            answer = _echo_through(tls_port, without)
        except (ssl.SSLError, ConnectionError):
            answer = b""
        assert answer == b""
    finally:
        procs.stop_all()
        echo.shutdown()
        echo.server_close()
