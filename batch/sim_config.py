"""What the simulator does (``SimConfig``, every knob with a safe default) and what it counted
(``SimCounters``, so tests assert server-side facts instead of timings).

A job's ``[sim]`` table sets the same knobs by name (batch/job.py reads them from these fields).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batch.catalog import SIM_FAULTS as FAULTS
from batch.catalog import facts_for
from batch.sim_faults import ODD_REPLIES

RATE_LIMIT_STYLES = ("openai", "openrouter", "bare")
DEFAULT_CONTEXT_WINDOW = 32_768


@dataclass(slots=True)
class SimConfig:
    """What the simulator does; every field has a safe default.

    Attributes:
        latency_ms: mean delay before each answer.
        latency_jitter_ms: uniform +/- spread around the mean.
        seed: seeds every random choice, so a run is reproducible.
        api_key: when set, requests must carry ``Bearer <api_key>`` (else 401).
        context_windows: per-model context window (default: the catalog, else 32,768).
        models: when non-empty, the only models that exist (others get 404).
        faults: probability per request of each fault in ``FAULTS``, e.g. {"500": 0.05}.
        schedule: per model (or "*"), faults for the 1st, 2nd, ... request of each
            prompt, e.g. {"*": ["429:0.3", "ok"]}; "kind:x" sets that fault's
            Retry-After to x seconds.
        down: model -> seconds, counted from the first request, during which it answers 503 (inf: always).
        retired: models that answer 404 ``model_deprecated``, besides those the catalog knows were retired
            (openai/gpt-3.5-turbo, shut down by OpenAI on 2026-10-23).
        catalog_retired: also retire the models the catalog knows their provider shut down (false: a provider
            still serving them, as some Azure deployments serve gpt-3.5-turbo).
        no_endpoints: models that answer OpenRouter's 404 "No endpoints found for MODEL." (no availability object).
        retry_after_seconds: Retry-After sent with 429 and 503 faults.
        hang_seconds: how long a "hang" or "stall_body" fault holds the connection.
        record_times: keep every request's arrival time per prompt (for retry-timing tests).
        requests_per_minute, tokens_per_minute: limits over a sliding window of ``window_seconds``
            (tokens = prompt + completion, as usage reports them), counted when a request
            arrives; requests refused with 429 do not count.
        window_seconds: the length of that sliding window.
        limit_windows: shorter windows over which the same limits are also enforced, pro rata
            (e.g. [1] enforces 1/60 of a per-minute limit in every second, as OpenAI may).
        rate_limit_style: "openai" (x-ratelimit-* headers on every response, limit and wait
            stated in 429 messages, no Retry-After), "openrouter" (no headers on success; 429s
            carry X-RateLimit-* and Retry-After) or "bare" (429 with Retry-After only).
        report_cost: include ``usage.cost`` as OpenRouter does (False: as OpenAI, tokens only).
        json_mode_only: models that, like gpt-3.5-turbo, take response_format json_object but refuse
            json_schema (400), and say so in GET /models supported_parameters.
        invalid_answers: probability that an answer is invalid for its format: "unsure" instead of
            one of the offered (a/b/c) choices, or JSON cut short. Drawn per (seed, prompt, nth request).
        odd_replies: probability per answer of each odd but real-world reply shape (``ODD_REPLIES``):
            content as a list of parts, numbers as strings, content that is not text, integers beyond
            64 bits in a JSON answer, usage of the wrong shape. Drawn per (seed, prompt, nth request).
        flex_refusals: probability that a request with ``service_tier = "flex"`` is refused for want of
            capacity (429, not billed; OpenAI's flex_unavailable, or OpenRouter's capacity_exhausted with
            rate_limit_style "openrouter"). Answered flex requests report ``service_tier: "flex"`` and cost half.
        echo_key: repeat the request's API key in every error message, as some proxies do ("full"),
            or masked as OpenAI does ("masked": sk-abc****wxyz); "" repeats nothing.
        batch_*: the Batch APIs (batch/sim_batch.py), in wall-clock seconds:
        batch_validating_seconds: time a batch spends in ``validating``.
        batch_median_seconds, batch_spread: a batch's time in ``in_progress`` is log-normal with this
            median and sigma, drawn per batch from the seed (defaults: 7 min, 90% within an hour, as
            observed on OpenRouter); its lines finish evenly over that time. 0 spread: always the median.
        batch_finalizing_seconds: time in ``finalizing``.
        batch_window_seconds: the completion window; lines not finished by then expire (batch_expired).
        batch_cancel_seconds: time an OpenAI batch stays ``cancelling`` (finishing lines in flight).
        batch_line_failures: share of lines that fail, drawn per (seed, custom_id).
        batch_error_shape: how an OpenAI error-file line reports a failure: "response" (status_code
            4xx/5xx with body.error), "error" (response null, error {code, message}) or "mixed" (per line).
        batch_price_factor: batch price as a share of the chat price.
        batch_max_bytes: largest OpenAI upload / OpenRouter batch body (OpenAI: 400 "File is too large.").
        batch_enqueued_token_limit: OpenAI's per-model cap on prompt tokens in unfinished batches; a batch
            over it is accepted, then fails with token_limit_exceeded. None: no cap.
        batch_inline_results: when OpenRouter's GET batch carries ``results``: "terminal" (any terminal
            status, the current reference) or "completed" (only completed, as in the beta).
        batch_beta_path: also serve OpenRouter's batches under /api/beta/batches.
        batch_results_paging: serve OpenRouter's ``GET /batches/{id}/results``; False imitates the beta,
            which had no download endpoint (results only inline, open question 3).
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    seed: int = 0
    api_key: str | None = None
    context_windows: dict[str, int] = field(default_factory=dict)
    models: tuple[str, ...] = ()
    faults: dict[str, float] = field(default_factory=dict)
    schedule: dict[str, list[str]] = field(default_factory=dict)
    down: dict[str, float] = field(default_factory=dict)
    retired: tuple[str, ...] = ()
    catalog_retired: bool = True
    no_endpoints: tuple[str, ...] = ()
    retry_after_seconds: float = 1.0
    hang_seconds: float = 600.0
    record_times: bool = False
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    window_seconds: float = 60.0
    limit_windows: tuple[float, ...] = ()
    rate_limit_style: str = "openai"
    report_cost: bool = True
    invalid_answers: float = 0.0
    json_mode_only: tuple[str, ...] = ()
    echo_key: str = ""
    odd_replies: dict[str, float] = field(default_factory=dict)
    flex_refusals: float = 0.0
    batch_validating_seconds: float = 2.0
    batch_median_seconds: float = 420.0
    batch_spread: float = 1.68
    batch_finalizing_seconds: float = 2.0
    batch_window_seconds: float = 86_400.0
    batch_cancel_seconds: float = 60.0
    batch_line_failures: float = 0.0
    batch_error_shape: str = "mixed"
    batch_price_factor: float = 0.5
    batch_max_bytes: int = 200 * 1024 * 1024
    batch_enqueued_token_limit: int | None = None
    batch_inline_results: str = "terminal"
    batch_beta_path: bool = False
    batch_results_paging: bool = True

    def __post_init__(self) -> None:
        for kind in self.faults:
            if kind not in FAULTS:
                raise ValueError(f"unknown sim fault {kind!r}; known: {', '.join(FAULTS)}")
        for kind in self.odd_replies:
            if kind not in ODD_REPLIES:
                raise ValueError(f"unknown odd reply {kind!r}; known: {', '.join(ODD_REPLIES)}")
        if self.echo_key not in ("", "full", "masked"):
            raise ValueError(f"echo_key must be full, masked or empty, not {self.echo_key!r}")
        if self.rate_limit_style not in RATE_LIMIT_STYLES:
            raise ValueError(f"rate_limit_style must be openai, openrouter or bare, not {self.rate_limit_style!r}")
        if self.batch_error_shape not in ("response", "error", "mixed"):
            raise ValueError(f"batch_error_shape must be response, error or mixed, not {self.batch_error_shape!r}")
        if self.batch_inline_results not in ("terminal", "completed"):
            raise ValueError(f"batch_inline_results must be terminal or completed, not {self.batch_inline_results!r}")

    def is_retired(self, model: str) -> bool:
        """Listed in ``retired``, or retired by its provider (the catalog: openai/gpt-3.5-turbo)."""
        facts = facts_for(model)
        return model in self.retired or (self.catalog_retired and facts is not None and facts.retired_on is not None)

    def response_formats(self, model: str) -> tuple[str, ...]:
        """What response_format types a model accepts: json_mode_only, else the catalog, else both."""
        if model in self.json_mode_only:
            return ("json_object",)
        facts = facts_for(model)
        return facts.response_formats if facts else ("json_schema", "json_object")

    def listed_models(self) -> tuple[str, ...]:
        """What ``GET /models`` lists: ``models`` when set, else the canonical model alone."""
        return self.models or ("openai/gpt-4.1-mini", "openai/gpt-4o-mini")

    def context_window(self, model: str) -> int:
        if model in self.context_windows:
            return self.context_windows[model]
        facts = facts_for(model)
        return facts.context_window if facts else DEFAULT_CONTEXT_WINDOW

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SimConfig:
        """Build from a job's ``[sim]`` table (already validated by job.py)."""
        known = {k: v for k, v in options.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(slots=True)
class SimCounters:
    """What the server received and sent; read them after (or during) a run."""

    requests: int = 0
    by_model: Counter[str] = field(default_factory=Counter)
    by_prompt: Counter[str] = field(default_factory=Counter)  # hash of the conversation (prompt_key)
    statuses: Counter[int] = field(default_factory=Counter)
    in_flight: int = 0
    peak_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    after_success: Counter[str] = field(default_factory=Counter)  # requests for a prompt already answered ok
    arrivals: dict[str, list[float]] = field(default_factory=dict)  # only with record_times
    rate_limited: int = 0  # 429s sent because a limit was reached (not injected faults)
    too_large: int = 0  # 429 "Request too large": one request over the whole token limit
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)  # budget -> window length -> most admitted
    admissions: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens); only with record_times
    refusals: list[float] = field(default_factory=list)  # times of limit 429s; only with record_times
    invalid_answers: int = 0  # answers made invalid on purpose (invalid_answers)
    odd_replies: Counter[str] = field(default_factory=Counter)  # odd reply shapes sent (odd_replies)
    flex_refusals: int = 0  # flex requests refused for want of capacity
    billed_usd: float = 0.0  # what the replies' usage.cost added up to: answers and partly billed failures

    def peak(self, budget: str, seconds: float | None = None) -> int:
        """The most admitted in any window of ``seconds`` (default: the main window)."""
        windows = self.peaks.get(budget, {})
        if seconds is None:
            return max(windows.values(), default=0) if budget == "offered" else next(iter(windows.values()), 0)
        return windows.get(f"{seconds:g}", 0)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (``GET /_sim/stats``)."""
        return {
            "requests": self.requests, "by_model": dict(self.by_model), "statuses": dict(self.statuses),
            "faults": dict(self.faults), "rate_limited": self.rate_limited, "too_large": self.too_large,
            "duplicates_after_success": sum(self.after_success.values()),
            "peak_in_flight": self.peak_in_flight, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "peaks": self.peaks,
            "admissions": self.admissions, "refusals": self.refusals, "invalid_answers": self.invalid_answers,
            "odd_replies": dict(self.odd_replies), "billed_usd": self.billed_usd,
            "flex_refusals": self.flex_refusals,
        }
