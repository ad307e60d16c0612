"""Operator mistakes the relay and connector must catch: a second relay on one data dir,
a deleted connector that would redial forever, a data dir others can read, an enrollment
token on the command line."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from backhaul.supervisor import EXIT_NO_RESTART

from tests.e2e.harness import BACKHAUL, Proc, System, echoes, free_port, wait_until

pytestmark = pytest.mark.e2e

LOOSE = "the data dir or its secrets can be read by other users; make them private"


def _one_line_error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("backhaul: "), result.stderr
    return lines[0]


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _errors(proc: Proc) -> list[dict]:
    entries = []
    for line in proc.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") == "error":
            entries.append(entry)
    return entries


def test_init_tightens_modes_run_warns_and_a_second_run_is_refused(tmp_path):
    system = System(tmp_path)
    try:
        # Init into an existing 0755 dir: the dir becomes 0700, the secrets and the store 0600.
        system.data_dir.mkdir(mode=0o755)
        system.data_dir.chmod(0o755)
        system.init()
        assert _mode(system.data_dir) == 0o700
        for name in ("ca.key", "service.key", "admin.token", "store.sqlite"):
            assert _mode(system.data_dir / name) == 0o600, name
        for extra in ("store.sqlite-wal", "store.sqlite-shm"):
            if (system.data_dir / extra).exists():
                assert _mode(system.data_dir / extra) == 0o600, extra
        if os.geteuid() == 0:
            # A dir that belongs to another user is not init's to tighten: refused, with the reason.
            foreign = tmp_path / "foreign"
            foreign.mkdir(mode=0o755)
            os.chown(foreign, 65534, 65534)
            refused = system.cli("service", "init", "--data-dir", str(foreign), check=False)
            assert "belongs to uid 65534" in _one_line_error(refused)
            assert list(foreign.iterdir()) == [] and _mode(foreign) == 0o755
        # Loosened afterwards (a restore, a careless chmod): `service run` says so, in one line.
        system.data_dir.chmod(0o755)
        (system.data_dir / "store.sqlite").chmod(0o644)
        relay = system.start_relay()
        (warning,) = relay.log_entries(LOOSE)
        assert warning["level"] == "warning"
        assert set(warning["files"]) == {str(system.data_dir), str(system.data_dir / "store.sqlite")}
        assert f"chmod 700 {system.data_dir}" in warning["fix"] and f"chmod 600 {system.data_dir / 'store.sqlite'}" in warning["fix"]
        # A second relay on the same data dir (another port even) refuses to start, naming the first.
        second = system.cli(
            "service", "run", "--data-dir", str(system.data_dir), "--listen", f"127.0.0.1:{free_port()}",
            "--http", f"127.0.0.1:{free_port()}", "--workers", "2", check=False, timeout=30,
        )
        line = _one_line_error(second)
        assert f"PID {relay.pid}" in line and "already running" in line
        # Two listeners on one address would both bind (SO_REUSEPORT) and split the connections.
        port = free_port()
        for http in (f"127.0.0.1:{port}", f"0.0.0.0:{port}"):
            shared = system.cli(
                "service", "run", "--data-dir", str(system.data_dir), "--listen", f"127.0.0.1:{port}",
                "--http", http, check=False, timeout=30,
            )
            assert "use the same address" in _one_line_error(shared)
        assert relay.alive() and system.health()["status"] == "ok"
        assert (system.data_dir / "relay.lock").read_text().strip() == str(relay.pid)
        # Once the first has stopped, the data dir is free again.
        relay.stop()
        system.data_dir.chmod(0o700)
        (system.data_dir / "store.sqlite").chmod(0o600)
        again = system.start_relay(workers=2)
        assert again.log_entries(LOOSE) == []
    finally:
        system.stop()


def test_a_deleted_connector_stops_for_good_but_an_unreachable_relay_is_waited_for(system, backend):
    echo = backend("echo")
    proc = system.start_connector("one", workers=2, extra=("--heartbeat", "1"))
    port = system.publish_tcp("echo", echo.target)
    system.wait_app(port)
    # A relay that is down is a transient failure: the connector keeps trying, and comes back.
    system.relay.stop()
    wait_until(lambda: len(proc.log_entries("heartbeat failed; will retry")) >= 2, 20, "heartbeats to fail while the relay is down")
    assert proc.alive() and _errors(proc) == []
    system.start_relay()
    system.wait_app(port)
    # Deleted by an admin: the next heartbeat says so; one error line, status 78, no restart.
    (info,) = system.admin_json("connector", "list")
    system.admin("connector", "delete", info["id"])
    wait_until(lambda: not proc.alive(), 20, "the deleted connector to exit")
    assert proc.popen.returncode == EXIT_NO_RESTART
    (error,) = _errors(proc)
    assert "deleted by an admin: re-register" in error["msg"] and "backhaul connector register" in error["msg"]
    assert info["id"] in error["msg"]
    assert not echoes(port)
    # Started again with the deleted registration (as systemd would without RestartPreventExitStatus):
    # it stops at its first config pull, the same way.
    restarted = system.start_connector("one", workers=1)
    wait_until(lambda: not restarted.alive(), 20, "the restarted deleted connector to exit")
    assert restarted.popen.returncode == EXIT_NO_RESTART
    (error,) = _errors(restarted)
    assert "deleted by an admin: re-register" in error["msg"]


def test_register_takes_the_token_from_a_file_or_the_environment_and_exactly_one_way(system, tmp_path):
    def register(state: str, *flags: str, env: dict | None = None):
        argv = ["connector", "register", "--service", system.url, "--ca-sha256", system.ca_sha256, "--state-dir", str(tmp_path / state), *flags]
        base = {k: v for k, v in os.environ.items() if k != "BACKHAUL_ENROLL_TOKEN"}
        return subprocess.run(
            BACKHAUL + argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env={**base, **(env or {})}
        )

    token_file = tmp_path / "token"
    token_file.write_text(system.token() + "\n")
    token_file.chmod(0o600)
    done = register("by-file", "--token-file", str(token_file))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "by-file" / "connector.json").exists()
    done = register("by-env", env={"BACKHAUL_ENROLL_TOKEN": system.token()})
    assert done.returncode == 0, done.stderr
    token = system.token()
    for state, flags, env in (
        ("both", ("--token", token, "--token-file", str(token_file)), None),
        ("env-and-flag", ("--token", token), {"BACKHAUL_ENROLL_TOKEN": token}),
        ("env-and-file", ("--token-file", str(token_file)), {"BACKHAUL_ENROLL_TOKEN": token}),
        ("none", (), None),
    ):
        line = _one_line_error(register(state, *flags, env=env))
        assert "exactly one way" in line and "process list" in line, line
        assert token not in line
        assert not (tmp_path / state).exists()
    line = _one_line_error(register("missing", "--token-file", str(tmp_path / "nope")))
    assert "cannot read --token-file" in line
    assert system.admin_json("token", "list")[0]["uses_left"] == 1  # the refused ones used nothing
    helped = system.cli("connector", "register", "--help").stdout
    assert "--token-file" in helped and "BACKHAUL_ENROLL_TOKEN" in helped and "process list" in helped
