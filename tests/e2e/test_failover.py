"""Failover: crashed workers come back, a dead connector loses no new connection, dead tunnels are found.

Real processes throughout: a relay, connectors run through the CLI, an echo backend,
a load of short echo connections from threads, and a fault proxy between a connector
and the relay that black-holes or half-opens its tunnels.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from .harness import EchoLoad, FaultProxy, connections_to, running_relay, wait_until

pytestmark = pytest.mark.e2e



def _hold(port: int, count: int) -> list[socket.socket]:
    """``count`` echo connections, each proven end to end with one round trip, left open."""
    held = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(sock)
        probe = f"held {i}".encode()
        sock.sendall(probe)
        got = b""
        while len(got) < len(probe):
            chunk = sock.recv(100)
            assert chunk, f"held connection {i} did not echo"
            got += chunk
    return held


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def _workers(proc) -> list[int]:
    return proc.pids()[1:]


def test_a_killed_worker_is_restarted_and_serves_again(system, backend):
    echo = backend("echo")
    port = system.publish_tcp("echo", echo.target)
    conn = system.start_connector("a", workers=2, tunnels=2)  # one tunnel per worker
    system.wait_app(port)
    system.wait_tunnels("a", 2)
    before = wait_until(lambda: len(_workers(conn)) == 2 and _workers(conn), 10, "two connector workers")

    os.kill(before[0], signal.SIGKILL)
    after = wait_until(
        lambda: (w := _workers(conn)) and len(w) == 2 and before[0] not in w and w, 15, "the killed worker to be replaced"
    )
    [new_pid] = set(after) - set(before)
    assert before[1] in after, "the other worker must not be touched"
    assert conn.alive(), "the supervisor outlives its workers"
    system.wait_tunnels("a", 2)

    # Least-loaded routing spreads held streams over both tunnels: the new worker carries its share.
    held = _hold(port, 8)
    try:
        assert connections_to([new_pid], echo.port) >= 2, "the restarted worker carries no stream"
        assert connections_to(after, echo.port) == 8
    finally:
        _close_all(held)
    restarted = conn.log_entries("worker exited; restarting")
    assert [e["pid"] for e in restarted] == [before[0]] and restarted[0]["exitcode"] == -signal.SIGKILL


def test_a_connector_killed_under_load_fails_no_new_connection_and_gets_traffic_again(system, backend):
    echo = backend("echo")
    port = system.publish_tcp("echo", echo.target)
    a = system.start_connector("a")
    b = system.start_connector("b")
    system.wait_app(port)
    system.wait_tunnels("a", 2)
    system.wait_tunnels("b", 2)

    load = EchoLoad(port, clients=16, seconds=4.0).start()
    wait_until(lambda: len(load.attempts) >= 300, 15, "the load to get going on both connectors")
    a.kill()
    dead_at = time.monotonic()  # a's process is reaped: nothing after this can reach it
    attempts = load.join()

    after = [x for x in attempts if x.started >= dead_at]
    assert len(after) > 50, "the load should go on well after the kill"
    failed_after = [x for x in after if not x.ok]
    assert not failed_after, f"{len(failed_after)} connections opened after the kill failed: {failed_after[:3]}"
    # Only streams that were on `a` when it died may fail: the relay counts and logs them.
    failed = [x for x in attempts if not x.ok]
    assert all(x.started < dead_at for x in failed)
    lost = sum(e["streams"] for e in system.relay.log_entries("connector tunnel ended with streams on it"))
    assert len(failed) <= lost, f"{len(failed)} connections failed but the relay logged only {lost} lost streams"
    slowest = max(x.ended - x.started for x in after)
    print(f"SIGKILL under load: {len(attempts)} connections, {len(after)} after the kill (slowest {slowest * 1000:.0f} ms), "
          f"{len(failed)} in flight on the dead connector failed, relay counted {lost} lost streams")

    # `a` comes back: it gets its share of new streams again.
    a = system.start_connector("a")
    system.wait_tunnels("a", 2)
    held = _hold(port, 16)
    try:
        on_a = connections_to(a.pids(), echo.port)
        on_b = connections_to(b.pids(), echo.port)
        assert on_a + on_b == 16
        assert on_a >= 4, f"the restarted connector carries {on_a} of 16 streams"
    finally:
        _close_all(held)


def _ends_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the peer ends ``sock`` (EOF or reset); fails if it is still open after ``seconds``."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"the stream was still open {seconds} s after its tunnel died") from None
    return time.monotonic() - t0


def test_dead_tunnels_are_found_by_keepalive_and_their_streams_fail_over(tmp_path, backend):
    # Short keepalives on both sides so a dead tunnel is found in about 3 s.
    relay_args = ("--keepalive-interval", "1", "--keepalive-timeout", "3")
    with running_relay(tmp_path, relay_args=relay_args) as system:
        fault = FaultProxy(system.port)
        try:
            echo = backend("echo")
            port = system.publish_tcp("echo", echo.target)
            config = tmp_path / "a.toml"
            config.write_text("connect_timeout = 2\n[keepalive]\ninterval = 1\ntimeout = 3\n[backoff]\nmaximum = 1\n")
            system.register("a", service=fault.url)
            a = system.start_connector("a", extra=("--config", str(config)))
            system.wait_app(port)
            stuck = _hold(port, 1)  # on `a`, the only connector so far
            system.start_connector("b")
            system.wait_tunnels("b", 2)
            system.wait_tunnels("a", 2)

            # Black hole: a's tunnels look alive to the relay until keepalive says otherwise.
            fault.blackhole()
            load = EchoLoad(port, clients=8, seconds=3.0).start()
            waited = _ends_within(stuck[0], 10)
            attempts = load.join()
            failed = [x for x in attempts if not x.ok]
            assert attempts and not failed, f"{len(failed)} of {len(attempts)} connections failed: {failed[:3]}"
            slowest = max(x.ended - x.started for x in attempts)
            assert slowest < 8, f"an open waited {slowest:.1f} s; keepalive should fail it over within ~3 s"
            assert waited < 8
            print(f"black hole: {len(attempts)} connections, none failed, slowest {slowest:.1f} s; "
                  f"the stream on the dead tunnel ended after {waited:.1f} s")
            dead = [
                e for e in system.relay.log_entries("connector tunnel ended with streams on it")
                if e["connector"] == system.connector_info("a")["id"] and e["code"] == 14  # PEER_DEAD
            ]
            assert dead, "the relay should log the streams lost with a's dead tunnels"

            fault.heal()
            system.wait_tunnels("a", 2)

            # Half-open: the relay sees a's tunnels close at once; a must find out by keepalive.
            dialed = fault.accepted
            fault.half_open()
            system.wait_tunnels("a", 0, timeout=5)
            assert all(_hold_and_close(port) for _ in range(4)), "b serves while a is cut off"
            wait_until(lambda: fault.accepted > dialed, 10, "a to notice its dead tunnels and redial")
            fault.heal()
            system.wait_tunnels("a", 2)
            held = _hold(port, 8)
            try:
                assert connections_to(a.pids(), echo.port) >= 2, "a should carry streams again once healed"
            finally:
                _close_all(held)
            _close_all(stuck)
        finally:
            fault.close()


def _hold_and_close(port: int) -> bool:
    _close_all(_hold(port, 1))
    return True
