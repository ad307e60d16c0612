"""The supervised connector: restarted when it exits, ever more slowly when it keeps exiting."""

from __future__ import annotations

import sys
import time

import pytest

from backhaul.updater import service
from backhaul.updater.service import SupervisedConnector

pytestmark = pytest.mark.codec_independent


def test_a_connector_that_keeps_exiting_is_restarted_with_a_growing_delay(tmp_path):
    script = tmp_path / "backhaul"
    script.write_text(f"#!{sys.executable}\nimport sys; sys.exit(3)\n")
    script.chmod(0o755)
    connector = SupervisedConnector(script, tmp_path, config=None, stop_timeout=5, restart_delay=0.05)
    delays = []
    try:
        connector.start()
        for _ in range(4):
            connector.proc.wait(5)
            connector.watch()  # notices the exit, plans the restart
            delays.append(connector._delay)
            deadline = time.monotonic() + 10
            pid = connector.proc.pid
            while connector.proc.pid == pid and time.monotonic() < deadline:
                connector.watch()
                time.sleep(0.01)
            assert connector.proc.pid != pid  # restarted
    finally:
        connector.stop()
    assert delays == [0.1, 0.2, 0.4, 0.8]


def test_the_restart_delay_stops_growing_at_its_cap(tmp_path):
    script = tmp_path / "backhaul"
    script.write_text(f"#!{sys.executable}\nimport sys; sys.exit(3)\n")
    script.chmod(0o755)
    connector = SupervisedConnector(script, tmp_path, config=None, stop_timeout=5, restart_delay=20.0)
    connector.start()
    pid = connector.proc.pid
    connector.proc.wait(5)
    connector.watch()
    assert connector._delay == service.MAX_DELAY and connector.proc.pid == pid  # not restarted yet: 30 s to go
    connector.stop()


def test_a_deleted_connector_is_not_restarted(tmp_path):
    script = tmp_path / "backhaul"
    script.write_text(f"#!{sys.executable}\nimport sys; sys.exit({service.EXIT_NO_RESTART})\n")
    script.chmod(0o755)
    connector = SupervisedConnector(script, tmp_path, config=None, stop_timeout=5, restart_delay=0.0)
    connector.start()
    pid = connector.proc.pid
    connector.proc.wait(5)
    connector.watch()
    connector.watch()
    assert connector.gave_up and connector.proc.pid == pid
    connector.stop()
