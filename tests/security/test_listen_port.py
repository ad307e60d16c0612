"""The listen port (control API + tunnels) against clients that try to exhaust it.

Each test runs a real relay (and, where a tunnel must keep working, a real connector and
an echo app) with short limits set through ``service run --listen-limit``.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.e2e.harness import BACKHAUL, Proc, System, closed_by_peer, echoes, running_relay, wait_until


def _client_context(system: System, alpn: list[str] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(system.data_dir / "ca.pem"))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _tls(system: System, alpn: list[str] | None, source: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TLS connection to the listen port, handshake done, from ``source``."""
    raw = socket.create_connection(("127.0.0.1", system.port), timeout=5, source_address=(source, 0))
    try:
        return _client_context(system, alpn).wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def _health_over(sock: ssl.SSLSocket) -> bytes:
    sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
    answer = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


def _edge_answers(system: System) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", system.http_port, timeout=3)
    try:
        conn.request("GET", "/", headers={"Host": "nobody.example"})
        response = conn.getresponse()
        response.read()
        return response.status == 404  # the edge's own answer: no such app
    finally:
        conn.close()


@pytest.mark.codec_independent  # no tunnel: TLS and HTTP only
def test_idle_and_trickling_control_connections_are_closed_while_others_are_served(tmp_path):
    limits = ("--listen-limit", "idle_timeout=1", "--listen-limit", "header_timeout=1")
    with running_relay(tmp_path, relay_args=limits) as system:
        idle = [_tls(system, ["http/1.1"]) for _ in range(5)] + [_tls(system, None) for _ in range(5)]
        opened = time.monotonic()

        # A slowloris client: a byte of an endless head every 0.3 s (one thread: an SSL
        # socket is not to be read and written from two at once).
        trickler = _tls(system, ["http/1.1"])
        trickler.settimeout(0.3)
        head = b"GET /v1/health HTTP/1.1\r\nHost: relay\r\nX-Slow: " + b"a" * 1000
        received, sent, closed, served = b"", 0, False, 0
        started = time.monotonic()
        try:
            while not closed and time.monotonic() - started < 8:
                try:
                    trickler.sendall(head[sent : sent + 1])
                    sent += 1
                except OSError:
                    closed = True
                    break
                try:
                    chunk = trickler.recv(4096)  # waits up to 0.3 s
                    received += chunk
                    closed = not chunk
                except (TimeoutError, socket.timeout, ssl.SSLWantReadError):
                    pass
                except OSError:
                    closed = True
                if served < 2:
                    # Meanwhile the control API and the HTTP edge answer everyone else.
                    assert system.health()["status"] == "ok"
                    assert _edge_answers(system)
                    served += 1
            assert closed, "the trickling connection was not closed"
            assert received.startswith(b"HTTP/1.1 408 "), received
            assert 0 < sent < len(head) // 10  # closed a few seconds into an unfinished head
            for sock in idle:
                assert closed_by_peer(sock, timeout=5), "an idle TLS connection was not closed"
            assert time.monotonic() - opened < 10
            assert system.health()["status"] == "ok"
            assert _edge_answers(system)
        finally:
            for sock in idle + [trickler]:
                sock.close()
        assert system.relay.log_entries("control connection closed: nothing sent")
        slow = system.relay.log_entries("control connection closed: request head not received in time")
        assert slow and slow[0]["peer"].startswith("127.0.0.1:")


@pytest.mark.codec_independent  # no tunnel: TLS and HTTP only
def test_unknown_alpn_is_refused_with_the_alert_and_no_alpn_reaches_the_control_api(tmp_path):
    with running_relay(tmp_path) as system:
        for offered in (["h2"], ["foo/1"]):
            with pytest.raises(ssl.SSLError) as refused:
                _tls(system, offered).close()
            # Python 3.11 has no reason code for this alert; its text names it.
            assert "no application protocol" in str(refused.value).lower().replace("_", " ")
        for offered in (None, ["http/1.1"], ["h2", "http/1.1"]):
            with contextlib.closing(_tls(system, offered)) as sock:
                assert sock.selected_alpn_protocol() == (None if offered is None else "http/1.1")
                assert _health_over(sock).startswith(b"HTTP/1.1 200 "), offered
        refusals = system.relay.log_entries("new connections refused")
        assert any(entry["reason"] == "unknown ALPN" for entry in refusals)


def _open_raw(port: int, count: int, source: str = "127.0.0.1") -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


