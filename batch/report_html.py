"""Report, stage 4: the numbers and charts -> one self-contained HTML page; ``batch report``.

    write_report(Path("out/demo"), Path("out/demo/report.html"))
    watch(Path("out/demo"), Path("out/demo/report.html"), every=10)   # --live

The page needs nothing but itself: styles inline, charts inline SVG, no
script but the data block (``<script type="application/json"
id="report-data">``, the numbers behind every chart and table). Every write
is atomic (temporary file, then rename), so a browser refreshing during
``--live`` never sees half a page. Importing this module needs the
``report`` extra (matplotlib, numpy); batch.cli checks for it first.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from batch.atomic import write_atomic
from batch.report_charts import cost_chart, failures_chart, latency_chart, model_colors, throughput_chart
from batch.report_data import build_data
from batch.report_read import read_output

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#222;background:#fff}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;margin:0 0 12px}.live{background:#fff4d6;padding:6px 10px;border-radius:4px}
.notes{background:#f4f6fa;border-left:4px solid #8aa4d6;padding:8px 12px 8px 28px;margin:12px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}.card{border:1px solid #ddd;border-radius:6px;
padding:8px 14px;min-width:120px}.card b{display:block;font-size:19px}.card span{color:#666;font-size:12px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{padding:3px 9px;border-bottom:1px solid #eee;
text-align:right;vertical-align:top}th{background:#f7f7f7}td.l,th.l{text-align:left}td.msg{text-align:left;
max-width:480px;overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:12px}
.wide{overflow-x:auto}svg.chart{width:100%;height:auto;display:block;margin:4px 0 8px}.missing{color:#a15c00}
"""
EXAMPLE_IDS_SHOWN = 5


def build_page(out_dir: Path, *, refresh_seconds: float | None = None) -> tuple[str, dict[str, Any]]:
    """Read ``out_dir`` and return (the page, its data)."""
    data = build_data(read_output(out_dir))
    return render(data, draw_charts(data), refresh_seconds=refresh_seconds), data


def write_report(out_dir: Path, dest: Path, *, refresh_seconds: float | None = None) -> dict[str, Any]:
    """Write the report of ``out_dir`` to ``dest`` atomically; returns its data."""
    page, data = build_page(out_dir, refresh_seconds=refresh_seconds)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, page.encode())
    return data


def run_ended(data: dict[str, Any]) -> bool:
    """The manifest's last run is over (any outcome but "running"); False while no run is known."""
    runs = [r for r in data["runs"] if r["started"] is not None]
    return bool(runs) and runs[-1]["outcome"] not in (None, "running")


