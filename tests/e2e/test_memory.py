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


BULK_SECONDS = 5.0
#: RSS may stay this much above idle once a bulk run is over (the issue's target: within 25%).
AFTER_BULK_SLACK = 1.25


def _upload(port: int, seconds: float) -> int:
    """Send as fast as the path takes for ``seconds``, then EOF; the reply app's count must match."""
    chunk = b"\xab" * (256 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            got = sock.recv(256)
            if not got:
                break
            reply += got
    assert int(reply.split()[0]) == sent, f"the app counted {reply!r}, {sent} bytes were sent"
    return sent


def _download(port: int, seconds: float) -> int:
    """Read an endless app for ``seconds``; how much came."""
    got = 0
    buf = bytearray(1024 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n = sock.recv_into(buf)
            assert n, "the app's stream ended"
            got += n
    return got


def _streams_data(port: int) -> bool:
    """True when a connection to the endless app gets its first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        return len(sock.recv(65536)) > 0


def test_memory_returns_to_idle_after_a_bulk_run(system, backend, record_property):
    """After a bulk run both ways, the relay's and the connector's RSS come back near idle.

    glibc keeps the heap a bulk run freed (backhaul/memory.py); each worker trims it once
    traffic has been quiet for MemoryTrim.quiet_seconds. Two streams each way over the
    connector's two tunnels, as a benchmark run does.
    """
    import concurrent.futures

    from .harness import wait_until

    reply, source = backend("reply"), backend("source")
    system.start_connector("one")
    up = system.publish_tcp("up", reply.target)
    down = system.publish_tcp("down", source.target)
    system.wait_tunnels("one", 2)
    wait_until(lambda: _streams_data(down), 30, "the source app through the connector", interval=0.2)
    relay, connector = system.relay, system.connectors["one"]
    # Idle: once both processes are settled after their start (their RSS still for a second;
    # a start is a burst too, and is trimmed like one).
    samples = [(relay.rss_kib(), connector.rss_kib())]

    def settled() -> bool:
        samples.append((relay.rss_kib(), connector.rss_kib()))
        return all(abs(a - b) <= 256 for a, b in zip(samples[-1], samples[-2]))

    wait_until(settled, 15, "the relay's and the connector's RSS to settle after their start", interval=1.0)
    idle = samples[-1]

    peak = list(idle)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(_upload, up, BULK_SECONDS) for _ in range(2)]
        runs += [pool.submit(_download, down, BULK_SECONDS) for _ in range(2)]
        while not all(run.done() for run in runs):
            peak = [max(peak[0], relay.rss_kib()), max(peak[1], connector.rss_kib())]
            time.sleep(0.2)
        moved = sum(run.result() for run in runs)
    ended = time.monotonic()
    assert moved > 256 * MiB, f"the bulk run moved only {moved} bytes"

    last = idle

    def near_idle() -> bool:
        nonlocal last
        last = relay.rss_kib(), connector.rss_kib()
        return all(now <= AFTER_BULK_SLACK * before for now, before in zip(last, idle))

    try:
        wait_until(near_idle, 10, "the RSS of the relay and the connector to come back within 25% of idle", interval=0.5)
    finally:
        record_property("rss_kib_idle", idle)
        record_property("rss_kib_peak", peak)
        record_property("rss_kib_after", last)
        print(
            f"RSS KiB relay, connector: idle {idle}, peak {peak}, last {last} "
            f"({time.monotonic() - ended:.1f} s after the run), {moved / MiB:.0f} MiB moved"
        )
