"""Report, stage 3: the report's numbers -> static SVG charts (matplotlib: the ``report`` extra).

Charts are drawn from the aggregates of report_data only (a few hundred
points per series), never from attempts, so a million attempts draw as fast
as a hundred. Figures are built with ``matplotlib.figure.Figure`` directly,
not pyplot: no global state, no GUI backend. Text stays text in the SVG
(``svg.fonttype: none``), so a chart weighs tens of kilobytes and the page
uses the browser's own sans-serif font, never a downloaded one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import matplotlib
import matplotlib.dates
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

STYLE: dict[Any, Any] = {"svg.fonttype": "none", "font.size": 9, "font.family": "sans-serif", "axes.spines.top": False,
         "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8,
         "legend.frameon": False, "axes.titlesize": 9, "axes.titleweight": "bold"}
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
MAX_TYPES_DRAWN = 7  # error types drawn as their own line; the rest add up to "other"
WIDTH_IN = 11.0
_PREAMBLE = re.compile(r"<\?xml.*?\?>|<!DOCTYPE.*?>|<metadata>.*?</metadata>|\s+xmlns(:xlink)?=\"[^\"]*\"", re.S)

Colors = dict[str, str]


def model_colors(keys: Sequence[str]) -> Colors:
    """One colour per model, the same in every chart."""
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(sorted(keys))}


def to_svg(fig: Figure, name: str) -> str:
    """The figure as an ``<svg>`` element to inline in HTML: no XML preamble, no namespace URLs."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name}):  # ids unique per chart: several SVGs share one page
        fig.savefig(buf, format="svg", bbox_inches="tight")
    svg = _PREAMBLE.sub("", buf.getvalue()).strip()
    return svg.replace("<svg ", f'<svg class="chart" id="chart-{name}" role="img" ', 1)


def _grid(runs: list[dict[str, Any]], rows: int, height: float) -> tuple[Figure, np.ndarray]:
    """One column per run, widths by duration (a short run stays readable); rows share the y axis."""
    total = sum(r["buckets"] for r in runs)
    ratios = [max(r["buckets"], 0.2 * total) for r in runs]
    fig = Figure(figsize=(WIDTH_IN, height * rows), layout="constrained")
    axes = fig.subplots(rows, len(runs), sharey="row", squeeze=False, gridspec_kw={"width_ratios": ratios})
    return fig, axes


def _times(run: dict[str, Any], width: int) -> np.ndarray:
    start = np.datetime64(run["start"].replace("+00:00", ""), "s")
    return start + np.arange(run["buckets"] + 1) * np.timedelta64(width, "s")


def _step(ax: Axes, x: np.ndarray, counts: Sequence[float], scale: float, **kw: Any) -> None:
    y = np.asarray(counts, dtype=float) * scale
    ax.step(x, np.append(y, y[-1] if len(y) else 0.0), where="post", linewidth=1.1, **kw)


def _frame(axes: np.ndarray, runs: list[dict[str, Any]], width: int, labels: Sequence[str]) -> None:
    """Row labels on the left, the run over each column, each column's x axis exactly its run."""
    for row, label in enumerate(labels):
        axes[row, 0].set_ylabel(label)
    for col, run in enumerate(runs):
        x = _times(run, width)
        axes[0, col].set_title(f"run {run['run_id']} ({run.get('outcome') or 'unknown'})", loc="left")
        for row in range(len(labels)):
            ax = axes[row, col]
            ax.set_xlim(x[0], max(x[-1], x[0] + np.timedelta64(10, "s")))  # date ticks need a few seconds
            ax.set_ylim(bottom=0)
            _time_axis(ax)


def _legend(row: Sequence[Axes]) -> None:
    """One legend per row of panels, right of the last one, so it never hides a line."""
    seen: dict[str, Any] = {}
    for ax in row:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:  # an empty legend box is noise (and a warning)
        row[-1].legend(list(seen.values()), list(seen), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)


def _time_axis(ax: Axes) -> None:
    locator = matplotlib.dates.AutoDateLocator(minticks=3, maxticks=8)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(matplotlib.dates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]


