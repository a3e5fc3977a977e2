"""batch report: the numbers behind each chart agree with stats.parquet and the results; the page stands alone."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch.report_html import build_page
from batch.report_timeline import bucket_seconds
from batch.sim import SimThread
from tests.conftest import ROOT, run_cli, write_job, write_jsonl
from tests.synthetic_output import ATTEMPT_SCHEMA, FALLBACK, PRIMARY, faulty_output

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
        """Rows arriving down their chain add up to stats' fallbacks_in, model by model."""
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
        jobs = tmp_path / "jobs"
        jobs.mkdir()
        proc = run_cli("report", str(jobs))
        assert proc.returncode == 2 and "is not a batch output (no manifest.json)" in proc.stderr
        assert list(jobs.iterdir()) == []  # no report.html written into a directory that is no output


class TestUnits:
    @pytest.mark.parametrize(("span", "width"), [(0, 1), (30, 1), (299, 1), (301, 2), (3600, 15),
                                                 (10 * 3600, 120), (3 * 86400, 900), (400 * 86400, 172800)])
    def test_bucket_width_follows_the_span(self, span: float, width: int) -> None:
        """The bucket is the narrowest nice width giving at most 300 buckets."""
        assert bucket_seconds(span) == width


HIDE_MATPLOTLIB = """
import sys

class HideMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideMatplotlib())
from batch.cli import main
sys.exit(main(sys.argv[1:]))
"""


