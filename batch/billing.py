"""What a run will be billed by, per model, before it runs: the prices and where they come from.

A run bills each answer at the cost the provider reports (``usage.cost``:
OpenRouter, and the simulator unless ``[sim] report_cost = false``), else at
the model's prices: the job's ``price_*_per_million``, else the live model
list (``run.check_models``), else the built-in table (batch/targets.py). So
the estimate takes, per model:

- the embedded simulator (provider ``sim``): its own price table, which is
  what its ``usage.cost`` is made of (batch/sim_answers.py);
- a provider that reports its cost: its model list when ``run.check_models``
  asks for it, else the job's prices, else the built-in table, since the job's
  prices only stand in for what the provider will report;
- any other provider: the job's prices, else its model list, else the table,
  which is the order the run uses.

``run.check_models`` is the user's permission to ask the job's own provider
for its model list; nothing else here touches the network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from batch.catalog import SIM_BASE_URL, facts_for
from batch.errors import ProviderError
from batch.job import Job, ModelSpec
from batch.provider import fetch_models, make_endpoint
from batch.sim_answers import sim_prices
from batch.sim_config import SimConfig

SIM_TABLE = "the simulator's price table (what its usage.cost reports)"
LISTING = "the provider's model list (run.check_models)"
JOB = "the job's price_*_per_million"
CATALOG = "batch's built-in price table"

Listing = Mapping[str, tuple[float | None, float | None]]  # model -> USD per million (input, output)


@dataclass(frozen=True, slots=True)
class Prices:
    """USD per million tokens, and where each came from; None: nobody knows."""

    input: float | None
    output: float | None
    source: str

    @property
    def known(self) -> bool:
        return self.input is not None and self.output is not None


def reports_cost(job: Job, m: ModelSpec) -> bool:
    """Does this model's provider put the charge in each reply (``usage.cost``)?"""
    base = job.provider_of(m).base_url
    if base == SIM_BASE_URL:
        return SimConfig.from_options(job.sim.options).report_cost
    return "openrouter.ai" in base


def prices_of(job: Job, m: ModelSpec, listings: Mapping[str, Listing]) -> Prices:
    """The prices the run will be billed by for ``m`` (see the module docstring)."""
    if job.provider_of(m).base_url == SIM_BASE_URL and reports_cost(job, m):
        return Prices(*sim_prices(m.model), SIM_TABLE)
    facts = facts_for(m.model)
    candidates = {
        LISTING: listings.get(m.provider, {}).get(m.model, (None, None)),
        JOB: (m.price_input_per_million, m.price_output_per_million),
        CATALOG: (facts.price_input_per_million, facts.price_output_per_million) if facts else (None, None),
    }
    order = (LISTING, JOB, CATALOG) if reports_cost(job, m) else (JOB, LISTING, CATALOG)
    p_in = next(((candidates[s][0], s) for s in order if candidates[s][0] is not None), (None, ""))
    p_out = next(((candidates[s][1], s) for s in order if candidates[s][1] is not None), (None, ""))
    sources = [s for s in dict.fromkeys((p_in[1], p_out[1])) if s]
    return Prices(p_in[0], p_out[0], " and ".join(sources) or "unknown")


def read_listings(job: Job, models: tuple[ModelSpec, ...]) -> tuple[dict[str, Listing], list[str]]:
    """With ``run.check_models``: each provider's model list, as the run would read it; and warnings.

    The embedded simulator's list is its price table for the models it lists, with no server started.
    """
    listings: dict[str, Listing] = {}
    warnings: list[str] = []
    if not job.run.check_models:
        return listings, warnings
    remote = []
    for m in models:
        if m.provider in listings or m.provider in remote:
            continue
        if job.provider_of(m).base_url == SIM_BASE_URL:
            listings[m.provider] = {name: sim_prices(name) for name in
                                    SimConfig.from_options(job.sim.options).listed_models()}
        else:
            remote.append(m.provider)
    if remote:
        fetched = asyncio.run(_fetch(job, remote))
        for provider, result in fetched.items():
            if isinstance(result, str):
                warnings.append(f"{provider}: {result}; its models are priced from the job or the built-in table")
            else:
                listings[provider] = result
    return listings, warnings


async def _fetch(job: Job, providers: list[str]) -> dict[str, Listing | str]:
    """GET {base_url}/models of each provider (a key is sent when set; OpenRouter's list needs none)."""
    out: dict[str, Listing | str] = {}
    async with aiohttp.ClientSession() as session:
        for name in providers:
            spec = job.providers[name]
            endpoint = make_endpoint(name, spec.base_url, spec.api_key_env, spec.headers, require_key=False)
            try:
                infos = await fetch_models(session, endpoint)
            except ProviderError as exc:
                out[name] = f"cannot read the model list ({exc})"
                continue
            out[name] = {model: (_per_million(i.price_input), _per_million(i.price_output))
                         for model, i in infos.items()}
    return out


def _per_million(per_token: float | None) -> float | None:
    return per_token * 1e6 if per_token is not None else None
