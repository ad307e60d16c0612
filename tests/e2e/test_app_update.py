"""`backhaul admin app update` end to end: a changed target is reached through the relay; a
refused change prints the relay's reason and changes nothing."""

from __future__ import annotations

import socket

import pytest

from .harness import free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]


def _greeting(port: int) -> bytes | None:
    """The first line a new connection through the relay's ``port`` gets (greet backends say their name)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            got = b""
            while not got.endswith(b"\n") and len(got) < 100:
                chunk = sock.recv(100)
                if not chunk:
                    return None
                got += chunk
            return got.strip()
    except OSError:
        return None


def _one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backhaul: "), result.stderr
    return lines[0]


def test_app_update_moves_the_target_and_a_refusal_changes_nothing(system, backend):
    first = backend("greet", "--name", "first")
    second = backend("greet", "--name", "second")
    system.start_connector("c", tunnels=1)
    system.wait_tunnels("c", 1)
    port = system.publish_tcp("db", first.target)
    wait_until(lambda: _greeting(port) == b"first", 30, "the app to reach its first target", interval=0.2)

    out = system.admin("app", "update", "db", "--target", second.target).stdout
    assert f"updated app db (target): at tcp port {port} via group default -> {second.target}" in out
    wait_until(lambda: _greeting(port) == b"second", 30, "the app to reach its new target", interval=0.2)
    (app,) = system.admin_json("app", "list")
    assert (app["target"], app["port"], app["group"]) == (second.target, port, "default")

    # Refused by the relay, each in its own words; nothing changes.
    other = system.publish_tcp("cache", first.target)
    before = system.admin_json("app", "list")
    refused = {
        ("--tcp", str(other)): f"TCP port {other} is already used by app 'cache'",
        ("--udp", str(free_port())): "an app's proto cannot change",
        ("--group", "nowhere"): "there is no connector group 'nowhere'",
        ("--internal-url", "http://10.0.0.1/"): "internal_url is only for http apps",
    }
    for flags, words in refused.items():
        line = _one_line_error(system.admin("app", "update", "db", *flags, check=False))
        assert words in line, (flags, line)
    assert system.admin_json("app", "list") == before
    assert _greeting(port) == b"second"
    # Nothing given is the CLI's refusal; an unknown app the relay's.
    assert "nothing to change" in _one_line_error(system.admin("app", "update", "db", check=False))
    assert "there is no app 'ghost'" in _one_line_error(system.admin("app", "update", "ghost", "--target", first.target, check=False))
