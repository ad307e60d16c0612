"""Nothing grows without bound: idle streams are cheap, slow readers hold senders at the window."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
IDLE_STREAMS = 10_000


def test_ten_thousand_idle_streams_on_one_tunnel(system, backend, record_property):
    echo = backend("echo")
    system.start_connector("one", tunnels=1)
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    time.sleep(0.5)
    relay_before, connector_before = system.relay.rss_kib(), system.connectors["one"].rss_kib()

    async def open_all():
        conns = []
        sem = asyncio.Semaphore(500)

        async def one():
            async with sem:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"!")
                assert await asyncio.wait_for(reader.readexactly(1), 60) == b"!"
                conns.append(writer)

        await asyncio.gather(*(one() for _ in range(IDLE_STREAMS)))
        await asyncio.sleep(1.0)
        rss = system.relay.rss_kib(), system.connectors["one"].rss_kib()
        for writer in conns:
            writer.close()
        return len(conns), rss

    count, (relay_after, connector_after) = asyncio.run(open_all())
    assert count == IDLE_STREAMS
    relay_per_stream = (relay_after - relay_before) * 1024 / IDLE_STREAMS
    connector_per_stream = (connector_after - connector_before) * 1024 / IDLE_STREAMS
    record_property("relay_bytes_per_idle_stream", round(relay_per_stream))
    record_property("connector_bytes_per_idle_stream", round(connector_per_stream))
    print(f"RSS per idle stream: relay {relay_per_stream:.0f} B, connector {connector_per_stream:.0f} B")
    # Each side holds one socket transport, one pipe and one stream record per idle stream
    # (reads go through one shared buffer): the target is at most 8 KiB (shared/BASELINES.md).
    assert relay_per_stream < 8 * 1024
    assert connector_per_stream < 8 * 1024


def _push_until_blocked(port: int, seconds: float) -> int:
    """Write to the app as fast as possible for ``seconds``; return how much the path took."""
    sent = 0
    chunk = b"\xab" * (256 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
    return sent


def test_backend_that_never_reads_holds_the_user_at_the_window(system, backend):
    sink = backend("sink")
    system.start_connector("one", tunnels=1)
    port = system.publish_tcp("sink", sink.target)
    # Readiness: a connection that is accepted end to end and takes a little data.
    from .harness import wait_until

    wait_until(lambda: _push_until_blocked(port, 0.2) > 0, 30, "the sink app", interval=0.3)
    time.sleep(1.0)
    before = system.relay.rss_kib() + system.connectors["one"].rss_kib()
    first = _push_until_blocked(port, 3.0)
    mid = system.relay.rss_kib() + system.connectors["one"].rss_kib()
    second = _push_until_blocked(port, 3.0)
    after = system.relay.rss_kib() + system.connectors["one"].rss_kib()
    # The path takes a window's worth plus socket buffers, then pushes back: not 3 s at GB/s.
    assert first < 64 * MiB and second < 64 * MiB
    # Memory grows by at most a couple of windows per connection and then stays flat.
    assert (mid - before) * 1024 < 48 * MiB
    assert (after - mid) * 1024 < 48 * MiB


def test_user_that_never_reads_holds_the_backend_at_the_window(system, backend):
    source = backend("source")
    system.start_connector("one", tunnels=1)
    port = system.publish_tcp("source", source.target)
    from .harness import wait_until

    def streams_data():
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            return len(sock.recv(65536)) > 0

    wait_until(streams_data, 30, "the source app", interval=0.3)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.recv(1)
        time.sleep(2.0)
        mid = system.relay.rss_kib() + system.connectors["one"].rss_kib()
        time.sleep(3.0)
        after = system.relay.rss_kib() + system.connectors["one"].rss_kib()
        assert abs(after - mid) * 1024 < 16 * MiB, f"RSS moved {after - mid} KiB while nobody read"
        # And the stream still works: reading drains it.
        sock.settimeout(5)
        got = 0
        while got < 8 * MiB:
            got += len(sock.recv(MiB))
    finally:
        sock.close()