def watch(out_dir: Path, dest: Path, *, every: float, sleep: Callable[[float], None] = time.sleep,
          on_write: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Rewrite the report every ``every`` seconds until the last run has ended (or Ctrl-C).

    While the run goes on the page asks the browser to reload itself
    (``<meta http-equiv="refresh">``); the last write, made once the
    manifest says the run ended, does not, so the final page stays put.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        data = build_data(read_output(out_dir))
        ended = run_ended(data)
        page = render(data, draw_charts(data), refresh_seconds=None if ended else every)
        write_atomic(dest, page.encode())
        if on_write is not None:
            on_write(data)
        if ended:
            return
        sleep(every)


def draw_charts(data: dict[str, Any]) -> dict[str, str]:
    """The SVG of every chart the data allows (the charts over time need the attempt log)."""
    keys = {m["key"] for m in data["models"]} | set(data["latency"]["models"])
    if "attempts" in data:
        keys |= set(data["attempts"]["requests_by_model"]) | set(data["attempts"]["errors_by_model"])
    colors = model_colors(sorted(keys))
    charts = {}
    timeline = data.get("timeline")
    if timeline and timeline["runs"]:
        charts["throughput"] = throughput_chart(timeline, colors)
        charts["failures"] = failures_chart(timeline, colors)
        charts["cost"] = cost_chart(timeline)
    if data["latency"]["models"]:
        charts["latency"] = latency_chart(data["latency"], colors)
    return charts


def render(data: dict[str, Any], charts: dict[str, str], *, refresh_seconds: float | None = None) -> str:
    head = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>batch report: {_e(Path(data['output']).name)}</title>", f"<style>{CSS}</style>"]
    if refresh_seconds is not None:
        head.append(f'<meta http-equiv="refresh" content="{max(1, round(refresh_seconds))}">')
    body = [*_header(data, refresh_seconds), *_summary(data),
            *(line for name in ("throughput", "failures") for line in _chart_section(name, charts, data)),
            *_latency(data, charts), *_chart_section("cost", charts, data), *_errors(data), *_lanes(data),
            _data_block(data)]
    return "\n".join([*head, "</head><body>", *body, "</body></html>", ""])


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _header(data: dict[str, Any], refresh: float | None) -> list[str]:
    lines = ["<h1>batch run report</h1>",
             f'<p class="meta">{_e(data["output"])} &middot; generated {_e(data["generated"])} UTC</p>']
    if refresh is not None:
        lines.append(f'<p class="live">Live: this page is rewritten every {refresh:g} s while the run goes on.</p>')
    if data["notes"]:
        lines.append('<ul class="notes" id="notes">' + "".join(f"<li>{_e(n)}</li>" for n in data["notes"]) + "</ul>")
    return lines


def _usd(x: float | None) -> str:
    return "" if x is None else f"${x:,.4f}" if abs(x) < 100 else f"${x:,.2f}"


def _n(x: object) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}" if isinstance(x, float) else _e(x)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}h {rest // 60:02d}m" if h else f"{rest // 60}m {rest % 60:02d}s" if rest >= 60 else f"{seconds:.1f}s"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], *, left: int = 1, table_id: str = "",
           text_column: int = -1) -> str:
    """An HTML table of already-escaped cells; the first ``left`` columns are left-aligned,
    ``text_column`` (e.g. an error message) wraps."""
    def cls(i: int) -> str:
        return " class=msg" if i == text_column else " class=l" if i < left else ""

    ident = f' id="{table_id}"' if table_id else ""
    th = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="wide"><table{ident}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _summary(data: dict[str, Any]) -> list[str]:
    s = data["summary"]
    cards = [("rows ok", _n(s["ok"])), ("error rows", _n(s["error"])), ("requests", _n(s["requests"])),
             ("tokens in / out", f"{_n(s['prompt_tokens'])} / {_n(s['completion_tokens'])}"),
             ("cost", _usd(s["cost_usd"])), ("wall time", _duration(s["wall_seconds"])),
             ("cache hits", _n(s["cache_hits"])), ("runs", _n(s["runs"]))]
    lines = ['<h2 id="summary">Summary</h2>', '<div class="cards">' + "".join(
        f"<div class=card><b>{v}</b><span>{k}</span></div>" for k, v in cards) + "</div>"]
    latency = data["latency"]["models"]
    rows = [[_e(m["key"]), *(_n(m[k]) for k in ("requests", "ok", "errors", "retries", "rate_limited",
                                                  "fallbacks_in", "prompt_tokens", "completion_tokens")),
             _usd(m["cost_usd"]), _n(m["cache_hits"]), _n(m["repairs"]),
             *(_n(latency.get(m["key"], {}).get(f"p{p}_ms")) for p in (50, 95, 99))] for m in data["models"]]
    lines.append(_table(["model", "requests", "ok", "errors", "retries", "429s", "fallbacks in", "prompt tokens",
                         "completion tokens", "cost", "cache hits", "repairs", "p50 ms", "p95 ms", "p99 ms"],
                        rows, table_id="models"))
    if len(data["runs"]) > 1:
        lines.append("<h2 id=\"runs\">Runs</h2>")
        lines.append(_table(["run", "started", "ended", "outcome", "stop reason", "rows this run", "ok rows",
                             "error rows", "requests", "cost", "max_cost_usd", "wall time"],
                            ([_e(r["run_id"]), _e(r["started"]), _e(r["ended"]), _e(r["outcome"]),
                              _e(r["stop_reason"]), _n(r["rows_this_run"]), _n(r["rows_ok"]), _n(r["rows_error"]),
                              _n(r["requests"]), _usd(r["cost_usd"]), _usd(r["max_cost_usd"]),
                              _duration(r["wall_seconds"])] for r in data["runs"]), left=5, table_id="runs-table"))
    return lines


def _missing(what: str) -> str:
    return f'<p class="missing">{what} needs the attempt log (attempts/), which this output does not have.</p>'


