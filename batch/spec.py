"""What a job is: the typed, frozen ``Job`` that ``batch.job.load_job`` builds from a TOML file.

Every later stage receives the narrowest piece of it it needs; only the
runner sees the whole ``Job``. Defaults here are the documented defaults of
the job file (README, "A job file").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INPUT_FORMATS = ("jsonl", "parquet", "openai-batch")
ON_BAD_ROW = ("error", "skip", "fail")
BODY_MODEL = ("replace", "keep")  # openai-batch input: what happens to each line's body.model
CACHE_MODES = ("off", "read-write", "replay")


@dataclass(frozen=True, slots=True, kw_only=True)
class InputSpec:
    path: Path
    format: str
    id_column: str | None = None
    template: str | None = None
    messages_column: str | None = None
    system: str | None = None
    keep_columns: tuple[str, ...] = ()
    # openai-batch input: "replace" sends every line to the job's [[models]] chain;
    # "keep" starts each line at its own body.model (the chain is its fallback and default).
    body_model: str = "replace"


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSpec:
    path: Path
    flush_rows: int = 1000
    flush_seconds: float = 5.0
    raw_response: bool = False  # keep each reply's JSON body in a response_body column
    attempt_log: bool = True  # OUT/attempts/: one row per HTTP attempt (batch/attempts.py)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    provider: str
    model: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    context_window: int | None = None
    price_input_per_million: float | None = None
    price_output_per_million: float | None = None
    service_tier: str | None = None  # e.g. "flex": half price, may be refused (then the next model answers)

    @property
    def label(self) -> str:
        tier = f"@{self.service_tier}" if self.service_tier else ""
        return f"{self.provider}:{self.model}{tier}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSpec:
    name: str
    base_url: str
    api_key_env: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    batch_api: str | None = None  # "openrouter" | "openai": the provider's Batch API, for the batch lane


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSpec:
    concurrency: int = 64
    max_attempts: int = 5
    timeout_seconds: float = 60.0
    max_cost_usd: float | None = None
    fallback: bool = True
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    max_rate_limit_waits: int = 50
    breaker_failures: int = 10
    breaker_cooldown_seconds: float = 30.0
    on_bad_row: str = "error"
    limit: int | None = None
    server_fallback: bool = False  # OpenRouter: also send the chain as "models" for server-side fallback
    length_is_failure: bool = False  # a reply cut at max_tokens falls back to the next model
    give_up_seconds: float = 600.0  # stop the run (exit 3) when no model has answered for this long
    unreachable_seconds: float = 30.0  # stop (exit 3) when the endpoint never answered and refuses connections
    max_wait_seconds: float = 60.0  # no single wait (Retry-After, a reset, a probe) is longer
    # lanes (batch/lanes.py): provider Batch APIs at about half price, finished online against a deadline
    lanes: tuple[str, ...] = ("online",)  # "online", "batch", or both
    deadline: str | None = None  # "07:00", an ISO time, or a duration ("8h", "90m"): every row answered by then
    online_rows_per_second: float | None = None  # the online pace to plan with (default: from the first model's limits)
    batch_expected_seconds: float = 3600.0  # how long a provider batch usually takes (OpenRouter: 90% within 1 h)
    batch_poll_seconds: float = 30.0
    batch_rows: int = 5000  # rows per submitted batch (at most what the provider's API takes)
    spill_on_rate_limit: bool = False  # rows move to the next model while the primary is rate limited
    check_models: bool = False  # GET {base_url}/models first: live prices, context windows, missing models
    cache: str = "off"  # "off" | "read-write" | "replay": the response cache (batch/cache.py)
    cache_path: Path | None = None  # None: default_cache_path(), shared by every job of the user
    cache_nondeterministic: bool = False  # also cache requests without temperature 0 or a seed


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputFormatSpec:
    """``[output_format]``: what a valid answer is (batch/answers.py checks it)."""

    kind: str  # "labels" | "json_schema" | "regex"
    labels: tuple[str, ...] = ()
    normalize: tuple[str, ...] = ("strip", "casefold")
    json_schema: Mapping[str, Any] | None = None
    regex: str | None = None
    max_repairs: int = 2  # per model: ask again with the error, then fall back
    response_format: str = "auto"  # "auto" | "json_schema" | "json_object" | "none"
    instruct: bool = True  # json_schema: add the schema to the system prompt


@dataclass(frozen=True, slots=True, kw_only=True)
class SimSpec:
    """Knobs of the embedded simulator (provider ``sim``); see batch/sim.py."""

    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    source: Path
    input: InputSpec
    output: OutputSpec
    request: Mapping[str, Any]
    models: tuple[ModelSpec, ...]
    providers: Mapping[str, ProviderSpec]
    run: RunSpec
    sim: SimSpec
    output_format: OutputFormatSpec | None = None
    warnings: tuple[str, ...] = ()  # valid but probably not meant (validate and run show them)

    def provider_of(self, model: ModelSpec) -> ProviderSpec:
        return self.providers[model.provider]
