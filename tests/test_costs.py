"""Usage and cost: per row, per model, per run, before the run, all adding up to the cent."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from batch.sim import SimThread
from tests.conftest import run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]
GPT = {"provider": "local", "model": "openai/gpt-4.1-mini"}


def rows(n: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"review {i}: " + "quite good " * (i % 7)} for i in range(n)]


def results(tmp: Path) -> pd.DataFrame:
    return ds.dataset(tmp / "out" / "results", format="parquet").to_table().to_pandas()


class TestAddingUp:
    def test_rows_stats_and_batch_stats_agree_and_match_the_price_table(self, tmp_path: Path,
                                                                        sim_factory: Factory) -> None:
        """Sum over rows == stats.parquet == `batch stats --json`, and == usage x $0.50/$1.50 per million."""
        sim = sim_factory()
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(800)), base_url=sim.base_url,
                        models=[GPT])
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path)
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")
        report = json.loads(run_cli("stats", str(tmp_path / "out"), "--json").stdout)
        row_cost = df["cost_usd"].sum()
        assert round(row_cost, 2) == round(stats["cost_usd"].sum(), 2) == round(report["total"]["cost_usd"], 2)
        assert row_cost == pytest.approx(stats["cost_usd"].sum(), abs=1e-12)
        assert row_cost == pytest.approx(report["results"]["cost_usd"], abs=1e-12)
        priced = (df["prompt_tokens"].sum() * 0.40 + df["completion_tokens"].sum() * 1.60) / 1e6
        assert row_cost == pytest.approx(priced, rel=1e-9)
        assert (df["cost_source"] == "provider").all()

    def test_price_table_when_the_provider_reports_no_cost(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Without usage.cost, cost comes from the job's price override (else the built-in table)."""
        sim = sim_factory(report_cost=False)
        model = {**GPT, "price_input_per_million": 2.0, "price_output_per_million": 4.0}
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(50)), base_url=sim.base_url,
                        models=[model])
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path)
        assert (df["cost_source"] == "price_table").all()
        expected = (df["prompt_tokens"] * 2.0 + df["completion_tokens"] * 4.0) / 1e6
        assert df["cost_usd"].tolist() == pytest.approx(expected.tolist(), rel=1e-12)

    def test_live_prices_from_the_model_list(self, tmp_path: Path, sim_factory: Factory) -> None:
        """run.check_models reads prices from GET /models for a model batch has no price for."""
        sim = sim_factory(report_cost=False, models=("vendor/unknown-model",))
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(20)), base_url=sim.base_url,
                        models=[{"provider": "local", "model": "vendor/unknown-model"}], run={"check_models": True})
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path)
        expected = (df["prompt_tokens"] * 1.0 + df["completion_tokens"] * 2.0) / 1e6  # the sim's listed prices
        assert df["cost_usd"].tolist() == pytest.approx(expected.tolist(), rel=1e-9)

    def test_billed_failures_are_counted(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A failed attempt the provider still billed is in the row's cost and in stats; sums still agree."""
        sim = sim_factory(schedule={"*": ["finish_error", "ok"]})
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(30)), base_url=sim.base_url,
                        models=[GPT])
        assert run_cli("run", str(job), "--quiet").returncode == 0
        df = results(tmp_path)
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")
        assert stats["charged_failures"].sum() == 30
        assert df["cost_usd"].sum() == pytest.approx(stats["cost_usd"].sum(), abs=1e-12)
        answer_only = (df["prompt_tokens"] * 0.4 + df["completion_tokens"] * 1.6) / 1e6
        assert (df["cost_usd"] > answer_only).all()


