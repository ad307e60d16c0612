"""The relay's operator files end to end: relay.json for the admin CLI, the settings file
and its SIGHUP reload (in every worker), the admin log file."""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from .harness import System, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.codec_independent]

CONNECTIONS = 10


def _statuses(port: int, count: int) -> list[bytes]:
    """The status line of one request on each of ``count`` connections held open together."""
    socks, statuses = [], []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: nothing.test\r\n\r\n")
            statuses.append(sock.recv(64).split(b"\r\n", 1)[0])
    finally:
        for sock in socks:
            sock.close()
    return statuses


def _refused(port: int) -> int:
    return sum(1 for status in _statuses(port, CONNECTIONS) if status.startswith(b"HTTP/1.1 429"))


def test_admin_cli_finds_the_relay_and_settings_reload_on_sighup(tmp_path):
    system = System(tmp_path)
    config = tmp_path / "relay.toml"
    config.write_text('log_level = "info"\n[http_limits]\nmax_connections_per_client = 1\n')
    try:
        system.init()
        relay = system.start_relay(workers=2, extra=("--config", str(config)))

        # relay.json: the admin CLI with only --data-dir reaches the relay on its free port.
        recorded = json.loads((system.data_dir / "relay.json").read_text())
        assert recorded["service_url"] == system.url
        listed = system.cli("admin", "--data-dir", str(system.data_dir), "--json", "group", "list")
        assert json.loads(listed.stdout)[0]["name"] == "default"
        system.cli("admin", "--data-dir", str(system.data_dir), "group", "create", "ops")

        # The file's limit holds in every worker: one connection per address per worker.
        assert _refused(system.http_port) >= CONNECTIONS - 2

        # SIGHUP with a higher limit: every worker admits all of them.
        config.write_text('log_level = "info"\nudp_max_flows = 10\n[http_limits]\nmax_connections_per_client = 50\n')
        os.kill(relay.pid, signal.SIGHUP)  # the supervisor only, as systemctl reload does
        wait_until(lambda: _refused(system.http_port) == 0, 20, "the reloaded limit in every worker", interval=0.2)
        wait_until(
            lambda: len(relay.log_entries("settings need a restart; the running values are kept")) == 2,
            20, "both workers to refuse the key that needs a restart",
        )
        restart = relay.log_entries("settings need a restart; the running values are kept")
        assert [e["keys"] for e in restart] == [["udp_max_flows"]] * 2, "each worker names the key it did not apply"

        # A bad file is refused whole: the relay keeps serving with the running settings.
        config.write_text('[http_limits]\nmax_connections_per_client = 1\nno_such_limit = 3\n')
        os.kill(relay.pid, signal.SIGHUP)  # the supervisor only, as systemctl reload does
        wait_until(
            lambda: len(relay.log_entries("settings file refused; the relay keeps its running settings")) == 2,
            20, "both workers to refuse the bad file",
        )
        refusal = relay.log_entries("settings file refused; the relay keeps its running settings")[0]
        assert "no_such_limit" in refusal["error"] and str(config) in refusal["error"]
        assert _refused(system.http_port) == 0, "the running limit is kept"
        system.wait_healthy()
        assert relay.alive()

        # The admin log in DATA_DIR/logs: the control API's events, not a line per connection.
        from backhaul.logs import read_admin_log

        events = read_admin_log(system.data_dir / "logs", limit=1000)
        assert [e["group"] for e in events if e["msg"] == "group created"] == ["ops"]
        assert any(e["msg"] == "settings file refused; the relay keeps its running settings" for e in events)
        assert not [e for e in events if e["msg"] == "http connection closed"], "per-connection lines stay out"

        # The admin CLI says where the URL came from when the relay is gone.
        relay.stop()
        down = system.cli("admin", "--data-dir", str(system.data_dir), "group", "list", check=False)
        assert down.returncode != 0 and "relay.json" in down.stderr and "cannot reach" in down.stderr
    finally:
        system.stop()


def test_a_bad_settings_file_starts_nothing(tmp_path):
    system = System(tmp_path)
    system.init()
    config = tmp_path / "relay.toml"
    config.write_text("workers = \"two\"\n")
    result = system.cli("service", "run", "--data-dir", str(system.data_dir), "--config", str(config), check=False, timeout=30)
    assert result.returncode != 0
    assert "workers" in result.stderr and str(config) in result.stderr
    assert not (system.data_dir / "relay.json").exists(), "nothing started"
