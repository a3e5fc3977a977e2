"""``batch estimate``: what a job will cost, from the input alone; nothing is sent.

Streams the input once through the same PromptBuilder a run uses, so the
prompt-token figure is what a run would reserve. Completion tokens range from
one per row to ``max_tokens`` per row; cost is given per model as if every
row went to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from batch.catalog import facts_for, prices_for
from batch.job import Job
from batch.plan import make_plan
from batch.tokens import load_counter


@dataclass(slots=True)
class ModelEstimate:
    provider: str
    model: str
    context_window: int | None
    price_input_per_million: float | None
    price_output_per_million: float | None
    rows_over_context: int = 0
    cost_usd_min: float | None = None
    cost_usd_max: float | None = None


@dataclass(slots=True)
class Estimate:
    rows: int = 0
    bad_rows: int = 0
    prompt_tokens: int = 0
    max_prompt_tokens: int = 0
    token_counter: str = ""
    exact: bool = False
    completion_tokens_min: int = 0
    completion_tokens_max: int = 0
    seconds: float = 0.0
    models: list[ModelEstimate] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict
        return asdict(self)


def estimate(job: Job) -> Estimate:
    started = time.perf_counter()
    counter = load_counter()
    plan = make_plan(job, counter=counter)
    max_tokens = plan.max_tokens
    models = []
    for m in job.models:
        facts = facts_for(m.model)
        p_in, p_out = prices_for(m.model, m.price_input_per_million, m.price_output_per_million)
        models.append(ModelEstimate(
            provider=m.provider, model=m.model,
            context_window=m.context_window or (facts.context_window if facts else None),
            price_input_per_million=p_in, price_output_per_million=p_out,
        ))
    windows = [(me, me.context_window) for me in models if me.context_window]
    est = Estimate(token_counter=counter.name, exact=counter.exact)
    for batch in plan.batches():
        for req in plan.builder.build(batch, plan.builder.ids(batch), None):
            est.rows += 1
            if req.problem is not None:
                est.bad_rows += 1
                continue
            n = req.prompt_tokens
            est.prompt_tokens += n
            if n > est.max_prompt_tokens:
                est.max_prompt_tokens = n
            completion = req.max_tokens or max_tokens  # a Batch line may set its own
            est.completion_tokens_max += completion
            for me, window in windows:
                if n + completion > window:
                    me.rows_over_context += 1
    est.completion_tokens_min = est.rows - est.bad_rows
    for me in models:
        if me.price_input_per_million is not None and me.price_output_per_million is not None:
            base = est.prompt_tokens * me.price_input_per_million
            me.cost_usd_min = (base + est.completion_tokens_min * me.price_output_per_million) / 1e6
            me.cost_usd_max = (base + est.completion_tokens_max * me.price_output_per_million) / 1e6
    est.models = models
    est.seconds = time.perf_counter() - started
    return est


def format_estimate(e: Estimate) -> str:
    lines = [
        f"rows              {e.rows}" + (f" ({e.bad_rows} cannot be sent)" if e.bad_rows else ""),
        f"prompt tokens     {e.prompt_tokens} (largest prompt {e.max_prompt_tokens}); counted by {e.token_counter}",
        f"completion tokens {e.completion_tokens_min} to {e.completion_tokens_max} (1 to max_tokens per row)",
    ]
    for m in e.models:
        cost = (f"${m.cost_usd_min:.4f} to ${m.cost_usd_max:.4f}" if m.cost_usd_min is not None
                else "unknown (no price: set price_input_per_million / price_output_per_million)")
        over = f", {m.rows_over_context} rows over its {m.context_window}-token window" if m.rows_over_context else ""
        lines.append(f"  {m.provider}:{m.model}: {cost} if every row goes to it{over}")
    lines.append(f"({e.seconds:.1f}s; nothing was sent)")
    return "\n".join(lines)
