"""The supervisor's two stop rules: a worker exiting with EXIT_NO_RESTART ends the service
with that status (never a restart), and one instance per lock file."""

from __future__ import annotations

import logging
import os
import time

import pytest

from backhaul.errors import ConfigError
from backhaul.supervisor import EXIT_NO_RESTART, instance_lock, supervise

pytestmark = pytest.mark.codec_independent


def _worker(index: int) -> None:
    if index == 1:
        time.sleep(0.2)
        raise SystemExit(EXIT_NO_RESTART)
    time.sleep(30)  # stopped by the supervisor's SIGTERM


def test_a_worker_exiting_with_no_restart_stops_the_service_with_that_status(caplog):
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="backhaul.supervisor"):
        status = supervise(_worker, 2, "test", grace=5, no_restart_reason="gone for good: re-register")
    assert status == EXIT_NO_RESTART
    assert time.monotonic() - started < 10  # worker 0 was stopped, not waited for
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["gone for good: re-register"]
    assert not [r for r in caplog.records if r.getMessage() == "worker restarted"]


def test_one_worker_in_process_returns_the_status_too(caplog):
    def deleted(index: int) -> None:
        raise SystemExit(EXIT_NO_RESTART)

    with caplog.at_level(logging.ERROR, logger="backhaul.supervisor"):
        assert supervise(deleted, 1, "test", no_restart_reason="gone") == EXIT_NO_RESTART
    assert [r.getMessage() for r in caplog.records] == ["gone"]

    def failed(index: int) -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        supervise(failed, 1, "test")


def test_instance_lock_names_the_holder_and_frees_on_exit(tmp_path):
    path = tmp_path / "x.lock"
    with instance_lock(path, "a thing on X"):
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError, match=rf"a thing on X is already running \(PID {os.getpid()},"):
            with instance_lock(path, "a thing on X"):
                pass
    with instance_lock(path, "a thing on X"):  # released: free again
        pass
