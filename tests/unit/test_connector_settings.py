"""Connector settings: defaults, then the TOML file, then the flags; what a reload applies live."""

from __future__ import annotations

import dataclasses

import pytest

from backhaul.cli import build_parser
from backhaul.config import ClusterSettings, Keepalive
from backhaul.connector.service import _FLAGS
from backhaul.connector.settings import MAX_CONFIG_BYTES, SettingsSource, split_changes
from backhaul.errors import ConfigError
from backhaul.supervisor import RESTART_MAX, restart_delay

pytestmark = pytest.mark.codec_independent


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "connector.toml"

    def write(text: str):
        path.write_text(text)
        return path

    return write


def test_file_wins_over_defaults_and_flags_win_over_the_file(tmp_path, config):
    path = config('tunnels = 6\nheartbeat_interval = 5\nlog_level = "debug"\n[keepalive]\ninterval = 1\ntimeout = 3\n')
    source = SettingsSource(tmp_path, path, (("tunnels", 3),), default_workers=7)
    settings = source.load(boot_id="b", worker=2)
    assert (settings.tunnels, settings.heartbeat_interval, settings.log_level) == (3, 5.0, "debug")
    assert settings.keepalive == Keepalive(interval=1.0, timeout=3.0)
    assert (settings.workers, settings.boot_id, settings.worker, settings.drain_timeout) == (7, "b", 2, 30.0)


def test_without_a_file_the_flags_and_defaults_apply(tmp_path):
    settings = SettingsSource(tmp_path, None, (("drain_timeout", 2.5),)).load()
    assert (settings.drain_timeout, settings.tunnels, settings.workers) == (2.5, 4, 1)


@pytest.mark.parametrize(
    "text, words",
    [
        ("tunnels = ", "not valid TOML"),
        ("tunels = 3", "unknown key 'tunels'"),
        ("tunnels = 'many'", "tunnels must be a whole number"),
        ("tunnels = true", "tunnels must be a whole number"),
        ("drain_timeout = 'soon'", "drain_timeout must be a number"),
        ("state_dir = '/x'", "unknown key 'state_dir'"),
        ("tunnels = 0", "at least 1"),
        ("drain_timeout = -1", "must not be negative"),
        ("log_level = 'loud'", "log_level must be one of"),
        ("keepalive = 3", "[keepalive] must be a table"),
        ("[keepalive]\ninterval = 5\ntimeout = 2", "keepalive.interval must be above 0 and below keepalive.timeout"),
        ("[keepalive]\nperiod = 5", "unknown key keepalive.period"),
        ("[flow]\nstream_window = 10", "[flow] is not valid"),
        ("[backoff]\ninitial = 5\nmaximum = 1", "backoff needs"),
        ("relay_nodes = 0", "relay_nodes must be from 1 to 64"),
        ("relay_nodes = 65", "relay_nodes must be from 1 to 64"),
        ("relay_nodes = 1.5", "relay_nodes must be a whole number"),
    ],
)
def test_a_bad_file_is_refused_with_a_reason_naming_it(tmp_path, config, text, words):
    path = config(text)
    with pytest.raises(ConfigError) as info:
        SettingsSource(tmp_path, path).load()
    assert words in str(info.value) and str(path) in str(info.value)


def test_missing_and_oversized_files_are_refused(tmp_path, config):
    with pytest.raises(ConfigError, match="cannot read the settings file"):
        SettingsSource(tmp_path, tmp_path / "nope.toml").load()
    path = config("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        SettingsSource(tmp_path, path).load()


def test_a_bad_flag_is_blamed_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="^the command line: workers, tunnels and max_slots must be at least 1"):
        SettingsSource(tmp_path, None, (("tunnels", 0),)).load()


def test_reload_applies_live_keys_and_names_the_ones_that_need_a_restart(tmp_path, config):
    old = SettingsSource(tmp_path, config("tunnels = 2\n")).load()
    new = SettingsSource(
        tmp_path, config("tunnels = 4\nworkers = 3\ndrain_timeout = 1\n[keepalive]\ninterval = 2\ntimeout = 5\n[flow]\nmax_streams = 10\n")
    ).load()
    live, restart = split_changes(old, new)
    assert live == {"tunnels": 4, "drain_timeout": 1.0, "keepalive": Keepalive(2.0, 5.0)}
    assert sorted(restart) == ["flow", "workers"]
    assert split_changes(old, dataclasses.replace(old, boot_id="other", worker=5)) == ({}, [])


def test_restart_backoff_grows_and_is_capped():
    delays = [restart_delay(n) for n in range(1, 30)]
    assert delays == sorted(delays) and delays[0] < 1 and delays[-1] == RESTART_MAX


def test_relay_nodes_defaults_to_the_clusters_count_and_follows_the_flag_and_reloads_live(tmp_path, config):
    assert SettingsSource(tmp_path).load().relay_nodes == ClusterSettings.connector_nodes == 2
    args = build_parser().parse_args(["connector", "run", "--state-dir", str(tmp_path), "--relay-nodes", "3"])
    assert (args.relay_nodes, _FLAGS["relay_nodes"]) == (3, "relay_nodes")
    old = SettingsSource(tmp_path, config("relay_nodes = 2\n")).load()
    new = SettingsSource(tmp_path, config("relay_nodes = 1\n"), (("relay_nodes", 3),)).load()
    assert new.relay_nodes == 3 and split_changes(old, new) == ({"relay_nodes": 3}, [])
