"""What the installer hands pip, and what it keeps away from a new venv."""

from __future__ import annotations

import pytest

from backhaul.updater.install import Wheel, clean_env, requirements
from backhaul.updater.layout import UpdateRefused

pytestmark = pytest.mark.codec_independent


def test_every_wheel_is_pinned_with_its_signed_hash():
    text = requirements([
        Wheel("backhaul-1.1-cp311-cp311-linux_x86_64.whl", "a" * 64),
        Wheel("orjson-3.10.0-cp311-cp311-manylinux_2_17_x86_64.whl", "b" * 64),
        Wheel("orjson-3.10.0-cp311-cp311-musllinux_1_2_x86_64.whl", "c" * 64),
        Wheel("Prometheus_Client-0.20.0-py3-none-any.whl", "d" * 64),
    ])
    assert text.splitlines() == [
        f"backhaul==1.1 --hash=sha256:{'a' * 64}",
        f"orjson==3.10.0 --hash=sha256:{'b' * 64} --hash=sha256:{'c' * 64}",
        f"prometheus-client==0.20.0 --hash=sha256:{'d' * 64}",
    ]


def test_a_file_that_is_not_a_wheel_is_refused():
    with pytest.raises(UpdateRefused, match="not a wheel"):
        requirements([Wheel("backhaul.whl", "a" * 64)])


def test_a_new_venv_never_sees_the_callers_python_path():
    env = clean_env({"PYTHONPATH": "/src", "PYTHONHOME": "/x", "VIRTUAL_ENV": "/v", "PATH": "/bin", "BACKHAUL_PURE": "1"})
    assert env == {"PATH": "/bin", "BACKHAUL_PURE": "1"}


def test_the_units_written_by_updater_install_run_from_current(tmp_path):
    import shlex

    from backhaul.cli import build_parser
    from backhaul.updater.bootstrap import unit_text

    root, state = tmp_path / "root", tmp_path / "state"
    connector = unit_text("backhaul-connector.service", root, state)
    updater = unit_text("backhaul-updater.service", root, state)
    for text, command in ((connector, ("connector", "run")), (updater, ("updater", "run"))):
        (exec_start,) = [line.partition("=")[2] for line in text.splitlines() if line.startswith("ExecStart=")]
        argv = shlex.split(exec_start)
        assert argv[0] == f"{root}/current/venv/bin/backhaul"
        args = build_parser().parse_args(argv[1:])
        assert (args.command, args.action) == command and args.state_dir == str(state)
    assert build_parser().parse_args(shlex.split(updater.split("ExecStart=")[1].splitlines()[0])[1:]).install_root == str(root)
    assert f"ReadWritePaths={root} " in updater and f"ReadOnlyPaths={state}" in updater


def test_the_pip_of_a_venv_without_pip_is_the_bundled_wheel(tmp_path):
    import subprocess
    import sys

    from backhaul.updater.install import pip_command

    assert pip_command() == [sys.executable, "-m", "pip"]  # this interpreter has pip
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "v")], check=True)
    python = str(tmp_path / "v" / "bin" / "python")
    argv = pip_command(python)
    assert argv[1].endswith(".whl/pip")
    out = subprocess.run([*argv, "--version"], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    major, minor = (int(x) for x in out.split()[1].split(".")[:2])
    assert (major, minor) >= (22, 3)  # --python exists from 22.3 on
