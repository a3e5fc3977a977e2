"""batch report: the numbers behind each chart agree with stats.parquet and the results; the page stands alone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.report_html import build_page
from batch.report_read import ATTEMPT_FIELDS, part_paths, read_dataset
from batch.report_timeline import bucket_seconds
from tests.conftest import ROOT, run_cli
from tests.synthetic_output import FALLBACK, PRIMARY, faulty_output

CHARTS = ("throughput", "failures", "latency", "cost")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def page_data(page: str) -> dict[str, Any]:
    """The JSON block embedded in a page."""
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    assert m is not None, "no report-data block"
    return orjson.loads(m.group(1))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    """One synthetic output with faults (written once per module), its page and the page's data."""
    out = faulty_output(tmp_path_factory.mktemp("report") / "out").out
    page, _ = build_page(out)
    return out, page, page_data(page)


def stats_by_model(out: Path) -> pd.DataFrame:
    stats = pd.read_parquet(out / "stats.parquet")
    stats["key"] = stats["provider"] + ":" + stats["model"]
    return stats.groupby("key").sum(numeric_only=True)


def stats_errors(out: Path) -> dict[str, int]:
    totals: dict[str, int] = {}
    for pairs in pd.read_parquet(out / "stats.parquet")["errors_by_type"]:
        for kind, n in pairs:
            totals[kind] = totals.get(kind, 0) + n
    return totals


