"""The relay's settings file (parsing, errors, flags over the file, live vs restart keys),
relay.json and the admin CLI's order of precedence, and the admin log reader."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from backhaul.admin.client import resolve_target
from backhaul.cli import build_parser
from backhaul.config import LogFiles
from backhaul.errors import ConfigError
from backhaul.logs import ADMIN_LOG, read_admin_log, rotating_file
from backhaul.relay.settings import SCALARS, TABLES, SettingsFile, read_file, split_changes
from backhaul.relayfile import RELAY_FILE, read_service_url, service_url, write_relay_file

pytestmark = pytest.mark.codec_independent


def _args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["service", "run", "--data-dir", "/nowhere", *flags])


def test_every_service_run_flag_has_a_key():
    args = vars(_args())
    flags = set(args) - {"data_dir", "config", "func", "command", "action"}
    table_flags = {flag for _, flag in TABLES.values() if flag}
    assert flags - table_flags == set(SCALARS), "a `service run` flag without a settings file key (or a key without a flag)"


def test_flags_win_over_the_file_and_tables_merge(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text('listen = "0.0.0.0:9443"\nworkers = 3\n[http_limits]\nheader_timeout = 5\nmax_connections = 7\n[floods]\nping_rate = 2\n')
    merged = SettingsFile(_args("--workers", "2", "--http-limit", "max_connections=9"), config).merged()
    assert merged.listen == "0.0.0.0:9443" and merged.workers == 2
    assert merged.http_limit == ["header_timeout=5.0", "max_connections=7", "max_connections=9"], "the flag's comes last, so it wins"
    assert merged.floods == ["ping_rate=2.0"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("lisen = 'x:1'\n", ["unknown key 'lisen'", "listen"]),
        ("workers = 'two'\n", ["workers must be a whole number"]),
        ("drain_grace = true\n", ["drain_grace must be a number"]),
        ("log_level = 'loud'\n", ["log_level must be one of"]),
        ("[http_limits]\nno_such = 1\n", ["unknown key http_limits.no_such"]),
        ("[listen_limits]\nidle_timeout = -1\n", ["[listen_limits] is not valid", "idle_timeout"]),
        ("[tls]\nciphersuites = 'RC4'\n", ["[tls] is not valid"]),
        ("data_dir = '/x'\n", ["unknown key 'data_dir'", "command line"]),
        ("workers = \n", ["not valid TOML"]),
    ],
)
def test_bad_files_name_the_key_and_the_file(tmp_path, text, words):
    config = tmp_path / "relay.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_file(config)
    message = str(caught.value)
    assert str(config) in message
    for word in words:
        assert word in message


def test_changed_keys_split_into_live_and_restart(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text("[http_limits]\nmax_connections = 7\n")
    source = SettingsFile(_args(), config)
    old = source.merged()
    config.write_text('log_level = "debug"\nlisten = "127.0.0.1:1"\n[http_limits]\nmax_connections = 8\n[tls]\nktls = 1\n')
    live, restart = split_changes(old, source.merged())
    assert sorted(live) == ["http_limits", "log_level"]
    assert sorted(restart) == ["listen", "tls"]


def test_relay_file_and_the_admin_clis_order_of_precedence(tmp_path):
    assert service_url("0.0.0.0", 9443) == "https://127.0.0.1:9443"
    assert service_url("::", 9443) == "https://[::1]:9443"
    assert service_url("relay.example", 443) == "https://relay.example:443"
    (tmp_path / "admin.token").write_text("t\n")
    (tmp_path / "ca.pem").write_text("ca")
    assert resolve_target(service=None, token_file=None, data_dir=str(tmp_path), environ={}).service_source == "the default"
    write_relay_file(tmp_path, "0.0.0.0", 9555, "0.0.0.0:9555", "relay.example:9555")
    assert json.loads((tmp_path / RELAY_FILE).read_text())["advertise"] == "relay.example:9555"
    target = resolve_target(service=None, token_file=None, data_dir=str(tmp_path), environ={})
    assert (target.service_url, target.service_source) == ("https://127.0.0.1:9555", str(tmp_path / RELAY_FILE))
    env = {"BACKHAUL_SERVICE": "https://env:1"}
    assert resolve_target(service=None, token_file=None, data_dir=str(tmp_path), environ=env).service_url == "https://env:1"
    assert resolve_target(service="https://flag:2", token_file=None, data_dir=str(tmp_path), environ=env).service_url == "https://flag:2"
    (tmp_path / RELAY_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="relay.json is not valid JSON"):
        read_service_url(tmp_path)


def test_admin_log_reader_newest_first_filtered_and_limited(tmp_path):
    handler = rotating_file(tmp_path / ADMIN_LOG, LogFiles(directory=tmp_path, max_bytes=2048, backups=3))
    logger = logging.getLogger("test.relay.adminlog")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        for i in range(60):
            if i % 10 == 0:
                logger.warning("app deleted", extra={"app": f"app{i}"})
            else:
                logger.info("app published", extra={"app": f"app{i}"})
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert (tmp_path / f"{ADMIN_LOG}.1").is_file(), "the test spans rotated files"
    newest = read_admin_log(tmp_path, limit=3)
    assert [e["app"] for e in newest] == ["app59", "app58", "app57"]
    warnings = read_admin_log(tmp_path, level="warning", limit=100)
    assert warnings and all(e["msg"] == "app deleted" for e in warnings)
    assert [e["app"] for e in warnings] == sorted((e["app"] for e in warnings), key=lambda a: -int(a[3:]))
    assert [e["app"] for e in read_admin_log(tmp_path, text="APP42")] == ["app42"]
    assert read_admin_log(tmp_path / "missing") == []
    with pytest.raises(ValueError):
        read_admin_log(tmp_path, level="loud")
