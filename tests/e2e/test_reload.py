"""SIGHUP reloads a running connector's settings file; what changed shows in what it does."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from .harness import echoes

pytestmark = pytest.mark.e2e



def test_sighup_applies_tunnels_and_drain_timeout_and_survives_a_broken_file(system, backend):
    echo = backend("echo")
    port = system.publish_tcp("echo", echo.target)
    config = system.workdir / "connector.toml"
    config.write_text("tunnels = 2\ndrain_timeout = 30\n")
    conn = system.start_connector("a", workers=2, tunnels=None, extra=("--config", str(config)))
    system.wait_app(port)
    system.wait_tunnels("a", 2)

    # As systemd's ExecReload does: SIGHUP to the main process only; the supervisor passes it on.
    config.write_text("tunnels = 4\ndrain_timeout = 1\nworkers = 3\n[flow]\nmax_streams = 1000\n")
    os.kill(conn.pid, signal.SIGHUP)
    system.wait_tunnels("a", 4)
    assert len(conn.pids()) == 3, "--workers 2 on the command line wins over the file: a supervisor and two workers"

    # A broken file is refused whole; the connector keeps its settings and keeps serving.
    config.write_text("tunnels = \n")
    os.kill(conn.pid, signal.SIGHUP)
    assert echoes(port) and system.connector_info("a")["tunnels"] == 4
    config.write_text("tunnels = 2\ndrain_timeout = 1\n")
    os.kill(conn.pid, signal.SIGHUP)
    system.wait_tunnels("a", 2)  # extra tunnels are retired, not just forgotten
    assert echoes(port)

    # The drain deadline is 1 s now, not 30: a stream that never ends is cut after about a second.
    held = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        t0 = time.monotonic()
        os.kill(conn.pid, signal.SIGTERM)
        assert conn.popen.wait(15) == 0
        assert time.monotonic() - t0 < 8, "the reloaded drain deadline (1 s) was not applied"
    finally:
        held.close()

    reloads = conn.log_entries("settings reloaded")
    assert len(reloads) >= 4, "each worker reloads on each SIGHUP the supervisor passes on"
    assert [r["need_restart"] for r in reloads[:2]] == [["flow"], ["flow"]], "buffers are sized at start"
    assert reloads[0]["applied"] == {"tunnels": 4, "drain_timeout": 1.0}
    # The broken file may or may not have been read before the good one replaced it; if it
    # was, it was refused with a reason.
    refused = conn.log_entries("settings not reloaded; keeping the current ones")
    assert all("not valid TOML" in r["error"] for r in refused)
