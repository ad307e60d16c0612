"""The demo's printed commands: runnable in a new shell, and naming the relay until the data dir does."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from backhaul import demo
from backhaul.errors import ConfigError

pytestmark = pytest.mark.codec_independent


def test_backhaul_is_named_by_an_absolute_path():
    command = shlex.split(demo._backhaul_command())
    assert Path(command[0]).is_absolute()
    assert os.access(command[0], os.X_OK)
    assert command[1:] in ([], ["-m", "backhaul"])
    assert Path(command[0]).parent == Path(sys.executable).parent or command[0] == sys.executable


def test_admin_lines_name_the_relay_until_the_data_dir_records_it(tmp_path):
    d = demo.Demo(tmp_path)
    line = shlex.split(d.admin_line("connector", "list"))
    assert line[line.index("--service") + 1] == d.url
    assert line[line.index("--data-dir") + 1] == str(tmp_path / "service")
    assert line[-2:] == ["connector", "list"]
    d.data_dir.mkdir()
    (d.data_dir / "relay.json").write_text("{}")
    assert "--service" not in shlex.split(d.admin_line("connector", "list"))


def test_the_ports_are_all_different(tmp_path):
    d = demo.Demo(tmp_path)
    tcp = [d.listen, d.http, d.tcp_app, d.app_http]
    assert len(set(tcp)) == len(tcp)
    assert d.udp_app != d.app_udp


def test_a_work_dir_must_be_new_or_empty(tmp_path):
    assert demo._workdir(str(tmp_path / "new")) == tmp_path / "new"
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    (tmp_path / "new" / "x").write_text("kept")
    with pytest.raises(ConfigError, match="not empty"):
        demo._workdir(str(tmp_path / "new"))
    assert (tmp_path / "new" / "x").read_text() == "kept"
