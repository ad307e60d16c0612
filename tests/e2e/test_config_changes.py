"""A connector applies new configuration live: allowed streams carry on, the rest are reset."""

from __future__ import annotations

import socket
import time

import pytest

from .harness import wait_until

pytestmark = pytest.mark.e2e


def _echo_once(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_deleting_an_app_resets_its_streams_and_spares_the_others(system, backend):
    kept_backend, dropped_backend = backend("echo"), backend("echo")
    system.start_connector("one", tunnels=1)
    kept = system.publish_tcp("kept", kept_backend.target)
    dropped = system.publish_tcp("dropped", dropped_backend.target)
    system.wait_app(kept)
    system.wait_app(dropped)
    with socket.create_connection(("127.0.0.1", kept), timeout=10) as stays, socket.create_connection(
        ("127.0.0.1", dropped), timeout=10
    ) as goes:
        assert _echo_once(stays, b"before") == b"before"
        assert _echo_once(goes, b"before") == b"before"
        system.admin("app", "delete", "dropped")
        started = time.monotonic()

        def reset():
            try:
                return goes.recv(100) == b""
            except ConnectionResetError:
                return True

        # The config-changed hint makes the connector pull at once and reset the stream.
        goes.settimeout(15)
        assert reset()
        assert time.monotonic() - started < 15
        wait_until(
            lambda: "no longer allowed by the configuration" in system.connectors["one"].log(), 5, "the reset to be logged"
        )
        assert _echo_once(stays, b"after") == b"after"