def _refused(socks: list[socket.socket], wait: float = 1.5) -> list[socket.socket]:
    """The sockets the relay closed at once (reset or EOF within ``wait`` s); the rest are held."""
    closed = []
    pending = list(socks)
    deadline = time.monotonic() + wait
    while pending and time.monotonic() < deadline:
        readable, _, _ = select.select(pending, [], [], max(0.0, deadline - time.monotonic()))
        for sock in readable:
            try:
                data = sock.recv(1)
            except ConnectionResetError:
                data = b""
            if not data:
                closed.append(sock)
            pending.remove(sock)
    return closed


def test_connections_per_address_are_capped_and_other_addresses_and_tunnels_go_on(tmp_path, backend):
    cap = 20
    limits = ("--listen-limit", f"max_per_address={cap}", "--listen-limit", "handshake_timeout=30")
    with running_relay(tmp_path, relay_args=limits) as system:
        echo = backend("echo")
        port = system.publish_tcp("echo", echo.target)
        system.start_connector("c1", tunnels=2)
        system.wait_tunnels("c1", 2)
        system.wait_app(port)
        hostile: list[socket.socket] = []
        try:
            # The connector's 2 tunnels count too: cap - 2 silent connections fill the address.
            hostile = _open_raw(system.port, cap + 10)
            refused = _refused(hostile)
            assert len(refused) >= 10 and len(hostile) - len(refused) <= cap - 2
            with pytest.raises((ConnectionResetError, ssl.SSLError, OSError)):
                _tls(system, None).close()
            # Another address is not held back, and the established tunnel carries traffic.
            with contextlib.closing(_tls(system, None, source="127.0.0.2")) as sock:
                assert _health_over(sock).startswith(b"HTTP/1.1 200 ")
            assert echoes(port, b"through the tunnel")
        finally:
            for sock in hostile:
                sock.close()
        wait_until(lambda: system.health()["status"] == "ok", 10, "the listen port to accept 127.0.0.1 again")
        refusals = system.relay.log_entries("new connections refused")
        assert any(entry["reason"] == "too many connections from one address" for entry in refusals)
        # Rate-limited: one line for the burst, not one per refused connection.
        assert len([e for e in refusals if e["reason"] == "too many connections from one address"]) <= 3


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks
        except (FileNotFoundError, IndexError):
            pass
    return total


def test_descriptor_reserve_refuses_new_connections_while_established_ones_work(tmp_path, backend):
    system = System(tmp_path)
    try:
        system.init()
        echo = backend("echo")
        # The relay raises its soft limit to the hard one: set both low.
        system.relay = Proc(
            "relay-nofile",
            ["prlimit", "--nofile=200:200", *BACKHAUL, "service", "run", "--data-dir", str(system.data_dir),
             "--listen", f"127.0.0.1:{system.port}", "--workers", "1", "--http", f"127.0.0.1:{system.http_port}",
             "--listen-limit", "handshake_timeout=60"],
            tmp_path,
        )
        system.procs.append(system.relay)
        system.wait_healthy()
        port = system.publish_tcp("echo", echo.target)
        system.start_connector("c1", tunnels=2)
        system.wait_tunnels("c1", 2)
        system.wait_app(port)
        user = socket.create_connection(("127.0.0.1", port), timeout=5)
        hostile: list[socket.socket] = []
        try:
            user.sendall(b"before")
            assert user.recv(64) == b"before"
            # Silent connections from many addresses (no per-address cap is reached) until
            # the relay refuses new ones at accept.
            for i in range(200):
                hostile += _open_raw(system.port, 1, source=f"127.0.1.{i % 200 + 1}")
            refused = _refused(hostile)
            held = len(hostile) - len(refused)
            assert refused, "no connection was refused at the descriptor budget"
            assert 50 < held < 200
            cpu_before = _cpu_seconds(system.relay.pids())
            time.sleep(1.0)  # measuring CPU over a second, not waiting for readiness
            assert _cpu_seconds(system.relay.pids()) - cpu_before < 0.5, "the relay spins at its descriptor limit"
            # New connections on every listener are refused...
            assert not echoes(port, b"new user")
            edge_user = _open_raw(system.http_port, 1)
            hostile += edge_user
            assert _refused(edge_user)
            # ...while what is established keeps working.
            user.sendall(b"established")
            assert user.recv(64) == b"established"
            assert system.relay.alive()
        finally:
            for sock in hostile:
                sock.close()
            user.close()
        wait_until(lambda: echoes(port, b"after"), 15, "new connections to be accepted again")
        assert system.health()["status"] == "ok"
        refusals = system.relay.log_entries("new connections refused")
        assert any(entry["reason"] == "descriptor reserve reached" for entry in refusals)
    finally:
        system.stop()