SECTIONS = {
    "throughput": ("Throughput", "Top: rows finished per second (answered or failed, cache hits included). "
                   "Bottom: HTTP requests per second per model; dashed, the model's limit "
                   "(requests_per_minute / 60) when the manifest records it."),
    "failures": ("429s, errors and fallbacks", "Counts per time bucket: 429 responses per model, failed attempts "
                 "per model (429s apart), failed attempts by type, and rows moving down their model chain "
                 "(dashed)."),
    "cost": ("Cost over time", "What the whole output has cost so far (earlier runs included: max_cost_usd "
             "covers the output across resumes), against each run's max_cost_usd (dashed)."),
}


def _chart_section(name: str, charts: dict[str, str], data: dict[str, Any]) -> list[str]:
    title, text = SECTIONS[name]
    lines = [f'<h2 id="{name}">{title}</h2>']
    if name in charts:
        width = data["timeline"]["bucket_seconds"]
        lines.append(f"<p>{text} Buckets of {width} s; times in UTC; one column per run.</p>")
        lines.append(charts[name])
        not_drawn = data["timeline"]["runs_not_drawn"]
        if not_drawn:
            lines.append(f"<p>Older runs not drawn: {_e(', '.join(map(str, not_drawn)))}.</p>")
    elif not data["has_attempt_log"]:
        lines.append(_missing(f"{title} over time"))
    else:
        lines.append("<p>No timed attempts yet.</p>")
    return lines


def _latency(data: dict[str, Any], charts: dict[str, str]) -> list[str]:
    lat = data["latency"]
    rows = [[_e(k), _n(m["count"]), _n(m["p50_ms"]), _n(m["p95_ms"]), _n(m["p99_ms"]), _n(m["max_ms"])]
            for k, m in sorted(lat["models"].items())]
    return ['<h2 id="latency">Latency</h2>',
            f"<p>Accepted answers, from the {lat['source']}; percentiles by nearest rank, as in stats.parquet.</p>",
            _table(["model", "answers", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows, table_id="latency-table"),
            charts.get("latency", "<p>No answers yet.</p>")]


def _error_rows(table: list[dict[str, Any]]) -> list[list[str]]:
    return [[_e(t["type"]), _n(t["count"]), _e(t["example_message"]),
             _e(", ".join(t["example_ids"][:EXAMPLE_IDS_SHOWN]))] for t in table]


def _errors(data: dict[str, Any]) -> list[str]:
    head = ["type", "count", "example message", "example ids"]
    lines = ['<h2 id="errors">Errors</h2>', "<p>Error rows (the results), by <code>error_type</code>:</p>"]
    rows = _error_rows(data["errors"]["rows"])
    lines.append(_table(head, rows, table_id="error-rows", text_column=2) if rows else "<p>None.</p>")
    if "attempts" in data["errors"]:
        lines.append("<p>Failed attempts (the attempt log), by outcome, 429s included:</p>")
        rows = _error_rows(data["errors"]["attempts"])
        lines.append(_table(head, rows, table_id="error-attempts", text_column=2) if rows else "<p>None.</p>")
    return lines


def _lanes(data: dict[str, Any]) -> list[str]:
    rows = data["rows"]
    lines = ['<h2 id="lanes">Lanes and cache</h2>',
             _table(["lane", "rows", "ok", "error"], ([_e(lane), _n(sum(c.values())), _n(c.get("ok", 0)),
                                                       _n(c.get("error", 0))] for lane, c in rows["by_lane"].items()),
                    table_id="lanes-table"),
             f"<p>Rows answered from the response cache: {_n(rows['cached'])}.</p>"]
    if "attempts" in data:
        by_lane = data["attempts"]["by_lane"]
        lines.append("<p>Attempts by lane: " + _e(", ".join(f"{k} {v:,}" for k, v in sorted(by_lane.items())))
                     + ".</p>")
    return lines


def _data_block(data: dict[str, Any]) -> str:
    # "<" escaped as \u003c: a value like "</script>" in an error message cannot end the block.
    text = orjson.dumps(data, option=orjson.OPT_SORT_KEYS).decode().replace("<", "\\u003c")
    return f'<script type="application/json" id="report-data">{text}</script>'
