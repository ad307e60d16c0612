"""The install root: atomic switch, reconcile after a crash, the lock, pruning, the disk check."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from backhaul.errors import ConfigError
from backhaul.updater.layout import Layout, RootLock, UpdateRefused, check_file_name, check_version

pytestmark = pytest.mark.codec_independent


def _fake_install(layout: Layout, version: str) -> None:
    """A version dir with the one file switch() checks for (a real venv is the e2e tests' job)."""
    python = layout.venv(version) / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")


def test_switch_replaces_the_link_in_one_rename_and_readers_never_miss_it(tmp_path):
    layout = Layout(tmp_path)
    layout.prepare()
    for v in ("1.0", "1.1"):
        _fake_install(layout, v)
    layout.switch("1.0")
    assert os.readlink(layout.current) == "versions/1.0" and layout.current_version() == "1.0"
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(os.readlink(layout.current))
            except FileNotFoundError:
                seen.add(None)  # ln -sfn would show this: a moment with no link

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            layout.switch("1.1" if i % 2 == 0 else "1.0")
    finally:
        stop.set()
        thread.join()
    assert None not in seen and seen <= {"versions/1.0", "versions/1.1"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".current")]  # no temporary link left


def test_switch_refuses_a_version_that_is_not_installed(tmp_path):
    layout = Layout(tmp_path)
    layout.prepare()
    with pytest.raises(ConfigError, match="not installed"):
        layout.switch("9.9")
    assert layout.current_version() is None


def test_reconcile_after_a_crash_between_switch_and_state_write(tmp_path):
    layout = Layout(tmp_path)
    layout.prepare()
    for v in ("1.0", "1.1"):
        _fake_install(layout, v)
    layout.switch("1.0")
    state = layout.reconcile()
    assert (state.active, state.previous) == ("1.0", None)
    layout.switch("1.1")  # ... and the process dies before save_state
    again = Layout(tmp_path).reconcile()
    assert (again.active, again.previous) == ("1.1", "1.0")
    assert again.history[-1]["step"] == "reconciled"
    assert Layout(tmp_path).load_state().active == "1.1"  # written back


def test_reconcile_after_a_crash_during_a_rollback(tmp_path):
    layout = Layout(tmp_path)
    layout.prepare()
    for v in ("1.0", "1.1"):
        _fake_install(layout, v)
    layout.switch("1.0")
    state = layout.reconcile()
    layout.switch("1.1")
    layout.set_active(state, "1.1")
    layout.save_state(state)
    layout.switch("1.0")  # the rollback's switch; the state write never happens
    again = Layout(tmp_path).reconcile()
    assert again.active == "1.0" and again.previous == "1.1"


def test_state_history_is_bounded(tmp_path):
    layout = Layout(tmp_path, max_history=5)
    layout.prepare()
    state = layout.reconcile()
    for i in range(20):
        layout.record(state, "1.0", f"step{i}")
    assert [h["step"] for h in layout.load_state().history] == [f"step{i}" for i in range(15, 20)]


def test_a_damaged_state_file_is_refused_in_words(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable.*move it away"):
        Layout(tmp_path).load_state()


def test_a_link_pointing_elsewhere_is_refused(tmp_path):
    os.symlink("/etc", tmp_path / "current")
    with pytest.raises(ConfigError, match="not at versions"):
        Layout(tmp_path).current_version()


def test_a_second_updater_on_one_root_is_refused_naming_the_first_pid(tmp_path):
    # The holder is another process, as in real life (flock is per open file, per process here too).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from backhaul.updater.layout import RootLock;"
         "l = RootLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            RootLock(tmp_path).acquire()
        other = tmp_path / "other-root"
        RootLock(other).acquire().release()  # another root on the same host: independent
    finally:
        holder.kill()
        holder.wait(5)
    RootLock(tmp_path).acquire().release()  # the kernel dropped the dead holder's lock


def test_prune_keeps_current_and_previous_only(tmp_path):
    layout = Layout(tmp_path)
    layout.prepare()
    for v in ("1.0", "1.1", "1.2", "1.10"):
        _fake_install(layout, v)
    layout.downloads("1.2").mkdir(parents=True)
    layout.switch("1.2")
    state = layout.reconcile()
    state.previous = "1.1"
    removed = layout.prune(state, keep=2)
    assert sorted(removed) == ["1.0", "1.10"]
    assert layout.installed_versions() == ["1.1", "1.2"]
    assert not layout.downloads("1.2").exists()


def test_the_current_version_is_never_removed(tmp_path):
    layout = Layout(tmp_path)
    layout.prepare()
    _fake_install(layout, "1.0")
    layout.switch("1.0")
    with pytest.raises(ConfigError, match="is current"):
        layout.remove_version("1.0")
    assert layout.venv("1.0").exists()


def test_too_little_free_space_is_refused_before_anything_changes(tmp_path):
    layout = Layout(tmp_path)
    layout.prepare()
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    layout.check_space(1024, 4.0)  # a small release fits
    with pytest.raises(UpdateRefused, match="MiB free") as info:
        layout.check_space(free, 4.0)
    assert info.value.reason == "disk_full"
    assert list((tmp_path / "versions").iterdir()) == []


@pytest.mark.parametrize("bad", ["../1.0", "1.0/../x", "", "a" * 80, "/abs", ".hidden", "1..0"])
def test_versions_that_could_name_another_path_are_refused(bad):
    with pytest.raises(UpdateRefused):
        check_version(bad)


@pytest.mark.parametrize("bad", ["../x.whl", "a/b.whl", "x.tar.gz", ".x.whl", "a..b.whl"])
def test_file_names_that_are_not_plain_wheels_are_refused(bad):
    with pytest.raises(UpdateRefused):
        check_file_name(bad)
