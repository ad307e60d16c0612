"""TCP apps end to end: user -> relay -> mTLS tunnel -> connector -> private app, real processes."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time

import pytest

from .harness import echo_digests, running_relay, wait_until

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def echo_app(system, backend):
    """A running connector and a published echo app; returns the app's relay port."""
    echo = backend("echo")
    system.start_connector("one")
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    return port


def _stream_through(port: int, total: int, chunk: int = MiB) -> tuple[str, str, int]:
    """Send ``total`` random bytes through an echo app while reading them back; both digests."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setblocking(True)
        return echo_digests(sock, total, random.Random(1234), chunk)


def test_200_mb_each_way_byte_exact(echo_app):
    total = 200 * MiB
    started = time.monotonic()
    sent, received, got = _stream_through(echo_app, total)
    assert got == total
    assert sent == received
    assert time.monotonic() - started < 120


def test_half_close_client_still_receives_the_whole_reply(system, backend):
    reply = backend("reply")
    system.start_connector("one")
    port = system.publish_tcp("reply", reply.target)
    payload = random.Random(7).randbytes(3 * MiB + 17)

    def exchange():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    answer = wait_until(exchange, 30, "a reply through the tunnel", interval=0.2)
    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def test_thousand_concurrent_streams_through_one_connector(echo_app):
    async def one(i: int) -> bool:
        payload = random.Random(i).randbytes(16 * 1024 + i)
        reader, writer = await asyncio.open_connection("127.0.0.1", echo_app)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 60)
        writer.close()
        return data == payload

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(1000)))

    results = asyncio.run(all_of_them())
    assert sum(results) == 1000


def test_backend_refusing_closes_the_user_promptly_and_logs_why(system):
    system.start_connector("one")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nobody listens there: the connector's dial is refused
    port = system.publish_tcp("nothing", f"127.0.0.1:{dead_port}")

    def refused_quickly():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"hello")
            data = sock.recv(100)
            return data == b"" and time.monotonic() - started < 3

    wait_until(refused_quickly, 30, "the relay to close a connection whose target refuses", interval=0.3)
    wait_until(lambda: "CONNECT_REFUSED" in system.relay.log(), 5, "the relay to log the refusal")
    assert "target connect failed" in system.connectors["one"].log()


def test_no_connector_in_group_closes_user_connection(system):
    port = system.publish_tcp("orphan", "127.0.0.1:9")

    def closed():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            return sock.recv(10) == b""

    wait_until(closed, 15, "the relay to refuse a connection with no connector", interval=0.3)
    wait_until(lambda: "no active connector" in system.relay.log(), 5, "the relay to log why")


def test_killed_connector_closes_its_streams_and_the_other_takes_over(system, backend):
    echo = backend("echo")
    system.start_connector("a")
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"x" * 1000)
    got = b""
    while len(got) < 1000:
        got += sock.recv(1000)
    system.start_connector("b")
    wait_until(
        lambda: sum(c["status"] == "active" for c in system.admin_json("connector", "list")) == 2,
        30,
        "both connectors active",
        interval=0.3,
    )
    system.connectors["a"].kill()
    # The open connection through "a" ends promptly instead of hanging.
    sock.settimeout(10)
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    assert time.monotonic() - started < 10
    sock.close()
    # New connections go to "b", every one of them.
    for _ in range(20):
        system.wait_app(port, timeout=15)


def test_relay_restart_connectors_come_back_by_themselves(system, echo_app):
    system.relay.stop()
    system.start_relay()
    started = time.monotonic()
    system.wait_app(echo_app, timeout=30)
    assert time.monotonic() - started < 30


def test_several_workers_on_both_sides_every_connection_finds_a_tunnel(tmp_path, backend):
    echo = backend("echo")
    with running_relay(tmp_path, workers=2) as system:
        system.start_connector("one", workers=2, tunnels=2)
        port = system.publish_tcp("echo", echo.target)
        system.wait_app(port)
        # Every relay worker ends up holding tunnels of the connector ...
        wait_until(
            lambda: {'"worker":0', '"worker":1'} <= {w for w in ('"worker":0', '"worker":1') if w in _tunnel_lines(system)},
            30,
            "tunnels on both relay workers",
            interval=0.3,
        )

        # ... so connections accepted by either worker all get through.
        async def one(i):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            payload = b"%d" % i * 100
            writer.write(payload)
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            return data == payload

        async def run():
            return await asyncio.gather(*(one(i) for i in range(200)))

        assert all(asyncio.run(run()))


def _tunnel_lines(system) -> str:
    return "\n".join(line for line in system.relay.log().splitlines() if '"tunnel up"' in line)
