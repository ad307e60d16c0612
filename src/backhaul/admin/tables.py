"""Plain-text tables for people (scripts use --json)."""

from __future__ import annotations

import datetime
from typing import Any, Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, with a header row."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)


def when(ts: float | None) -> str:
    """A UTC timestamp, to the second."""
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


# -- rollout


def yes_no(value: Any) -> str:
    return "yes" if value else "no"


def counts(per_value: dict[str, int]) -> str:
    """'1.0: 2, 1.1: 1': how many of each, in the order given."""
    return ", ".join(f"{value}: {n}" for value, n in per_value.items())


def rollout_state(group: dict[str, Any]) -> str:
    """A group's rollout in a word or two: halted, paused, updating, running."""
    words = [w for w, on in (("paused", group.get("paused")), ("halted", group.get("halted") is not None)) if on]
    if not words:
        words = ["updating" if group.get("lease") else "running"]
    return ", ".join(words)
