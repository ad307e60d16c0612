"""SIGTERM drains a connector: GOAWAY at once, streams in flight finish up to the deadline, exit 0."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from .harness import EchoLoad

pytestmark = pytest.mark.e2e



def _echo_once(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        assert chunk, f"the stream ended after {len(got)} of {len(data)} echoed bytes"
        got += chunk
    assert got == data


def test_drain_finishes_a_transfer_while_new_connections_go_to_the_other_connector(system, backend):
    echo = backend("echo")
    port = system.publish_tcp("echo", echo.target)
    a = system.start_connector("a")
    system.wait_app(port)

    # A transfer in flight on `a` (the only connector so far), then `b` joins the group.
    transfer = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        _echo_once(transfer, b"first chunk")
        system.start_connector("b")
        system.wait_tunnels("b", 2)

        a.signal(signal.SIGTERM)
        # The relay counts only usable tunnels: a's drop out as soon as its GOAWAY is read.
        system.wait_tunnels("a", 0, timeout=5)
        load = EchoLoad(port, clients=4, seconds=1.5).start()
        # Keep the transfer going well past the SIGTERM: the drain must wait for it.
        for i in range(10):
            _echo_once(transfer, os.urandom(32 * 1024))
            time.sleep(0.1)
        assert a.alive(), "the connector exited while a stream it carried was still going"
        transfer.shutdown(socket.SHUT_WR)
        assert transfer.recv(1) == b"", "the echo stream should end cleanly after our FIN"
    finally:
        transfer.close()

    attempts = load.join()
    failed = [x for x in attempts if not x.ok]
    assert attempts and not failed, f"{len(failed)} of {len(attempts)} new connections failed during the drain: {failed[:3]}"
    assert a.popen.wait(10) == 0, "a drained connector exits 0"
    [drained] = a.log_entries("connector worker drained")
    assert drained["streams_cut"] == 0 and drained["streams_ended"] >= 1, drained


def test_drain_deadline_cuts_what_is_left_and_a_lone_draining_connector_refuses_cleanly(system, backend):
    echo = backend("echo")
    port = system.publish_tcp("echo", echo.target)
    a = system.start_connector("a", extra=("--drain-timeout", "3"))
    system.wait_app(port)

    held = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        _echo_once(held, b"this stream never ends by itself")
        a.signal(signal.SIGTERM)
        t0, sigterm_at = time.monotonic(), time.time()
        system.wait_tunnels("a", 0, timeout=5)  # the relay has a's GOAWAY: no usable tunnel left
        # No other connector: a new connection during the drain is closed at once, without a byte
        # (a reset when the relay closes it with our bytes unread, which the kernel answers with RST).
        t1 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as late:
            late.sendall(b"anyone?")
            try:
                answer = late.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b"", "a connection no connector can take gets no bytes"
        assert time.monotonic() - t1 < 1.0, "the connection should be refused at once, not at the drain deadline"
        # The held stream stays up until the drain deadline, then is cut.
        held.settimeout(10)
        try:
            tail = held.recv(100)
        except ConnectionResetError:
            tail = b""
        waited = time.monotonic() - t0
        assert tail == b""
        assert 2.5 <= waited < 8.0, f"the stream was cut after {waited:.1f} s; the drain deadline is 3 s"
    finally:
        held.close()
    assert a.popen.wait(10) == 0
    [drained] = a.log_entries("connector worker drained")
    assert drained["streams_cut"] == 1 and drained["streams_in_flight"] == 1, drained
    refused = [
        e for e in system.relay.log_entries("stream ended")
        if e["ts"] >= sigterm_at - 0.01 and "no active connector" in e.get("result", "")
    ]
    assert len(refused) == 1, "the relay refused the late connection for want of a connector"
