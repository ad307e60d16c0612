"""Certificates renew by themselves, and a transfer keeps running across renewals."""

from __future__ import annotations

import socket
import time

import pytest

from .harness import BACKHAUL, Proc

pytestmark = pytest.mark.e2e


def test_transfer_runs_across_several_renewals(system, backend):
    echo = backend("echo")
    # Certificates that live 10 s (the shortest the relay allows): renewed after about 7 s.
    system.relay.stop()
    system.relay = Proc(
        "relay-short-certs",
        BACKHAUL + ["service", "run", "--data-dir", str(system.data_dir), "--listen", f"127.0.0.1:{system.port}",
                    "--workers", "1", "--cert-validity", "10"],
        system.workdir,
    )
    system.procs.append(system.relay)
    system.wait_healthy()
    state = system.register("short")
    proc = Proc(
        "connector-short",
        BACKHAUL + ["connector", "run", "--state-dir", str(state), "--workers", "1", "--tunnels", "1", "--heartbeat", "1"],
        system.workdir,
    )
    system.procs.append(proc)
    system.connectors["short"] = proc
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sent = 0
        # Until the second renewal (one pull of a fresh certificate after another), or 30 s.
        while time.monotonic() - started < 30 and proc.log().count('"certificate renewed"') < 2:
            block = b"%08d" % sent * 128
            sock.sendall(block)
            got = b""
            while len(got) < len(block):
                got += sock.recv(len(block) - len(got))
            assert got == block
            sent += 1
            time.sleep(0.05)
    renewals = proc.log().count('"certificate renewed"')
    assert renewals >= 2, proc.log()[-2000:]
    # The connector still works with its newest certificate: fresh connections get through.
    system.wait_app(port, timeout=15)
