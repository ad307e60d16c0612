"""UDP apps end to end: user datagrams -> relay -> DATAGRAM frames -> connector -> private app.

Real processes throughout: the relay and connectors through the CLI, UDP backends from
backend.py, and dnsmasq answering a real DNS query made by dig.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from backhaul.protocol.constants import ErrorCode
from backhaul.protocol.mux import stream_meta

from .harness import Proc, System, free_port, wait_until
from .test_connector_allowlist import _open, rogue  # noqa: F401 (a fixture, used by name)
from .test_observe import _settled, _wait_deltas

pytestmark = pytest.mark.e2e

#: What a test waits for a reply it does expect; a missing one fails the test after this.
REPLY_TIMEOUT = 5.0
#: How long a test listens to be sure a dropped datagram gets no answer.
SILENCE = 0.5


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_tcp_and_udp_port() -> int:
    """A port free for both TCP and UDP right now (a DNS server binds both)."""
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free for both TCP and UDP in 100 tries")


def client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def ask(sock: socket.socket, port: int, payload: bytes, timeout: float = REPLY_TIMEOUT) -> bytes | None:
    """Send one datagram to the relay's app port; its answer (which starts with ``payload``),
    or None after ``timeout``. Late answers to earlier probes are skipped."""
    deadline = time.monotonic() + timeout
    sock.sendto(payload, ("127.0.0.1", port))
    for _ in range(1000):
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data, _ = sock.recvfrom(70000)
        except socket.timeout:
            return None
        if data.startswith(payload):
            return data
    raise AssertionError("a flood of unexpected datagrams")


def via(answer: bytes | None) -> bytes:
    """The connector socket (ip:port) a udpwho answer names."""
    assert answer is not None, "no answer"
    return answer.rsplit(b" ", 1)[1]


def publish_udp(system: System, name: str, target: str, group: str = "default") -> int:
    port = free_udp_port()
    system.admin("app", "publish", name, "--group", group, "--udp", str(port), "--target", target)
    return port


def wait_udp_app(port: int, sock: socket.socket, probe: bytes = b"probe", timeout: float = 30) -> bytes:
    """Ready when a datagram through the app is answered; returns the answer."""
    return wait_until(lambda: ask(sock, port, probe, timeout=0.5), timeout, f"the udp app on port {port} to answer", interval=0.1)


@pytest.fixture
def relay(tmp_path):
    """start(extra flags) -> a running System; everything is stopped at the end."""
    systems: list[System] = []

    def start(*extra: str) -> System:
        system = System(tmp_path)
        systems.append(system)
        system.init()
        system.start_relay(extra=extra)
        return system

    try:
        yield start
    finally:
        for system in systems:
            system.stop()


def test_flows_are_sticky_limited_and_expire_when_idle(relay, backend):
    limit = 40
    system = relay("--udp-max-flows", str(limit), "--udp-idle-timeout", "1.5")
    who = backend("udpwho")
    system.start_connector("one")
    port = publish_udp(system, "who", who.target)
    socks = [client() for _ in range(limit + 1)]
    try:
        wait_udp_app(port, socks[0])
        seen = {}
        for i, sock in enumerate(socks[:limit]):
            for n in range(3):
                answer = ask(sock, port, f"{i}.{n}".encode())
                assert answer is not None and answer.startswith(f"{i}.{n} ".encode()), (i, n, answer)
                seen.setdefault(i, set()).add(via(answer))
        # One socket on the connector per flow: each user keeps its source port, no two share one.
        assert all(len(ports) == 1 for ports in seen.values())
        assert len({next(iter(p)) for p in seen.values()}) == limit
        extra = socks[limit]
        assert ask(extra, port, b"over the limit", timeout=SILENCE) is None
        # Once the other flows have been idle for the timeout, the table has room again.
        answer = wait_until(lambda: ask(extra, port, b"later", timeout=0.3), 20, "an idle flow to expire and free a slot")
        assert answer.startswith(b"later ")
    finally:
        for sock in socks:
            sock.close()


#: Why the relay drops a UDP app's datagram: udp_dropped_total's labels (relay/metrics.py, fixed).
DROP_REASONS = {"too_big", "flow_limit", "no_route", "queue_full", "open_failed", "tunnel_busy", "socket_busy", "closing", "empty"}


def test_flow_moves_to_another_connector_when_its_connector_dies(relay, backend):
    metrics = free_port()
    system = relay("--metrics", f"127.0.0.1:{metrics}")
    who = backend("udpwho")
    system.start_connector("a")
    port = publish_udp(system, "who", who.target)
    with client() as sock:
        via_a = via(wait_udp_app(port, sock))
        system.start_connector("b")
        wait_until(
            lambda: sum(c["status"] == "active" for c in system.admin_json("connector", "list")) == 2,
            30,
            "connector b to be active",
            interval=0.2,
        )
        # Sticky: connector b is idle and would win a new flow, but this flow stays on a.
        for n in range(5):
            assert via(ask(sock, port, f"still {n}".encode())) == via_a
        system.connectors["a"].kill()
        answer = wait_until(lambda: ask(sock, port, b"after", timeout=0.3), 20, "the flow to fail over to connector b")
        via_b = via(answer)
        assert via_b != via_a
        for n in range(5):
            assert via(ask(sock, port, f"on b {n}".encode())) == via_b

        # The relay's metrics count the flow as a stream of the app, its datagrams and bytes each
        # way, and its move; every drop reason is a series from the start.
        who = (("app", "who"),)
        before = _settled(metrics)
        asked = [f"counted {n}".encode() for n in range(5)]
        answers = [ask(sock, port, payload) for payload in asked]
        assert all(a is not None and via(a) == via_b for a in answers)
        up, down = (("app", "who"), ("direction", "client_to_app")), (("app", "who"), ("direction", "app_to_client"))
        now = _wait_deltas(metrics, before, {
            ("backhaul_relay_udp_datagrams_total", up): 5,
            ("backhaul_relay_udp_datagrams_total", down): 5,
            ("backhaul_relay_stream_bytes_total", up): sum(map(len, asked)),
            ("backhaul_relay_stream_bytes_total", down): sum(map(len, answers)),
        })
        assert now[("backhaul_relay_streams_active", who)] == 1
        assert now[("backhaul_relay_udp_flows_failed_over_total", who)] == 1
        assert now[("backhaul_relay_stream_open_seconds_count", who)] >= 1
        assert now[("backhaul_relay_streams_opened_total", who)] >= 1
        reasons = {dict(labels)["reason"] for name, labels in now if name == "backhaul_relay_udp_dropped_total"}
        assert reasons == DROP_REASONS


@pytest.fixture
def dnsmasq(tmp_path):
    """A real DNS server on 127.0.0.1 with one static record; returns (port, name, address)."""
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not Path(binary).exists():
        pytest.fail("dnsmasq is not installed; run tools/bootstrap.sh (it installs dnsmasq-base)")
    port = free_tcp_and_udp_port()
    name, address = "intranet.backhaul.test", "10.20.30.40"
    proc = Proc(
        "dnsmasq",
        [
            binary, "--keep-in-foreground", "--log-facility=-", f"--port={port}", "--listen-address=127.0.0.1",
            "--bind-interfaces", "--no-resolv", "--no-hosts", f"--host-record={name},{address}",
            f"--pid-file={tmp_path / 'dnsmasq.pid'}", f"--user={pwd.getpwuid(os.geteuid()).pw_name}",
        ],
        tmp_path,
    )
    try:
        def answers() -> bool:
            if not proc.alive():
                raise AssertionError(f"dnsmasq exited: {proc.log()[-500:]}")
            return _dig(port, name) == address

        wait_until(answers, 15, "dnsmasq to answer directly")
        yield port, name, address
    finally:
        proc.stop()


def _dig(port: int, name: str) -> str:
    dig = shutil.which("dig")
    if dig is None:
        pytest.fail("dig is not installed; run tools/bootstrap.sh (it installs bind9-dnsutils)")
    result = subprocess.run(
        [dig, "+short", "+time=1", "+tries=1", "-p", str(port), "@127.0.0.1", name, "A"],
        capture_output=True, text=True, timeout=10,
    )
    # dig reports "no servers could be reached" on stdout with a non-zero status.
    return result.stdout.strip() if result.returncode == 0 else ""


def test_datagrams_echo_byte_exact_and_dig_gets_its_answer(relay, backend, dnsmasq):
    dns_port, name, address = dnsmasq
    system = relay()
    echo = backend("udpecho")
    system.start_connector("one")
    echo_port = publish_udp(system, "echo", echo.target)
    dns_port_on_relay = publish_udp(system, "dns", f"127.0.0.1:{dns_port}")
    with client() as sock:
        wait_udp_app(echo_port, sock)
        for size in (1, 1400, 9000, 65507):
            payload = bytes(i % 251 for i in range(size))
            assert ask(sock, echo_port, payload) == payload, f"a {size}-byte datagram did not come back intact"
    answer = wait_until(lambda: _dig(dns_port_on_relay, name), 30, "dig through the relay to get an answer", interval=0.2)
    assert answer == address
    for _ in range(10):
        assert _dig(dns_port_on_relay, name) == address


def test_connector_opens_udp_flows_only_for_its_configured_udp_targets(rogue, backend):
    """A relay that asks for a flow outside the connector's config is refused (rogue relay in-process)."""
    system, worker, loop = rogue
    echo = backend("udpecho")
    tcp = backend("echo")
    port = free_udp_port()
    system.admin("app", "publish", "dns", "--udp", str(port), "--target", echo.target)
    system.publish_tcp("web", tcp.target)
    system.start_connector("one", tunnels=1)
    wait_until(lambda: worker.registry.tunnels(), 30, "the connector's tunnel")
    wait_until(
        lambda: _open(worker, loop, stream_meta("dns", echo.target, "udp", "127.0.0.1:1", "u0")).outcome == ("accepted",),
        30,
        "the allowed flow to be accepted (config pulled)",
        interval=0.3,
    )
    refused = {
        "udp to another target": stream_meta("dns", tcp.target, "udp", "127.0.0.1:1", "u1"),
        "udp to a tcp app": stream_meta("web", tcp.target, "udp", "127.0.0.1:1", "u2"),
        "tcp to a udp app": stream_meta("dns", echo.target, "tcp", "127.0.0.1:1", "u3"),
    }
    for what, meta in refused.items():
        outcome = _open(worker, loop, meta).outcome
        assert outcome[:2] == ("rejected", ErrorCode.TARGET_NOT_ALLOWED), (what, outcome)
