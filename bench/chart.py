"""The PNG chart of bench/compare.py's table (``--plot FILE``), drawn with matplotlib.

matplotlib is an optional bench dependency (pyproject.toml's ``bench`` extra, installed by
tools/bench-deps.sh); ``require`` says so before any measurement when it is missing.
"""

from __future__ import annotations

from pathlib import Path

#: (summary field, panel title, unit) of each panel, in reading order: throughput first,
#: then latency, then the CPU each path costs.
PANELS = (
    ("rps", "small requests", "req/s"),
    ("p99_ms", "p99 latency (lower is better)", "ms"),
    ("bulk1", "bulk, 1 stream", "Gbit/s"),
    ("bulk8", "bulk, 8 streams", "Gbit/s"),
    ("cpu_ms_per_1k_req", "CPU per 1,000 requests (lower is better)", "CPU-ms"),
    ("cpu_s_per_gb_bulk1", "CPU per GB, 1 stream (lower is better)", "CPU-s"),
    ("cpu_s_per_gb_bulk8", "CPU per GB, 8 streams (lower is better)", "CPU-s"),
)


class ChartError(Exception):
    """The chart cannot be drawn; the message says what to install or fix."""


def require() -> None:
    """Raise ChartError unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ChartError(
            "--plot needs matplotlib, which is not installed for this Python: run tools/bench-deps.sh "
            "or pip install 'backhaul[bench]' (or matplotlib) into it"
        ) from exc


def panel_value(row: dict, field: str) -> float | None:
    """A row's figure for one panel: the path's total where the summary has a per-process dict."""
    value = row.get(field)
    if isinstance(value, dict):
        value = value.get("total")
    return value


def draw(rows: list[tuple[str, str, dict]], out: str | Path, title: str) -> None:
    """One bar chart per panel, a bar per path (one colour per path across panels).

    ``rows``: (key, label, summary row) per path, in table order; a missing figure (None)
    leaves its bar out. Writes a PNG to ``out``."""
    require()
    import matplotlib

    # No display: render straight to a file (before pyplot is imported).
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10").colors
    columns = 4
    panel_rows = -(-len(PANELS) // columns)
    fig, axes = plt.subplots(panel_rows, columns, figsize=(4.2 * columns, 3.6 * panel_rows + 1.2), squeeze=False)
    flat = [ax for line in axes for ax in line]
    keys = [key for key, _, _ in rows]
    for ax, (field, panel_title, unit) in zip(flat, PANELS):
        for i, (key, _, row) in enumerate(rows):
            value = panel_value(row, field)
            if value is None:
                continue
            bar = ax.bar(i, value, color=colours[i % len(colours)])
            ax.bar_label(bar, fmt="{:,.0f}" if value >= 100 else "{:.1f}" if value >= 10 else "{:.2f}", fontsize=7)
        ax.set_title(panel_title, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.15)
    # The spare panel holds the legend: the full label of each path's colour.
    for ax in flat[len(PANELS):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i % len(colours)]) for i in range(len(rows))]
    legend_at = flat[len(PANELS)] if len(flat) > len(PANELS) else fig
    legend_at.legend(handles, [f"{key}: {label}" for key, label, _ in rows], loc="center", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(out, format="png", dpi=110)
    finally:
        plt.close(fig)