def throughput_chart(timeline: dict[str, Any], colors: Colors) -> str:
    """Rows/s over time; requests/s per model with each model's limit (rpm/60) dashed."""
    width, runs = timeline["bucket_seconds"], timeline["runs"]
    with matplotlib.rc_context(STYLE):
        fig, axes = _grid(runs, 2, 2.2)
        for col, run in enumerate(runs):
            x, top, bottom = _times(run, width), axes[0, col], axes[1, col]
            _step(top, x, run["rows"], 1 / width, color="black", label="rows finished")
            for key, counts in sorted(run["requests"].items()):
                _step(bottom, x, counts, 1 / width, color=colors.get(key, "grey"), label=key)
            for key, rps in sorted(run["limits_rps"].items()):
                bottom.axhline(rps, color=colors.get(key, "grey"), linestyle="--", linewidth=1,
                               label=f"limit {key} ({rps * 60:g}/min)")
        _frame(axes, runs, width, ("rows/s", "requests/s"))
        _legend(axes[1])
        return to_svg(fig, "throughput")


def failures_chart(timeline: dict[str, Any], colors: Colors) -> str:
    """429s per model, errors per model, errors by type and fallbacks: counts per bucket."""
    width, runs = timeline["bucket_seconds"], timeline["runs"]
    types = _top_types(runs)
    with matplotlib.rc_context(STYLE):
        fig, axes = _grid(runs, 3, 1.9)
        for col, run in enumerate(runs):
            x = _times(run, width)
            for key, counts in sorted(run["rate_limited"].items()):
                _step(axes[0, col], x, counts, 1, color=colors.get(key, "grey"), label=key)
            for key, counts in sorted(run["errors"].items()):
                _step(axes[1, col], x, counts, 1, color=colors.get(key, "grey"), label=key)
            for i, (kind, counts) in enumerate(_by_type(run, types)):
                _step(axes[2, col], x, counts, 1, color=PALETTE[(i + 3) % len(PALETTE)], label=kind)
            _step(axes[2, col], x, run["fallbacks"], 1, color="black", linestyle="--", label="fallbacks")
        _frame(axes, runs, width, (f"429s per {width} s", f"errors per {width} s", f"by type per {width} s"))
        for row in axes:
            _legend(row)
        return to_svg(fig, "failures")


def _top_types(runs: list[dict[str, Any]]) -> list[str]:
    totals: dict[str, int] = {}
    for run in runs:
        for kind, counts in run["errors_by_type"].items():
            totals[kind] = totals.get(kind, 0) + sum(counts)
    return sorted(totals, key=lambda k: -totals[k])[:MAX_TYPES_DRAWN]


def _by_type(run: dict[str, Any], types: list[str]) -> list[tuple[str, list[int]]]:
    drawn = [(k, run["errors_by_type"].get(k, [0] * run["buckets"])) for k in types]
    rest = [c for k, c in run["errors_by_type"].items() if k not in types]
    if rest:
        drawn.append(("other", np.sum(rest, axis=0).tolist()))
    return drawn


def cost_chart(timeline: dict[str, Any]) -> str:
    """Cumulative cost of the output (earlier runs included) against each run's max_cost_usd."""
    width, runs = timeline["bucket_seconds"], timeline["runs"]
    with matplotlib.rc_context(STYLE):
        fig, axes = _grid(runs, 1, 2.4)
        for col, run in enumerate(runs):
            ax, x = axes[0, col], _times(run, width)
            spent = run["cost_before_usd"] + np.cumsum(np.asarray(run["cost_usd"], dtype=float))
            ax.step(x, np.append(spent, spent[-1]), where="post", color="#2ca02c", label="spent (cumulative)")
            if run["max_cost_usd"] is not None:
                ax.axhline(run["max_cost_usd"], color="#d62728", linestyle="--",
                           label="max_cost_usd of the run")
        _legend(axes[0])
        _frame(axes, runs, width, ("USD spent",))
        return to_svg(fig, "cost")


def latency_chart(latency: dict[str, Any], colors: Colors) -> str:
    """One histogram per model (log-spaced bins), with p50/p95/p99 marked."""
    models = sorted(latency["models"].items())
    edges = np.asarray(latency["edges_ms"], dtype=float)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(WIDTH_IN, 1.8 * max(1, len(models))), layout="constrained")
        axes = fig.subplots(max(1, len(models)), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (key, m) in zip(axes, models):
            ax.stairs(m["counts"], edges, fill=True, color=colors.get(key, "grey"), alpha=0.7)
            for p, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
                ax.axvline(m[f"{p}_ms"], color="black", linestyle=style, linewidth=1,
                           label=f"{p} {m[f'{p}_ms']:,.0f} ms")
            ax.set_xscale("log")
            ax.set_title(f"{key}: {m['count']:,} answers", loc="left")
            _legend([ax])
        axes[-1].set_xlabel(f"latency, ms (accepted answers, from the {latency['source']})")
        return to_svg(fig, "latency")
