"""Tunnel key rotation end to end: a relay with a tiny ``rotate_records`` rotates the tunnel
under a long transfer, the connector dials a successor, and the transfer goes on intact on
the old tunnel until it ends; then the old tunnel closes. Real processes on 127.0.0.1,
readiness and the outcome read from the relay's metrics endpoint and admin API."""

from __future__ import annotations

import random
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import echo_digests, free_port, running_relay, wait_until

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
#: Records per tunnel before the relay rotates it: a few MiB of traffic, and far more than an
#: idle tunnel's hello, health and keepalive frames in the seconds this test lasts.
LIMIT = 1000
#: Bytes each way per half of the transfer: 40 MiB is 2,560 full records, past the limit.
HALF = 40 * MiB


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.parametrize("side", ["relay", "connector"])
def test_a_long_transfer_survives_a_key_rotation(tmp_path, backend, side):
    """``side`` is the end with the tiny limit, which notices and sends the GOAWAY."""
    metrics = free_port()
    relay_args = ("--metrics", f"127.0.0.1:{metrics}")
    connector_args: tuple[str, ...] = ()
    if side == "relay":
        relay_args += ("--tls", f"rotate_records={LIMIT}")
    else:
        config = tmp_path / "connector.toml"
        config.write_text(f"[tls]\nrotate_records = {LIMIT}\nrotate_check_interval = 0.2\n")
        connector_args = ("--config", str(config))
    with running_relay(tmp_path, relay_args=relay_args) as system:
        echo = backend("echo")
        system.start_connector("one", tunnels=1, extra=connector_args)
        port = system.publish_tcp("echo", echo.target)
        system.wait_app(port)
        cid = system.connector_info("one")["id"]
        rotated = ("backhaul_relay_events_total", (("event", "tunnels_rotated"),))
        opened = ("backhaul_relay_tunnels_opened_total", (("connector", cid),))
        up = ("backhaul_relay_tunnels", (("connector", cid),))
        before = wait_until(lambda: _scrape(metrics).get(opened) == 1 and _scrape(metrics), 15, "the first tunnel in the figures")
        assert before.get(rotated, 0) == 0

        rng = random.Random(14)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            first = echo_digests(sock, HALF, rng, timeout=60)
            assert first[0] == first[1] and first[2] == HALF
            # Past the limit: one end rotates the tunnel (GOAWAY "key rotation") at its next
            # check; the connector dials a successor while this stream stays on the old one.
            # The relay counts a rotation whichever end sent the GOAWAY.
            wait_until(lambda: _scrape(metrics).get(rotated, 0) >= 1, 15, "the tunnel to be rotated")
            wait_until(
                lambda: (lambda m: m.get(opened) == 2 and m.get(up) == 2)(_scrape(metrics)),
                15, "the successor tunnel beside the draining one",
            )
            # The admin API counts usable tunnels only: the successor, not the draining one.
            system.wait_tunnels("one", 1)
            second = echo_digests(sock, HALF, rng, timeout=60)
            assert second[0] == second[1] and second[2] == HALF, "the transfer on the rotated tunnel lost or changed bytes"
        # Its last stream ended: the old tunnel closes; the successor carries new streams.
        wait_until(lambda: _scrape(metrics).get(up) == 1, 15, "the rotated tunnel to close once its stream ended")
        system.wait_app(port)
        final = _scrape(metrics)
        assert final[rotated] == 1 and final[opened] == 2

        # Every tunnel-up line says kernel TLS is not in use, and why (after the fact, not as readiness).
        lines = system.relay.log_entries("tunnel up")
        assert len(lines) == 2 and all(line["ktls"] is False and line["ktls_reason"] for line in lines)
        rotations = system.relay.log_entries("tunnel rotated: its TLS keys are due")
        assert len(rotations) == 1 and rotations[0]["by"] == side
        noticed = rotations if side == "relay" else system.connectors["one"].log_entries("tunnel rotated: its TLS keys are due")
        assert noticed[0]["records"] >= LIMIT
