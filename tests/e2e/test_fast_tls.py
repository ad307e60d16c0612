"""The connector's optional TLS transport (``[tls] transport = "aiofastnet"``) end to end: a
connector dials over aiofastnet and a TCP app carries bulk bytes and short exchanges intact
through it, with the relay on its default uvloop TLS. Skipped where aiofastnet is not
installed (it is an optional dependency: the ``fast-tls`` extra; the test command installs it)."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import socket
import threading

import pytest

from .harness import running_relay

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("aiofastnet") is None, reason="aiofastnet is not installed (optional)"),
]

MiB = 1024 * 1024


def _round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_connector_on_aiofastnet_carries_bulk_and_short_exchanges(tmp_path, backend):
    config = tmp_path / "connector.toml"
    config.write_text('[tls]\ntransport = "aiofastnet"\n')
    with running_relay(tmp_path) as system:
        echo = backend("echo")
        connector = system.start_connector("fast", tunnels=2, extra=("--config", str(config)))
        port = system.publish_tcp("echo", echo.target)
        system.wait_app(port)

        for n in range(50):
            message = f"exchange {n}".encode()
            assert _round_trip(port, message) == message

        rng = random.Random(14)
        blob = rng.randbytes(24 * MiB)
        results: list[bytes] = []
        threads = [threading.Thread(target=lambda: results.append(_round_trip(port, blob))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 2
        assert all(hashlib.sha256(r).digest() == hashlib.sha256(blob).digest() for r in results)

        # Which TLS carried the tunnels, read after the fact from the connector's own log lines.
        lines = connector.log_entries("tunnel up")
        assert lines and {line["tls_transport"] for line in lines} == {"aiofastnet"}