class TestNumbersAgree:
    def test_requests_per_model_are_the_online_attempts_in_stats(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """Requests per model (attempts with lane online) equal stats.parquet's requests, summed over runs."""
        out, _, data = synthetic
        stats = stats_by_model(out)
        assert data["attempts"]["requests_by_model"] == {k: int(v) for k, v in stats["requests"].items()}
        assert data["summary"]["requests"] == data["attempts"]["requests"] == int(stats["requests"].sum())

    def test_rate_limited_are_the_429_attempts_in_stats(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """429s per model (attempts with outcome rate_limited) equal stats.parquet's rate_limited."""
        out, _, data = synthetic
        stats = stats_by_model(out)
        assert data["attempts"]["rate_limited_by_model"] == {k: int(v) for k, v in stats["rate_limited"].items() if v}
        assert data["attempts"]["rate_limited"] == 4

    def test_errors_by_type_match_stats(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """Failed attempts by type equal stats' errors_by_type; repaired answers are stats' invalid_outputs."""
        out, _, data = synthetic
        by_type = dict(data["attempts"]["errors_by_type"])
        assert by_type.pop("invalid_output") == int(stats_by_model(out)["invalid_outputs"].sum()) == 1
        assert by_type == {k: v for k, v in stats_errors(out).items() if k not in ("invalid_output", "rate_limited")}

    def test_fallbacks_match_stats(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """Fallbacks (then = fallback) add up to stats' fallbacks_in, model by model."""
        out, _, data = synthetic
        stats = stats_by_model(out)
        assert data["attempts"]["fallbacks"] == int(stats["fallbacks_in"].sum()) == 8
        assert data["attempts"]["fallbacks_in_by_model"] == {FALLBACK: int(stats.loc[FALLBACK, "fallbacks_in"])}
        assert data["attempts"]["fallbacks_from_model"] == {PRIMARY: 8}

    def test_cost_matches_stats_and_the_cumulative_curve(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """Cost per model equals stats; the last run's cumulative curve ends at the whole output's cost."""
        out, _, data = synthetic
        stats = stats_by_model(out)
        for key, cost in data["attempts"]["cost_by_model"].items():
            assert cost == pytest.approx(stats.loc[key, "cost_usd"], abs=1e-12)
        last = data["timeline"]["runs"][-1]
        assert last["cost_before_usd"] + sum(last["cost_usd"]) == pytest.approx(stats["cost_usd"].sum())
        assert last["max_cost_usd"] == 0.1

    def test_rows_by_status_and_lane_match_the_results(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """Rows by status, by lane and from cache equal what pandas reads from results/."""
        out, _, data = synthetic
        df = pd.read_parquet(out / "results")
        assert data["rows"]["by_status"] == df["status"].value_counts().to_dict()
        for lane, group in df.groupby("lane"):
            assert data["rows"]["by_lane"][lane] == group["status"].value_counts().to_dict()
        assert data["rows"]["cached"] == int(df["cached"].sum()) == data["attempts"]["cache_hits"] == 2
        assert data["summary"]["cache_hits"] == int(stats_by_model(out)["cache_hits"].sum())

    def test_timeline_adds_up_to_the_totals(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """Every series over time sums to its total: requests, 429s, errors, fallbacks, rows finished."""
        _, _, data = synthetic
        runs, totals = data["timeline"]["runs"], data["attempts"]
        assert len(runs) == 2 and data["timeline"]["bucket_seconds"] == 1
        for series, total in (("requests", "requests_by_model"), ("rate_limited", "rate_limited_by_model"),
                              ("errors", "errors_by_model"), ("errors_by_type", "errors_by_type")):
            summed: dict[str, int] = {}
            for run in runs:
                for key, counts in run[series].items():
                    summed[key] = summed.get(key, 0) + sum(counts)
            assert summed == totals[total], series
        assert sum(sum(r["fallbacks"]) for r in runs) == totals["fallbacks"]
        assert sum(sum(r["rows"]) for r in runs) == sum(totals["rows_finished"].values())

    def test_limits_and_runs_come_from_the_manifest(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """Each model's limit is drawn as requests per second (rpm / 60); both runs are listed with their outcome."""
        _, _, data = synthetic
        assert data["timeline"]["runs"][0]["limits_rps"] == {PRIMARY: 2.0, FALLBACK: 1.0}
        assert [r["outcome"] for r in data["runs"]] == ["stopped", "completed"]
        assert data["runs"][0]["stop_reason"].startswith("budget reached")

    def test_error_tables_give_type_count_message_and_ids(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """Error rows and failed attempts are tabled by type with one message and distinct example ids."""
        _, _, data = synthetic
        assert data["errors"]["rows"] == [{"type": "context_length", "count": 1, "example_ids": ["r25"],
                                           "example_message": "context_length: <b>HTTP</b> said no to r25"}]
        server = next(t for t in data["errors"]["attempts"] if t["type"] == "server_error")
        assert server["count"] == 16 and server["example_ids"] == ["r22", "r40", "r41", "r42", "r43"]

    def test_latency_percentiles_match_the_answers(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """p50/p95/p99 per model are nearest-rank percentiles of the accepted answers' latency."""
        out, _, data = synthetic
        a = pd.read_parquet(out / "attempts")
        ok = a[(a["outcome"] == "ok") & (a["lane"] != "cache")]
        lat = data["latency"]["models"][PRIMARY]
        values = sorted(ok[ok["model"] == PRIMARY.split(":", 1)[1]]["latency_ms"])
        assert lat["count"] == len(values) == sum(lat["counts"])
        assert lat["p50_ms"] == values[(len(values) + 1) // 2 - 1]
        assert lat["p99_ms"] == values[-1]


class TestPage:
    def test_every_chart_and_section_is_present(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """The page holds the four charts as inline SVG and every section, with no notes for a complete output."""
        _, page, data = synthetic
        for name in CHARTS:
            assert f'id="chart-{name}"' in page
        for section in ("summary", "runs", "throughput", "failures", "latency", "cost", "errors", "lanes"):
            assert f'<h2 id="{section}">' in page
        assert data["notes"] == [] and data["has_attempt_log"]

    def test_page_is_self_contained(self, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """No script, style, image or font is fetched: no URL, no <link>, no src=, no @import, no url() but #ids."""
        _, page, _ = synthetic
        assert "http://" not in page and "https://" not in page
        assert not re.search(r"<link\b|\bsrc\s*=|@import|url\(\s*['\"]?(?!#)", page, re.I)  # url(#clip) is in-page
        assert re.findall(r"<script\b[^>]*>", page) == ['<script type="application/json" id="report-data">']

    def test_text_from_the_output_is_escaped(self, tmp_path: Path) -> None:
        """Error messages with markup show as text, and "</script>" in one cannot end the data block."""
        o = faulty_output(tmp_path / "out")
        table = pq.read_table(o.out / "results" / "part-00001.parquet")
        message = pa.array(["</script><script>alert(1)</script>"] * table.num_rows)
        pq.write_table(table.set_column(table.schema.get_field_index("error_message"), "error_message", message),
                       o.out / "results" / "part-00001.parquet")
        page, data = build_page(o.out)
        assert "<b>HTTP</b>" not in page and "&lt;b&gt;HTTP&lt;/b&gt;" in page
        assert "<script>alert" not in page
        assert page_data(page) == orjson.loads(orjson.dumps(data))

    def test_cli_writes_report_html_and_prints_the_path(self, tmp_path: Path) -> None:
        """``batch report OUT`` writes OUT/report.html; ``--html FILE`` writes elsewhere; both print the path."""
        out = faulty_output(tmp_path / "out").out
        proc = run_cli("report", str(out))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(out / "report.html") and (out / "report.html").stat().st_size > 10_000
        proc = run_cli("report", str(out), "--html", str(tmp_path / "elsewhere" / "r.html"))
        assert proc.returncode == 0 and (tmp_path / "elsewhere" / "r.html").exists()
        assert 'http-equiv="refresh"' not in (tmp_path / "elsewhere" / "r.html").read_text()

    def test_not_an_output_directory_is_a_clear_error(self, tmp_path: Path) -> None:
        """A path that is not a directory: exit 2 with a message naming it."""
        proc = run_cli("report", str(tmp_path / "nope"))
        assert proc.returncode == 2 and "nope: not a directory" in proc.stderr


class TestOlderAndRunningOutputs:
    def test_without_attempt_log_the_report_says_what_is_missing(self, tmp_path: Path) -> None:
        """An output without attempts/ still reports summary, latency, errors and lanes, and says what is missing."""
        out = faulty_output(tmp_path / "out", lane_column=False).out
        shutil.rmtree(out / "attempts")
        page, data = build_page(out)
        assert not data["has_attempt_log"] and "timeline" not in data and "attempts" not in data
        assert any("no attempt log" in n for n in data["notes"])
        assert 'id="chart-latency"' in page and 'id="chart-throughput"' not in page
        assert page.count("needs the attempt log") == 3
        assert data["latency"]["source"] == "results" and data["rows"]["by_lane"] == {"online": {"ok": 49, "error": 1}}

    def test_empty_directory_gives_a_report_with_notes(self, tmp_path: Path) -> None:
        """An output directory with nothing in it yet (a run about to start) gives a page, not a traceback."""
        page, data = build_page(tmp_path)
        assert data["summary"]["rows"] == 0 and len(data["notes"]) == 4 and "</html>" in page

    def test_unreadable_part_is_skipped_with_a_note(self, tmp_path: Path) -> None:
        """A damaged part file becomes a note; the other parts are still read."""
        out = faulty_output(tmp_path / "out").out
        (out / "attempts" / "part-00004.parquet").write_bytes(b"PAR1 not really")
        _, data = build_page(out)
        assert any("part-00004.parquet: unreadable" in n for n in data["notes"])
        assert data["attempts"]["requests"] == 66

    def test_a_part_renamed_between_listing_and_reading_is_found_again(self, tmp_path: Path) -> None:
        """A listing gone stale (the part was rewritten under a new name) is taken once more; a part gone twice is a note."""
        out = faulty_output(tmp_path / "out").out
        attempts = out / "attempts"
        stale = part_paths(attempts)
        whole = pq.read_table(attempts).num_rows
        moved = pq.read_metadata(attempts / "part-00002.parquet").num_rows
        (attempts / "part-00002.parquet").rename(attempts / "part-00007.parquet")
        listings = iter([stale, part_paths(attempts)])
        notes: list[str] = []
        table = read_dataset(attempts, ATTEMPT_FIELDS, notes, list_parts=lambda d: next(listings))
        assert table is not None and table.num_rows == whole and notes == []
        table = read_dataset(attempts, ATTEMPT_FIELDS, notes, list_parts=lambda d: stale)
        assert table is not None and table.num_rows == whole - moved and "disappeared" in notes[0]

    def test_parts_rewritten_while_reporting_never_crash_it(self, tmp_path: Path) -> None:
        """While another thread keeps replacing and renaming parts atomically, reports keep coming out whole."""
        out = faulty_output(tmp_path / "out").out
        stop = threading.Event()

        def churn() -> None:
            n = 10
            while not stop.is_set():
                for part in part_paths(out / "results"):
                    table = pq.read_table(part)
                    tmp = part.with_name(f".{part.name}.tmp")
                    pq.write_table(table, tmp)
                    os.replace(tmp, part.with_name(f"part-{n:05d}.parquet"))
                    part.unlink()
                    n += 1

        writer = threading.Thread(target=churn)
        writer.start()
        try:
            for _ in range(5):
                _, data = build_page(out)
                assert data["summary"]["rows"] <= 50
        finally:
            stop.set()
            writer.join(timeout=10)


class TestLive:
    def test_live_stops_by_itself_once_the_run_has_ended(self, tmp_path: Path) -> None:
        """``--live`` on a finished output writes the page once, without the refresh, and exits."""
        out = faulty_output(tmp_path / "out").out
        proc = run_cli("report", str(out), "--live", "--every", "0.2", timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert 'http-equiv="refresh"' not in (out / "report.html").read_text()

    def test_live_rewrites_until_the_manifest_says_the_run_ended(self, tmp_path: Path) -> None:
        """While the last run is "running" the page refreshes itself; when it ends, the command stops."""
        out = faulty_output(tmp_path / "out").out
        manifest = orjson.loads((out / "manifest.json").read_bytes())
        manifest["runs"][-1].update(outcome="running", ended=None)
        (out / "manifest.json").write_bytes(orjson.dumps(manifest))
        proc = subprocess.Popen([sys.executable, "-m", "batch", "report", str(out), "--live", "--every", "0.3"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not (out / "report.html").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            first = (out / "report.html").read_text()
            assert '<meta http-equiv="refresh" content="1">' in first and "Live:" in first
            assert proc.poll() is None
            manifest["runs"][-1].update(outcome="completed", ended="2026-12-01T09:01:00+00:00")
            tmp = out / ".manifest.json.tmp"
            tmp.write_bytes(orjson.dumps(manifest))
            os.replace(tmp, out / "manifest.json")
            stdout, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0 and stdout.strip() == str(out / "report.html")
        assert 'http-equiv="refresh"' not in (out / "report.html").read_text()


class TestUnits:
    @pytest.mark.parametrize(("span", "width"), [(0, 1), (30, 1), (299, 1), (301, 2), (3600, 15),
                                                 (10 * 3600, 120), (3 * 86400, 900), (400 * 86400, 172800)])
    def test_bucket_width_follows_the_span(self, span: float, width: int) -> None:
        """The bucket is the narrowest nice width giving at most 300 buckets."""
        assert bucket_seconds(span) == width
