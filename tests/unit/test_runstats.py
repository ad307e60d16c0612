"""Figures shared through a stats dir: adding up, folding exited processes, bounded files, exposition."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backhaul import metrics
from backhaul.runstats import Histogram, MetricSpec, StatsDir, identity, process_start

pytestmark = pytest.mark.codec_independent

SPECS = {
    s.name: s
    for s in (
        MetricSpec("t_opened_total", "counter", "opened", ("app",)),
        MetricSpec("t_active", "gauge", "active", ("app",)),
        MetricSpec("t_version", "gauge", "version", (), aggregate="min"),
        MetricSpec("t_open_seconds", "histogram", "latency", ("app",), buckets=(0.1, 1.0)),
    )
}


def _snapshot(pid_start: dict, apps: dict[str, int], active: int, version: int, latencies=()) -> dict:
    hist = Histogram((0.1, 1.0))
    for value in latencies:
        hist.observe(value)
    return {
        **pid_start,
        "known": {"app": sorted(apps)},
        "series": {
            "t_opened_total": [[[a], n] for a, n in apps.items()],
            "t_active": [[[a], active] for a in apps],
            "t_version": [[[], version]],
            "t_open_seconds": [[[a], hist.value()] for a in apps],
        },
    }


def _write_from_child(path: str, apps: dict[str, int]) -> None:
    StatsDir(path, SPECS).write(_snapshot(identity(), apps, active=7, version=1, latencies=[0.05]))


def _dead_worker(stats: StatsDir, apps: dict[str, int]) -> None:
    """A real process writes its snapshot and exits, as a crashed worker would."""
    child = multiprocessing.get_context("fork").Process(target=_write_from_child, args=(str(stats.path), apps))
    child.start()
    child.join(10)
    assert child.exitcode == 0


@pytest.fixture
def stats(tmp_path):
    directory = StatsDir(tmp_path / "stats", SPECS)
    directory.reset()
    return directory


def test_process_identity_survives_pid_reuse():
    me = identity()
    assert me["pid"] == os.getpid() and me["start"] == process_start(os.getpid())
    assert process_start(2**22 + 12345) is None


def test_live_snapshots_add_up_and_gauges_follow_their_aggregate(stats):
    stats.write(_snapshot(identity(), {"a": 3, "b": 1}, active=2, version=5, latencies=[0.05, 0.5]))
    merged, live = stats.collect()
    assert len(live) == 1
    assert merged["t_opened_total"] == {("a",): 3, ("b",): 1}
    assert merged["t_active"] == {("a",): 2, ("b",): 2}
    assert merged["t_open_seconds"][("a",)] == {"b": [1, 1, 0], "s": 0.55}


def test_an_exited_worker_is_folded_so_totals_never_go_back(stats):
    stats.write(_snapshot(identity(), {"a": 3}, active=2, version=5))
    _dead_worker(stats, {"a": 10})
    assert len(list(stats.path.glob("*.json"))) == 2
    merged, live = stats.collect()
    assert len(live) == 1
    assert merged["t_opened_total"] == {("a",): 13}, "the dead worker's counter still counts"
    assert merged["t_active"] == {("a",): 2}, "a dead worker's gauges do not"
    assert merged["t_version"] == {(): 5}
    assert merged["t_open_seconds"][("a",)]["b"] == [1, 0, 0]
    names = sorted(p.name for p in stats.path.glob("*.json"))
    assert names == sorted([f"{os.getpid()}.json", "retired.json"])
    # a second restart folds into the same file: one file per live worker plus one, whatever happens
    _dead_worker(stats, {"a": 5})
    merged, _ = stats.collect()
    assert merged["t_opened_total"] == {("a",): 18}
    assert len(list(stats.path.glob("*.json"))) == 2


def test_retired_figures_of_a_deleted_app_are_dropped(stats):
    _dead_worker(stats, {"gone": 4, "kept": 2})
    stats.write(_snapshot(identity(), {"kept": 1}, active=0, version=1))
    merged, _ = stats.collect()
    assert merged["t_opened_total"] == {("kept",): 3}
    assert ("gone",) not in merged["t_open_seconds"]


def test_a_broken_snapshot_is_discarded_not_fatal(stats):
    (stats.path / "999999.json").write_bytes(b"{not json")
    stats.write(_snapshot(identity(), {"a": 1}, active=0, version=1))
    merged, _ = stats.collect()
    assert merged["t_opened_total"] == {("a",): 1}
    assert not (stats.path / "999999.json").exists()


def test_reset_empties_the_dir_and_makes_it_private(stats):
    stats.write(_snapshot(identity(), {"a": 1}, active=0, version=1))
    stats.reset()
    assert list(stats.path.glob("*.json")) == []
    assert stats.path.stat().st_mode & 0o777 == 0o700


def test_exposition_parses_back_with_cumulative_buckets(stats):
    stats.write(_snapshot(identity(), {"a": 2}, active=1, version=3, latencies=[0.05, 0.5, 5.0]))
    merged, _ = stats.collect()
    text = metrics.render(SPECS, merged).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("t_opened_total", (("app", "a"),))] == 2
    assert samples[("t_active", (("app", "a"),))] == 1
    assert samples[("t_version", ())] == 3
    assert samples[("t_open_seconds_bucket", (("app", "a"), ("le", "0.1")))] == 1
    assert samples[("t_open_seconds_bucket", (("app", "a"), ("le", "1.0")))] == 2
    assert samples[("t_open_seconds_bucket", (("app", "a"), ("le", "+Inf")))] == 3
    assert samples[("t_open_seconds_count", (("app", "a"),))] == 3
    assert samples[("t_open_seconds_sum", (("app", "a"),))] == pytest.approx(5.55)