class TestEstimate:
    def test_estimate_is_within_10_percent_of_what_the_run_reports(self, tmp_path: Path) -> None:
        """`batch estimate --json` on the demo job: prompt tokens within 10% of the simulator's usage."""
        proc = run_cli("estimate", "jobs/demo.toml", "--json")
        assert proc.returncode == 0, proc.stderr
        est = json.loads(proc.stdout)
        assert est["rows"] == 300 and est["token_counter"].startswith(("heuristic", "tiktoken"))
        model = est["models"][0]
        assert model["cost_usd_min"] <= model["cost_usd_max"]
        out = tmp_path / "demo"
        assert run_cli("run", "jobs/demo.toml", "--output", str(out), "--quiet").returncode == 0
        actual = pd.read_parquet(out / "results")["prompt_tokens"].sum()
        assert abs(est["prompt_tokens"] - actual) / actual < 0.10
        assert est["completion_tokens_min"] <= pd.read_parquet(out / "results")["completion_tokens"].sum() \
            <= est["completion_tokens_max"]

    def test_rows_over_a_context_window_are_flagged(self, tmp_path: Path) -> None:
        """Rows too long for a model's window are counted per model, and nothing is sent."""
        data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "hi"}, {"id": "b", "text": "word " * 400}])
        job = write_job(tmp_path, input_path=data, base_url="http://127.0.0.1:9/v1",
                        models=[{"provider": "local", "model": "small", "context_window": 100,
                                 "price_input_per_million": 1.0, "price_output_per_million": 1.0}, GPT])
        est = json.loads(run_cli("estimate", str(job), "--json").stdout)
        assert [m["rows_over_context"] for m in est["models"]] == [1, 0]


def test_stats_written_by_an_earlier_version_gain_the_new_columns(tmp_path: Path) -> None:
    """A stats.parquet without cache_hits, repairs and invalid_outputs keeps its runs when a new run appends."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.stats import STATS_SCHEMA, ModelStats, append_stats, stats_rows

    old_schema = pa.schema([f for f in STATS_SCHEMA if f.name not in ("cache_hits", "repairs", "invalid_outputs")])
    old_row = stats_rows("old-run", {("p", "m"): ModelStats(label="p:m").freeze(1.0)})[0]
    pq.write_table(pa.Table.from_pylist([{k: old_row[k] for k in old_schema.names}], schema=old_schema),
                   tmp_path / "stats.parquet")
    fresh = ModelStats(label="p:m")
    fresh.cache_hits = 7
    append_stats(tmp_path, stats_rows("new-run", {("p", "m"): fresh.freeze(1.0)}))
    table = pq.read_table(tmp_path / "stats.parquet")
    assert table["run_id"].to_pylist() == ["old-run", "new-run"]
    assert table["cache_hits"].to_pylist() == [0, 7]


class TestBilledTokens:
    def test_every_billed_token_is_counted_per_row_and_in_stats(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Repairs of invalid answers, billed failures (finish_reason "error") and a --retry-errors rerun:
        rows' billed tokens x the built-in prices = rows' cost = stats' billed tokens x prices = stats' cost."""
        sim = sim_factory(invalid_answers=0.3, faults={"finish_error": 0.05, "500": 0.05}, seed=9)
        data = write_jsonl(tmp_path / "in.jsonl", rows(300))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, models=[GPT],
                        input={"template": "Label (positive/negative/neutral): {text}"},
                        request={"temperature": 0, "max_tokens": 5}, run={"max_attempts": 1},
                        extra={"output_format": {"labels": ["positive", "negative", "neutral"], "max_repairs": 1}})
        assert run_cli("run", str(job), "--quiet").returncode == 1
        assert run_cli("run", str(job), "--quiet", "--retry-errors").returncode in (0, 1)
        df = results(tmp_path)
        stats = pd.read_parquet(tmp_path / "out" / "stats.parquet")

        def priced(prompt: float, completion: float) -> float:
            return (prompt * 0.40 + completion * 1.60) / 1e6

        rows_cost = df["cost_usd"].fillna(0).sum()
        assert rows_cost == pytest.approx(priced(df["billed_prompt_tokens"].sum(),
                                                 df["billed_completion_tokens"].sum()), rel=1e-9)
        assert stats["cost_usd"].sum() == pytest.approx(priced(stats["billed_prompt_tokens"].sum(),
                                                               stats["billed_completion_tokens"].sum()), rel=1e-9)
        assert rows_cost == pytest.approx(stats["cost_usd"].sum(), rel=1e-9)
        assert rows_cost == pytest.approx(sim.counters.billed_usd, rel=1e-9)
        assert stats["billed_prompt_tokens"].sum() > stats["prompt_tokens"].sum()  # repairs and failures count
        invalid = df[df["error_type"] == "invalid_output"]
        assert len(invalid) and (invalid["billed_prompt_tokens"] > 0).all() and invalid["prompt_tokens"].isna().all()
