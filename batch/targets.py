"""Building the chain: one ``Target`` per model of the job, with its endpoint, limiter,
breaker, stats and prices; and, with ``run.check_models``, what the providers'
model lists say about prices, availability and structured outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import aiohttp

from batch.answers import resolve_response_format, response_format
from batch.breaker import Breaker
from batch.catalog import FLEX_PRICE_FACTOR, SIM_BASE_URL, facts_for, prices_for
from batch.errors import ProviderError
from batch.job import Job, ModelSpec
from batch.limits import ModelLimiter
from batch.progress import Progress
from batch.provider import Endpoint, ModelInfo, fetch_models, make_endpoint
from batch.stats import ModelStats
from batch.steer import Steering
from batch.target import Target, model_prefix


LimiterFactory = Callable[[str, float | None, float | None], ModelLimiter]  # (label, rpm, tpm) -> limiter


def _local_limiter(label: str, rpm: float | None, tpm: float | None) -> ModelLimiter:
    return ModelLimiter(rpm, tpm)


def build_targets(job: Job, sim_url: str | None, body_models: Iterable[str] = (),
                  make_limiter: LimiterFactory = _local_limiter) -> tuple[list[Target], dict[str, list[Target]]]:
    """The job's chain, and for OpenAI Batch lines that name their own model (body_model = "keep"),
    a chain starting at that model: on the first model's provider unless the chain already has it.
    ``make_limiter``: the Ray engine's workers share one limiter per model across the cluster."""
    endpoints: dict[str, Endpoint] = {}
    require_key = job.run.cache != "replay"  # replay sends nothing, so CI needs no key

    def target(level: int, m: ModelSpec, server_fallback: list[str]) -> Target:
        spec = job.provider_of(m)
        if m.provider not in endpoints:
            base = sim_url if spec.base_url == SIM_BASE_URL and sim_url else spec.base_url
            endpoints[m.provider] = make_endpoint(spec.name, base, spec.api_key_env, spec.headers,
                                                  require_key=require_key)
        p_in, p_out = prices_for(m.model, m.price_input_per_million, m.price_output_per_million, m.service_tier)
        facts = facts_for(m.model)
        rf = _response_format(job, facts.response_formats if facts else None)
        limiter = make_limiter(m.label, m.requests_per_minute, m.tokens_per_minute)
        return Target(
            level=level, model=m.model, provider=m.provider,
            prefix=model_prefix(m.model, server_fallback, rf, m.service_tier), server_fallback=tuple(server_fallback),
            cache_salt=spec.base_url.encode() + b"\0",
            endpoint=endpoints[m.provider], limiter=limiter,
            steer=Steering(limiter, m.requests_per_minute, m.tokens_per_minute),
            breaker=Breaker(job.run.breaker_failures, job.run.breaker_cooldown_seconds),
            stats=ModelStats(label=m.label),
            price_in=p_in / 1e6 if p_in is not None else None,
            price_out=p_out / 1e6 if p_out is not None else None,
            service_tier=m.service_tier,
        )

    chain = []
    for level, m in enumerate(job.models):
        later = [x.model for x in job.models[level + 1:] if x.provider == m.provider]
        chain.append(target(level, m, later if job.run.server_fallback and job.run.fallback else []))
    targets = list(chain)
    row_chains: dict[str, list[Target]] = {}
    for name in sorted(body_models):
        own = next((t for t in chain if t.model == name), None)
        if own is None:
            own = target(len(targets), ModelSpec(provider=job.models[0].provider, model=name), [])
            targets.append(own)
        row_chains[name] = [own, *(t for t in chain if t is not own)]
    return targets, row_chains


def _response_format(job: Job, supported: tuple[str, ...] | None) -> dict[str, object] | None:
    """The response_format one model gets for the job's [output_format]; ``supported``: what it accepts."""
    fmt = job.output_format
    if fmt is None or fmt.json_schema is None:
        return None
    return response_format(fmt.json_schema, resolve_response_format(fmt.response_format, fmt.kind, supported))


def _formats_from(params: tuple[str, ...]) -> tuple[str, ...]:
    """OpenRouter's supported_parameters, as the response_format types a model accepts."""
    if "structured_outputs" in params:
        return ("json_schema", "json_object")
    return ("json_object",) if "response_format" in params else ()


async def check_models(job: Job, session: aiohttp.ClientSession, targets: list[Target],
                        progress: Progress) -> None:
    """Live prices and availability from each provider's model list (run.check_models)."""
    listings: dict[str, dict[str, ModelInfo]] = {}
    for t in targets:
        if t.provider not in listings:
            try:
                listings[t.provider] = await fetch_models(session, t.endpoint)
            except ProviderError as exc:
                progress.message(f"warning: {t.provider}: {exc}; using built-in prices")
                listings[t.provider] = {}
        info = listings[t.provider].get(t.model)
        # a Batch line's own model (body_model = "keep") is not in [[models]]: no price overrides
        spec = job.models[t.level] if t.level < len(job.models) else ModelSpec(provider=t.provider, model=t.model)
        if info is None:
            if listings[t.provider]:
                progress.message(f"warning: {t.provider} does not list {t.model}; its rows will fall back")
            continue
        factor = FLEX_PRICE_FACTOR if t.service_tier == "flex" else 1.0  # listings give standard prices
        if spec.price_input_per_million is None and info.price_input is not None:
            t.price_in = info.price_input * factor
        if spec.price_output_per_million is None and info.price_output is not None:
            t.price_out = info.price_output * factor
        if info.supported_parameters is not None and job.output_format is not None:
            # the live list beats the catalog: structured outputs only where the provider says so
            rf = _response_format(job, _formats_from(info.supported_parameters))
            t.prefix = model_prefix(t.model, t.server_fallback, rf, t.service_tier)
