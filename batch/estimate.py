"""``batch estimate``: what a job will cost, from the input alone; nothing is sent.

Streams the input once through the same PromptBuilder a run uses. Each model
is priced by what the run will be billed by (batch/billing.py) and its prompt
tokens are counted on the basis closest to the provider's own count:

- the embedded simulator: its own tokenizer, exactly;
- OpenAI's gpt-3.5 and gpt-4 models with cl100k_base on disk: exactly, less
  up to one framing token per message (OpenAI counts 3 per message, batch 4);
- any other model: bounds from the text (batch/tokens.py ``text_bounds``).

The range, per row, then summed (README, "What a job will cost"):

- low: the fewest prompt tokens and one completion token, one request, at
  the cheapest model of the row's chain;
- high without repairs: the most prompt tokens and ``max_tokens``, at the
  dearest model;
- high: with ``[output_format]``, every answer invalid: ``max_repairs``
  repairs per model, each repeating the conversation so far (the answer and
  the correction), and every model of the chain in turn; with
  ``run.length_is_failure`` every model of the chain too.

Failed attempts are assumed unbilled (as HTTP errors are), rows answered
from the response cache or already done are assumed absent.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson

from batch.answers import make_checker
from batch.billing import Prices, prices_of, read_listings
from batch.catalog import BATCH_PRICE_FACTOR, SIM_BASE_URL, facts_for
from batch.job import Job, ModelSpec
from batch.plan import make_plan
from batch.repair import CUT_NOTE
from batch.sim_answers import count_tokens, prompt_tokens
from batch.tokens import (FRAMING_HIGH, TOKENS_PER_MESSAGE, TOKENS_REPLY_PRIMER, TokenCounter, is_cl100k_model,
                          load_counter, text_bounds, text_high)

ECHO_TOKENS = 60  # a repair's error repeats at most 60 characters of the answer: one token each at most
ERROR_WORDS = 20  # the fixed words of an error ("is not one of the labels", a JSON path's words)

Messages = list[dict[str, Any]]


class Basis(Protocol):
    """How one model's prompt tokens are counted: exactly, or between bounds."""

    name: str
    framing: int  # most tokens a message adds beyond its text

    def prompt(self, messages: Messages, counted: int) -> tuple[int, int]: ...

    def text(self, text: str) -> int: ...


class SimBasis:
    name = "exact: the simulator's tokenizer"
    framing = TOKENS_PER_MESSAGE

    def prompt(self, messages: Messages, counted: int) -> tuple[int, int]:
        n = prompt_tokens(messages)
        return n, n

    def text(self, text: str) -> int:
        return count_tokens(text)


class BoundsBasis:
    name = "bounds: batch has no tokenizer for this model (README: What a job will cost)"
    framing = FRAMING_HIGH

    def prompt(self, messages: Messages, counted: int) -> tuple[int, int]:
        return text_bounds(messages)

    def text(self, text: str) -> int:
        return text_high(text)


class ExactBasis:
    framing = TOKENS_PER_MESSAGE

    def __init__(self, counter: TokenCounter) -> None:
        self.name = f"exact: {counter.name}"
        self.counter = counter

    def prompt(self, messages: Messages, counted: int) -> tuple[int, int]:
        if not all(isinstance(m.get("content"), str) for m in messages):
            return text_bounds(messages)  # content parts: what the provider counts for them is its own
        return counted - len(messages), counted

    def text(self, text: str) -> int:
        return self.counter.count([{"content": text}]) - TOKENS_PER_MESSAGE - TOKENS_REPLY_PRIMER


@dataclass(slots=True)
class ModelEstimate:
    provider: str
    model: str
    context_window: int | None
    price_input_per_million: float | None
    price_output_per_million: float | None
    price_source: str
    token_basis: str
    rows_over_context: int = 0
    prompt_tokens_min: int = 0
    prompt_tokens_max: int = 0
    cost_usd_min: float | None = None  # if every row goes to it: see the module docstring
    cost_usd_max: float | None = None  # ... without repairs
    cost_usd_max_repairs: float | None = None  # ... with every repair the job allows


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
    max_repairs: int = 0
    cost_usd_min: float | None = None  # the whole run: the bracket that holds what it is billed
    cost_usd_max_no_repairs: float | None = None
    cost_usd_max: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    models: list[ModelEstimate] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Model:
    """One model's running sums, and what it needs per row."""

    out: ModelEstimate
    prices: Prices
    basis: Basis
    repair_tokens: int  # most tokens one repair adds to the conversation (answer and correction), max_tokens aside
    low: float = 0.0
    high: float = 0.0
    high_repairs: float = 0.0