class TestWithoutTheExtra:
    def run_hidden(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", HIDE_MATPLOTLIB, *args], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)

    def test_report_says_how_to_install_the_extra(self, tmp_path: Path) -> None:
        """Without matplotlib, ``batch report`` exits 2 with "pip install 'batch[report]'" and writes nothing."""
        out = faulty_output(tmp_path / "out").out
        proc = self.run_hidden("report", str(out))
        assert proc.returncode == 2
        assert "pip install 'batch[report]'" in proc.stderr and "Traceback" not in proc.stderr
        assert not (out / "report.html").exists()

    def test_other_commands_work_without_the_extra(self, tmp_path: Path) -> None:
        """Without matplotlib, ``batch stats`` and ``batch --help`` work as before."""
        out = faulty_output(tmp_path / "out").out
        assert self.run_hidden("stats", str(out), "--json").returncode == 0
        help_text = self.run_hidden("--help")
        assert help_text.returncode == 0 and "report" in help_text.stdout


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``url`` with no network, no first-run and no background services."""
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
                           "--enable-logging=stderr", "--v=0", *extra, url],
                          capture_output=True, text=True, timeout=90)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here to render the page (Debian: apt-get install chromium)")
class TestInABrowser:
    def test_chromium_renders_every_chart_without_console_errors(
            self, tmp_path: Path, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """Headless Chromium loads the page offline: the DOM has every chart, the console stays silent."""
        _, page, _ = synthetic
        (tmp_path / "report.html").write_text(page)
        proc = chromium((tmp_path / "report.html").as_uri(), tmp_path / "profile", "--dump-dom")
        assert proc.returncode == 0, proc.stderr[-2000:]
        for name in CHARTS:
            assert f'id="chart-{name}"' in proc.stdout
        assert proc.stdout.count("<svg") >= len(CHARTS) and 'id="report-data"' in proc.stdout
        assert console_lines(proc.stderr) == []
        # the same capture does see console errors, so the silence above means something
        (tmp_path / "bad.html").write_text("<p>x</p><script>undefinedFunction()</script>")
        bad = chromium((tmp_path / "bad.html").as_uri(), tmp_path / "profile2", "--dump-dom")
        assert any("undefinedFunction" in line for line in console_lines(bad.stderr))

    def test_screenshot_shows_the_charts(self, tmp_path: Path, synthetic: tuple[Path, str, dict[str, Any]]) -> None:
        """A screenshot of the page is not blank: the charts paint."""
        from PIL import Image  # comes with matplotlib

        _, page, _ = synthetic
        (tmp_path / "report.html").write_text(page)
        shot = tmp_path / "shot.png"
        proc = chromium((tmp_path / "report.html").as_uri(), tmp_path / "profile", "--window-size=1280,2000",
                        "--hide-scrollbars", f"--screenshot={shot}")
        assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
        with Image.open(shot) as image:
            colours = image.convert("RGB").resize((320, 500)).getcolors(maxcolors=100_000)
        assert colours is not None and len(colours) > 50


OUTCOMES = ("ok", "rate_limited", "server_error", "timeout", "invalid_output", "an_outcome_not_known_yet", None)
THENS = ("done", "retry", "wait", "repair", "fallback", "failed", "stopped", None)
MOMENTS = st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2026, 1, 4), timezones=st.just(timezone.utc))
ATTEMPT = st.fixed_dictionaries({
    "run_id": st.sampled_from(["run-1", "run-2", None]), "id": st.none() | st.text(max_size=6),
    "attempt": st.none() | st.integers(0, 20), "lane": st.sampled_from(["online", "cache", "batch", None]),
    "provider": st.sampled_from(["openrouter", None]), "model": st.sampled_from(["a/x", "b/y", None]),
    "level": st.none() | st.integers(0, 3), "started": st.none() | MOMENTS,
    "latency_ms": st.none() | st.floats(0, 1e6), "status": st.none() | st.sampled_from([200, 429, 500]),
    "outcome": st.sampled_from(OUTCOMES), "prompt_tokens": st.none() | st.integers(0, 10**7),
    "completion_tokens": st.none() | st.integers(0, 10**7), "cost_usd": st.none() | st.floats(0, 100),
    "then": st.sampled_from(THENS), "error_message": st.none() | st.text(max_size=30),
})


class TestArbitraryAttemptLogs:
    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(ATTEMPT, max_size=30), st.booleans())
    def test_any_attempt_log_gives_a_page_whose_totals_are_the_logs(self, rows: list[dict[str, Any]],
                                                                     two_parts: bool) -> None:
        """Any attempt log (empty, one row, one model, nulls anywhere, unknown outcomes) gives a page with its totals."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            (out / "attempts").mkdir()
            table = pa.Table.from_pylist(rows, schema=ATTEMPT_SCHEMA)
            half = len(rows) // 2 if two_parts else len(rows)
            pq.write_table(table.slice(0, half), out / "attempts" / "part-00001.parquet")
            pq.write_table(table.slice(half), out / "attempts" / "part-00002.parquet")
            page, data = build_page(out)
        a = data["attempts"]
        assert "</html>" in page and page_data(page)["attempts"]["attempts"] == len(rows) == a["attempts"]
        assert a["requests"] == sum(r["lane"] == "online" for r in rows)
        assert a["rate_limited"] == sum(r["outcome"] == "rate_limited" for r in rows)
        assert a["errors"] == sum(r["outcome"] not in ("ok", "rate_limited", None) for r in rows)
        assert a["fallbacks"] == len({(r["run_id"], r["id"], r["provider"], r["model"]) for r in rows
                                      if (r["level"] or 0) > 0 and r["lane"] != "cache"})
        assert a["cache_hits"] == sum(r["lane"] == "cache" for r in rows)
        assert a["cost_usd"] == pytest.approx(sum(r["cost_usd"] or 0 for r in rows))
        timed = [r for r in rows if r["started"] is not None]
        drawn = sum(sum(c) for run in data["timeline"]["runs"] for c in run["requests"].values())
        assert drawn == sum(r["lane"] == "online" for r in timed)
        assert data["timeline"]["untimed_attempts"] == len(rows) - len(timed)


class TestRealRun:
    def test_report_of_a_real_run_agrees_with_its_stats(self, tmp_path: Path, sim_factory: Callable[..., SimThread]) -> None:
        """A real run on the simulator with 429s, 5xx and fallbacks: the report's totals equal stats.parquet and the sim's."""
        sim = sim_factory(faults={"429": 0.05, "500": 0.3}, seed=7)
        data_path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": f"row {i}"} for i in range(300)])
        job = write_job(tmp_path, input_path=data_path, base_url=sim.base_url,
                        models=[{"provider": "local", "model": "openai/gpt-4.1-mini", "requests_per_minute": 6000},
                                {"provider": "local", "model": "mistralai/mistral-small",
                                 "price_input_per_million": 1.0, "price_output_per_million": 2.0}],
                        run={"max_attempts": 2, "max_cost_usd": 5.0})
        assert run_cli("run", str(job), "--quiet").returncode in (0, 1)
        out = tmp_path / "out"
        proc = run_cli("report", str(out))
        assert proc.returncode == 0, proc.stderr
        data = page_data((out / "report.html").read_text())
        stats = stats_by_model(out)
        assert data["notes"] == []
        assert data["attempts"]["requests_by_model"] == {k: int(v) for k, v in stats["requests"].items() if v}
        assert data["attempts"]["requests"] == sim.counters.requests
        assert data["attempts"]["rate_limited"] == int(stats["rate_limited"].sum()) > 0
        assert data["attempts"]["fallbacks"] == int(stats["fallbacks_in"].sum()) > 0
        assert data["attempts"]["cost_usd"] == pytest.approx(stats["cost_usd"].sum())
        df = pd.read_parquet(out / "results")
        assert data["rows"]["by_status"] == df["status"].value_counts().to_dict()
        assert data["runs"][-1]["limits"]["local:openai/gpt-4.1-mini"]["requests_per_minute"] == 6000
        assert data["timeline"]["runs"][-1]["max_cost_usd"] == 5.0

    def test_rows_that_skip_a_broken_model_count_as_fallbacks(self, tmp_path: Path,
                                                              sim_factory: Callable[..., SimThread]) -> None:
        """A primary that is down opens its breaker: later rows go straight to the fallback without an attempt on
        it. They are fallbacks all the same, in the totals and over time, as stats.parquet counts them."""
        sim = sim_factory(down={"openai/gpt-4.1-mini": float("inf")}, seed=2)
        data_path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": f"row {i}"} for i in range(200)])
        job = write_job(tmp_path, input_path=data_path, base_url=sim.base_url,
                        models=[{"provider": "local", "model": "openai/gpt-4.1-mini"},
                                {"provider": "local", "model": "mistralai/mistral-small",
                                 "price_input_per_million": 1.0, "price_output_per_million": 2.0}],
                        run={"max_attempts": 1})
        assert run_cli("run", str(job), "--quiet").returncode == 0
        out = tmp_path / "out"
        assert run_cli("report", str(out)).returncode == 0
        data = page_data((out / "report.html").read_text())
        stats = stats_by_model(out)
        assert data["attempts"]["fallbacks"] == int(stats["fallbacks_in"].sum()) == 200
        assert sum(sum(r["fallbacks"]) for r in data["timeline"]["runs"]) == 200
        assert sum(data["attempts"]["fallbacks_from_model"].values()) < 200  # most never met the primary
