"""The figures of a process family (a supervisor's workers), shared through one directory.

Each worker keeps plain numbers on its hot path and, once a tick, writes them as one
snapshot file, ``<pid>.json``, in the family's stats dir (written aside and renamed, so
a reader never sees half a file). Whoever answers a scrape or ``status`` reads every
snapshot and adds them up (``StatsDir.collect``): counters and histograms over every
process, gauges over the live ones only.

A worker that exits leaves its last snapshot behind. The next reader folds its counters
and histograms into ``retired.json`` and deletes its file, so totals never go back when
a worker is restarted, and the directory holds one file per live worker plus one.
Label values (apps, connectors) that no live worker knows any more are dropped from
``retired.json`` at that point, so deleted apps do not pile up.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fcntl
import os
import resource
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import orjson

RETIRED = "retired.json"
_LOCK = ".lock"

#: How a gauge is combined over live processes.
GAUGE_AGGREGATES = ("sum", "max", "min")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric: its name, kind, meaning and labels (see docs/metrics.md)."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    #: gauges only: how the live processes' values combine
    aggregate: str = "sum"
    #: histograms only: upper bounds of the buckets, without +Inf
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"unknown metric kind {self.kind!r}")
        if self.aggregate not in GAUGE_AGGREGATES:
            raise ValueError(f"unknown gauge aggregate {self.aggregate!r}")


class Histogram:
    """Bucket counts in plain ints: ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def value(self) -> dict:
        return {"b": list(self.counts), "s": self.total}


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone.

    A pid and its start time name one process for good, even after the pid is reused.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[19])


def cpu_seconds() -> float:
    """User plus system CPU time of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_bytes() -> int:
    """Resident memory of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def identity() -> dict:
    """The ``pid`` and ``start`` every snapshot carries."""
    pid = os.getpid()
    return {"pid": pid, "start": process_start(pid)}


def _key(labels: Iterable) -> tuple:
    return tuple("" if v is None else str(v) for v in labels)


def _add(into: dict, key: tuple, value) -> None:
    old = into.get(key)
    if old is None:
        into[key] = {"b": list(value["b"]), "s": value["s"]} if isinstance(value, dict) else value
    elif isinstance(value, dict):
        if len(old["b"]) != len(value["b"]):
            raise ValueError("histogram snapshots with different buckets cannot be added")
        old["b"] = [a + b for a, b in zip(old["b"], value["b"], strict=True)]
        old["s"] += value["s"]
    else:
        into[key] = old + value


def merge(live: Sequence[dict], retired: dict | None, specs: Mapping[str, MetricSpec]) -> dict[str, dict[tuple, object]]:
    """Add snapshots up: {metric name: {label values: value}} for every metric in ``specs``."""
    merged: dict[str, dict[tuple, object]] = {name: {} for name in specs}
    for snapshot in list(live) + ([retired] if retired else []):
        is_live = snapshot is not retired
        for name, series in snapshot.get("series", {}).items():
            spec = specs.get(name)
            if spec is None or (spec.kind == "gauge" and not is_live):
                continue
            into = merged[name]
            for labels, value in series:
                key = _key(labels)
                if spec.kind != "gauge" or key not in into or spec.aggregate == "sum":
                    _add(into, key, value)
                elif spec.aggregate == "max":
                    into[key] = max(into[key], value)
                else:
                    into[key] = min(into[key], value)
    return merged


def _series(merged: Mapping[str, Mapping[tuple, object]]) -> dict:
    return {name: [[list(k), v] for k, v in values.items()] for name, values in merged.items() if values}


class StatsDir:
    """The stats dir of one running family (see the module docstring)."""

    def __init__(self, path: Path, specs: Mapping[str, MetricSpec]) -> None:
        self.path = Path(path)
        self.specs = dict(specs)

    def reset(self) -> None:
        """Start a run: an empty dir only its owner can read."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        for entry in self.path.iterdir():
            if entry.name != _LOCK:
                entry.unlink()

    def write(self, snapshot: dict) -> None:
        """Publish this process's snapshot (it must carry ``pid`` and ``start``)."""
        pid = snapshot["pid"]
        tmp = self.path / f".{pid}.tmp"
        tmp.write_bytes(orjson.dumps(snapshot))
        os.replace(tmp, self.path / f"{pid}.json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path / _LOCK, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def collect(self) -> tuple[dict[str, dict[tuple, object]], list[dict]]:
        """(merged figures, live snapshots); folds exited processes' files into retired.json first."""
        with self._locked():
            live, dead = [], []
            for entry in sorted(self.path.glob("*.json")):
                if entry.name == RETIRED:
                    continue
                try:
                    snapshot = orjson.loads(entry.read_bytes())
                except (FileNotFoundError, orjson.JSONDecodeError):
                    # A snapshot file is only ever renamed into place whole; a broken one was
                    # not written by us, and keeping it would hide every later figure.
                    entry.unlink(missing_ok=True)
                    continue
                if process_start(snapshot.get("pid", -1)) == snapshot.get("start"):
                    live.append(snapshot)
                else:
                    dead.append((entry, snapshot))
            retired = self._read_retired()
            if dead:
                retired = self._retire(retired, [s for _, s in dead], live)
                for entry, _ in dead:
                    entry.unlink(missing_ok=True)
            return merge(live, retired, self.specs), live

    def _read_retired(self) -> dict | None:
        try:
            return orjson.loads((self.path / RETIRED).read_bytes())
        except FileNotFoundError:
            return None

    def _retire(self, retired: dict | None, dead: list[dict], live: list[dict]) -> dict:
        kept = {name: spec for name, spec in self.specs.items() if spec.kind != "gauge"}
        merged = merge(dead, None, kept)
        if retired:
            for name, values in merge([retired], None, kept).items():
                for key, value in values.items():
                    _add(merged[name], key, value)
        if live:
            merged = self._prune(merged, live)
        folded = {"series": _series(merged)}
        tmp = self.path / f".{RETIRED}.tmp"
        tmp.write_bytes(orjson.dumps(folded))
        os.replace(tmp, self.path / RETIRED)
        return folded

    def _prune(self, merged: dict[str, dict[tuple, object]], live: list[dict]) -> dict[str, dict[tuple, object]]:
        """Drop series whose app or connector no live process knows (deleted since)."""
        known: dict[str, set[str]] = {}
        for snapshot in live:
            for label, values in snapshot.get("known", {}).items():
                known.setdefault(label, set()).update(values)
        for name, values in merged.items():
            labels = self.specs[name].labels
            checked = [(i, known[label]) for i, label in enumerate(labels) if label in known]
            if checked:
                merged[name] = {k: v for k, v in values.items() if all(k[i] in allowed for i, allowed in checked)}
        return merged