def estimate(job: Job, *, live_prices: bool = True) -> Estimate:
    """``live_prices=False``: never read a provider's model list, even with run.check_models (validate)."""
    started = time.perf_counter()
    counter = load_counter()
    plan = make_plan(job, counter=counter)
    listings, warnings = read_listings(job, job.models) if live_prices else ({}, [])
    fmt = job.output_format
    est = Estimate(token_counter=counter.name, exact=counter.exact, notes=warnings,
                   max_repairs=fmt.max_repairs if fmt else 0)
    models: dict[tuple[str, str], _Model] = {}

    def model(spec: ModelSpec) -> _Model:
        key = (spec.provider, spec.model)
        if key not in models:
            models[key] = _model(job, spec, counter, listings)
        return models[key]

    chain = [model(m) for m in (job.models if job.run.fallback else job.models[:1])]
    several = fmt is not None or job.run.length_is_failure  # one row may be billed by each model in turn
    totals: list[float] | None = [0.0, 0.0, 0.0]
    for batch in plan.batches():
        for req in plan.builder.build(batch, plan.builder.ids(batch), None):
            est.rows += 1
            if req.problem is not None:
                est.bad_rows += 1
                continue
            completion = req.max_tokens or plan.max_tokens  # a Batch line may set its own
            _tally_tokens(est, req.prompt_tokens, completion)
            row_chain = chain
            if req.model is not None:  # body_model = "keep": the line's own model first
                own = model(ModelSpec(provider=job.models[0].provider, model=req.model))
                row_chain = [own, *(m for m in chain if m is not own)]
            messages = orjson.loads(b"{" + req.tail)["messages"]
            costs = [_row(m, messages, req.prompt_tokens, completion, est.max_repairs) for m in row_chain]
            if totals is not None and all(c is not None for c in costs):
                known = [c for c in costs if c is not None]
                totals[0] += min(c[0] for c in known)
                totals[1] += max(c[1] for c in known)
                totals[2] += sum(c[2] for c in known) if several else max(c[2] for c in known)
            else:
                totals = None
    est.completion_tokens_min = est.rows - est.bad_rows
    _finish(est, job, list(models.values()), totals)
    est.seconds = time.perf_counter() - started
    return est


def _tally_tokens(est: Estimate, prompt: int, completion: int) -> None:
    est.prompt_tokens += prompt
    est.max_prompt_tokens = max(est.max_prompt_tokens, prompt)
    est.completion_tokens_max += completion


def _model(job: Job, spec: ModelSpec, counter: TokenCounter, listings: Any) -> _Model:
    prices = prices_of(job, spec, listings)
    basis: Basis
    if job.provider_of(spec).base_url == SIM_BASE_URL:
        basis = SimBasis()
    elif counter.exact and is_cl100k_model(spec.model):
        basis = ExactBasis(counter)
    else:
        basis = BoundsBasis()
    facts = facts_for(spec.model)
    out = ModelEstimate(
        provider=spec.provider, model=spec.model,
        context_window=spec.context_window or (facts.context_window if facts else None),
        price_input_per_million=prices.input, price_output_per_million=prices.output,
        price_source=prices.source, token_basis=basis.name)
    return _Model(out, prices, basis, _repair_tokens(job, basis))


def _repair_tokens(job: Job, basis: Basis) -> int:
    """Most tokens one repair adds to the conversation, beyond the answer's own ``max_tokens``:
    the answer's framing, and the correction (batch/answers.py ``repair_messages``) with its
    error: an echo of the answer, the schema's words (json_schema), the regex, and the cut note."""
    fmt = job.output_format
    if fmt is None:
        return 0
    checker = make_checker(fmt.kind, labels=fmt.labels, normalize=fmt.normalize,
                           schema=fmt.json_schema, regex=fmt.regex)
    fixed = f"That answer is invalid: . Reply again with {checker.expectation}, and nothing else."
    error = ECHO_TOKENS + ERROR_WORDS + basis.text(CUT_NOTE)
    if fmt.kind == "regex" and fmt.regex is not None:
        error += basis.text(fmt.regex)
    if fmt.json_schema is not None:  # paths, enums and property names come from the schema
        error += basis.text(orjson.dumps(fmt.json_schema).decode())
    return 2 * basis.framing + basis.text(fixed) + error


