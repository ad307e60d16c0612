"""Connector registration end to end: `service init`, a running relay, `connector register`."""

from __future__ import annotations

import json
import socket
import ssl
import stat

import pytest

from backhaul.protocol.constants import ALPN_TUNNEL
from backhaul.supervisor import EXIT_NO_RESTART

from .harness import echoes, wait_until

pytestmark = pytest.mark.e2e


def _register(system, state, token, pin=None, check=False):
    return system.cli(
        "connector", "register", "--service", system.url, "--token", token,
        "--ca-sha256", pin or system.ca_sha256, "--state-dir", str(state), "--name", "edge-1",
        check=check,
    )


def _one_line_error(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backhaul: "), result.stderr
    return lines[0]


def test_register_writes_a_private_state_dir_without_the_token(system, tmp_path):
    token = system.token()
    state = tmp_path / "state"
    result = _register(system, state, token, check=True)
    info = json.loads((state / "connector.json").read_text())
    assert info["service"] == system.url and info["name"] == "edge-1"
    assert info["connector_id"] in result.stdout
    assert sorted(p.name for p in state.iterdir()) == ["ca.pem", "cert.pem", "connector.json", "key.pem", "logs"]
    assert sorted(p.name for p in (state / "logs").iterdir()) == ["admin.log"]
    assert stat.S_IMODE((state / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "logs").stat().st_mode) == 0o700
    for path in state.rglob("*"):
        if path.is_file():
            assert token not in path.read_text()
    listed = system.admin_json("connector", "list")
    assert [(c["id"], c["name"], c["group"], c["status"]) for c in listed] == [(info["connector_id"], "edge-1", "default", "inactive")]
    again = _register(system, state, system.token())
    assert "already holds a registered connector" in _one_line_error(again)


def test_wrong_pin_bogus_and_used_tokens_are_refused(system, tmp_path):
    token = system.token()
    wrong = _register(system, tmp_path / "a", token, pin="ab" * 32)
    assert "not the pinned" in _one_line_error(wrong)
    assert not (tmp_path / "a" / "connector.json").exists()
    malformed = _register(system, tmp_path / "b", token, pin="xyz")
    assert "64 hex digits" in _one_line_error(malformed)
    bogus = _register(system, tmp_path / "c", "bht_not-a-token")
    assert "unknown, expired or used up" in _one_line_error(bogus)
    pin_with_colons = ":".join(system.ca_sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    _register(system, tmp_path / "d", token, pin=pin_with_colons, check=True)  # the token was not used up above
    used = _register(system, tmp_path / "e", token)
    assert "used up" in _one_line_error(used)
    assert len(system.admin_json("connector", "list")) == 1


def test_connector_turns_active_then_deleted_connector_is_shut_out(system, backend):
    echo = backend("echo")
    system.start_connector("one")
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    (conn,) = system.admin_json("connector", "list")
    assert conn["status"] == "active" and conn["name"] == "one" and conn["tunnels"] >= 1
    system.admin("connector", "delete", conn["id"])
    assert system.admin_json("connector", "list") == []
    wait_until(lambda: not echoes(port), 10, "the relay to drop the deleted connector's tunnels")
    # Restarted with its revoked certificate, the connector is told to re-register, gets no
    # tunnel, and stops for good with EXIT_NO_RESTART (systemd's RestartPreventExitStatus).
    system.connectors["one"].stop()
    restarted = system.start_connector("one")
    wait_until(lambda: not restarted.alive(), 20, "the restarted connector to stop")
    assert restarted.popen.returncode == EXIT_NO_RESTART
    errors = [line for line in restarted.log().splitlines() if '"level":"error"' in line]
    assert len(errors) == 1 and "deleted by an admin: re-register" in errors[0], errors
    assert not echoes(port)
    # Whoever dials a tunnel with that certificate is refused at the tunnel too.
    state = system.workdir / "conn-one"
    tls = ssl.create_default_context(cafile=str(state / "ca.pem"))
    tls.load_cert_chain(str(state / "cert.pem"), str(state / "key.pem"))
    tls.set_alpn_protocols([ALPN_TUNNEL])
    with socket.create_connection(("127.0.0.1", system.port), timeout=10) as raw:
        with tls.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            assert sock.selected_alpn_protocol() == ALPN_TUNNEL
            assert sock.recv(1) == b""  # closed by the relay, no hello
    wait_until(lambda: "tunnel refused" in system.relay.log(), 10, "the relay to log the refused tunnel")
