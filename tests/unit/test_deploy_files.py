"""The shipped deploy files agree with the code: the units' commands parse, the stop timeout
outlasts the drain, and the example settings file loads."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from backhaul.cli import build_parser
from backhaul.connector.agent import ConnectorSettings
from backhaul.connector.service import GRACE_MARGIN
from backhaul.connector.settings import SettingsSource
from backhaul.supervisor import EXIT_NO_RESTART

pytestmark = pytest.mark.codec_independent

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _unit(name: str) -> dict[str, str]:
    """The unit's [Service] settings (last value wins, as in systemd)."""
    values, section = {}, None
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            values[key] = value
    return values


def _command(unit: dict[str, str]):
    argv = shlex.split(unit["ExecStart"])
    assert argv[0].endswith("/backhaul")
    return build_parser().parse_args(argv[1:])


def test_connector_unit_runs_a_valid_command_and_outlasts_the_drain(tmp_path):
    unit = _unit("backhaul-connector.service")
    args = _command(unit)
    assert (args.command, args.action) == ("connector", "run")
    assert args.state_dir in unit["ReadWritePaths"].split()
    settings = SettingsSource(tmp_path, DEPLOY / "connector.toml.example").load()
    assert float(unit["TimeoutStopSec"]) > settings.drain_timeout + GRACE_MARGIN
    assert unit["KillMode"] == "mixed" and unit["KillSignal"] == "SIGTERM" and unit["Restart"] == "on-failure"
    assert unit["ExecReload"].endswith("-HUP $MAINPID")
    assert unit["NoNewPrivileges"] == "yes" and unit["ProtectSystem"] == "strict" and unit["PrivateTmp"] == "yes"
    assert int(unit["LimitNOFILE"]) >= 65536 and unit["User"] == "backhaul"
    # A deleted connector exits with EXIT_NO_RESTART: systemd must not bring it back.
    assert unit["RestartPreventExitStatus"].split() == [str(EXIT_NO_RESTART)]


def test_example_settings_are_the_defaults_written_out(tmp_path):
    settings = SettingsSource(tmp_path, DEPLOY / "connector.toml.example").load()
    assert settings == ConnectorSettings(state_dir=tmp_path, workers=1)


def test_updater_unit_names_the_updater_command():
    unit = _unit("backhaul-updater.service")
    argv = shlex.split(unit["ExecStart"])
    assert argv[1:4] == ["updater", "run", "--state-dir"]
    assert argv[4] in unit["ReadOnlyPaths"].split() and unit["NoNewPrivileges"] == "yes"


def test_relay_unit_runs_a_valid_command_with_its_own_user_and_the_hardening():
    import shutil
    import subprocess

    from backhaul.relay.service import DEFAULT_LISTEN  # noqa: F401  (the module the unit runs)

    unit = _unit("backhaul-relay.service")
    args = _command(unit)
    assert (args.command, args.action) == ("service", "run")
    assert args.data_dir in unit["ReadWritePaths"].split() and args.config == "/etc/backhaul/relay.toml"
    assert unit["User"] == "backhaul-relay" != _unit("backhaul-connector.service")["User"]
    assert "u backhaul-relay " in (DEPLOY / "systemd" / "backhaul.sysusers").read_text()
    assert "/var/lib/" + unit["StateDirectory"] == args.data_dir and unit["StateDirectoryMode"] == "0700"
    assert unit["ExecReload"].endswith("-HUP $MAINPID") and unit["KillMode"] == "mixed"
    connector = _unit("backhaul-connector.service")
    hardening = [key for key in connector if key.startswith(("Protect", "Restrict", "Private", "NoNew", "Capability", "Ambient", "SystemCall", "Lock"))]
    assert len(hardening) > 15
    for key in hardening:
        assert unit.get(key) == connector[key], f"{key} differs from the connector unit's"
    if shutil.which("systemd-analyze"):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            text = (DEPLOY / "systemd" / "backhaul-relay.service").read_text()
            copy = Path(tmp) / "backhaul-relay.service"
            copy.write_text(text.replace("/opt/backhaul/current/venv/bin/backhaul", "/bin/true"))  # no install here
            result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
            complaints = [line for line in result.stderr.splitlines() if str(copy) in line]
            assert result.returncode == 0 and not complaints, result.stderr


def test_relay_example_settings_name_every_key_and_parse_uncommented(tmp_path):
    from backhaul.relay.settings import SCALARS, TABLES, read_file

    text = (DEPLOY / "relay.toml.example").read_text()
    assert read_file(DEPLOY / "relay.toml.example") == {}, "every key is commented out, at its default"
    for key in SCALARS:
        assert f"\n# {key} = " in text, f"{key} is not in the example"
    for key in TABLES:
        assert f"\n# [{key}]\n" in text, f"[{key}] is not in the example"
    import re

    setting = re.compile(r"^# (\[\w+\]$|\w+ = )")
    lines = [line[2:] if setting.match(line) else line for line in text.splitlines()]
    uncommented = tmp_path / "relay.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    values = read_file(uncommented)
    assert set(values) == set(SCALARS) | set(TABLES)