def _row(m: _Model, messages: Messages, counted: int, completion: int, repairs: int
         ) -> tuple[float, float, float] | None:
    """(low, high without repairs, high with every repair) of one row at one model, in USD; None: unpriced."""
    low_tokens, high_tokens = m.basis.prompt(messages, counted)
    m.out.prompt_tokens_min += low_tokens
    m.out.prompt_tokens_max += high_tokens
    window = m.out.context_window
    if window and counted + completion > window:
        m.out.rows_over_context += 1
    p_in, p_out = m.prices.input, m.prices.output
    if p_in is None or p_out is None:
        return None
    low = (low_tokens * p_in + p_out) / 1e6
    high = (high_tokens * p_in + completion * p_out) / 1e6
    # request k of the conversation repeats k answers and corrections: sum over k of k = n(n+1)/2
    grown = (m.repair_tokens + completion) * repairs * (repairs + 1) // 2
    high_repairs = (repairs + 1) * high + grown * p_in / 1e6
    m.low += low
    m.high += high
    m.high_repairs += high_repairs
    return low, high, high_repairs


def _finish(est: Estimate, job: Job, models: list[_Model], totals: list[float] | None) -> None:
    for m in models:
        if m.prices.known:
            m.out.cost_usd_min, m.out.cost_usd_max, m.out.cost_usd_max_repairs = m.low, m.high, m.high_repairs
        else:
            est.notes.append(f"{m.out.provider}:{m.out.model}: no price known; set price_input_per_million and "
                             "price_output_per_million on it, or run.check_models = true to read the provider's")
    est.models = [m.out for m in models]
    if job.run.cache == "replay":
        est.cost_usd_min = est.cost_usd_max_no_repairs = est.cost_usd_max = 0.0
        est.notes.append("run.cache = \"replay\": nothing is sent and nothing is billed")
        return
    if totals is not None:
        est.cost_usd_min, est.cost_usd_max_no_repairs, est.cost_usd_max = totals
        if "batch" in job.run.lanes:  # every row may be answered by a provider batch, at the batch price
            est.cost_usd_min = totals[0] * BATCH_PRICE_FACTOR
            est.notes.append("run.lanes has \"batch\": the low end is every row answered by a provider batch (at "
                             f"{BATCH_PRICE_FACTOR:.0%} of the price), the high end every row online")
    if job.run.cache == "read-write":
        est.notes.append("rows answered from the response cache cost nothing; the range assumes none are")


def format_estimate(e: Estimate) -> str:
    lines = [
        f"rows              {e.rows}" + (f" ({e.bad_rows} cannot be sent)" if e.bad_rows else ""),
        f"prompt tokens     {e.prompt_tokens} (largest prompt {e.max_prompt_tokens}); counted by {e.token_counter}",
        f"completion tokens {e.completion_tokens_min} to {e.completion_tokens_max} (1 to max_tokens per row)",
        "cost              " + _cost_range(e),
    ]
    for m in e.models:
        price = (f"${m.price_input_per_million:g}/${m.price_output_per_million:g} per million in/out from "
                 f"{m.price_source}" if m.price_input_per_million is not None
                 and m.price_output_per_million is not None else "price unknown")
        tokens = (f"prompt {m.prompt_tokens_min} tokens" if m.prompt_tokens_min == m.prompt_tokens_max
                  else f"prompt {m.prompt_tokens_min} to {m.prompt_tokens_max} tokens")
        cost = (f"${m.cost_usd_min:.4f} to ${m.cost_usd_max:.4f} if every row goes to it"
                if m.cost_usd_min is not None and m.cost_usd_max is not None else "cost unknown")
        over = f", {m.rows_over_context} rows over its {m.context_window}-token window" if m.rows_over_context else ""
        lines.append(f"  {m.provider}:{m.model}: {price}; {tokens} ({m.token_basis}); {cost}{over}")
    lines += [f"note: {n}" for n in e.notes]
    lines.append(f"({e.seconds:.1f}s; nothing was sent)")
    return "\n".join(lines)


def _cost_range(e: Estimate) -> str:
    if e.cost_usd_min is None or e.cost_usd_max is None or e.cost_usd_max_no_repairs is None:
        return "unknown: a model of the chain has no price (see below); nothing here is $0"
    text = f"${e.cost_usd_min:.4f} to ${e.cost_usd_max:.4f}"
    if e.cost_usd_max > e.cost_usd_max_no_repairs:
        text += (f" (${e.cost_usd_max_no_repairs:.4f} at most if no answer is repaired and no row falls back; "
                 f"the top assumes every answer invalid: {e.max_repairs} repairs per model, then the next model)")
    return text
