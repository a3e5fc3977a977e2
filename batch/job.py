"""Stage 1: TOML job file -> typed, validated ``Job``.

Everything about a job is checked here, once, so that later stages can trust
their inputs. Every problem is reported with its dotted key path
(``models[1].tokens_per_minute``), what was expected and what was found;
unknown keys name the closest valid key. All problems of a file are collected
and raised together as one ``JobError``.
"""

from __future__ import annotations

import difflib
import gzip
import re
import time
import tomllib
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args, get_type_hints

import orjson

from batch.answers import NORMALIZERS, make_checker, schema_problems
from batch.catalog import BUILTIN_PROVIDERS, SIM_BASE_URL, SIM_FAULTS, prices_for
from batch.checks import Problems, check_keys, choice, get, table
from batch.errors import JobError
from batch.params import provider_warnings, request_body, request_problems
from batch.sim_config import SimConfig
from batch.sim_knobs import knobs, options_from_table
from batch.lane_plan import parse_deadline
from batch.spec import (BODY_MODEL, CACHE_MODES, INPUT_FORMATS, ON_BAD_ROW, InputSpec, Job, ModelSpec,
                        OutputFormatSpec, OutputSpec, ProviderSpec, RunSpec, SimSpec)

__all__ = ["Job", "ModelSpec", "load_job", "parse_job", "looks_like_openai_batch", "CACHE_MODES"]

# --- sections ------------------------------------------------------------------

_INPUT_KEYS = ("path", "format", "id_column", "template", "messages_column", "system", "keep_columns", "body_model")


def _input(raw: dict[str, Any], base: Path, p: Problems) -> InputSpec | None:
    w = "input."
    check_keys(raw, _INPUT_KEYS, w, p)
    path = get(raw, "path", str, w, p, required=True)
    fmt: str | None = choice(raw, "format", INPUT_FORMATS, w, p, "") or None
    template = get(raw, "template", str, w, p)
    messages_column = get(raw, "messages_column", str, w, p)
    if path is None:
        return None
    full = (base / path).resolve()
    if fmt is None and "format" not in raw:
        fmt = _guess_format(full)
        if fmt is None:
            p.add("input.path", f"cannot tell the format of {path!r} from its name; "
                  f"set input.format to one of {', '.join(INPUT_FORMATS)}")
    id_column = get(raw, "id_column", str, w, p)
    body_model = choice(raw, "body_model", BODY_MODEL, w, p, "replace")
    if fmt == "openai-batch":
        for key in ("template", "messages_column", "id_column"):
            if key in raw:
                p.add(f"input.{key}", "not used with an OpenAI Batch file: each line's custom_id is its id "
                      "and its body.messages the prompt; remove it")
    elif (template is None) == (messages_column is None):
        hint = ""
        if fmt == "jsonl" and looks_like_openai_batch(full):
            hint = ("; this file looks like an OpenAI Batch file (custom_id, url, body): "
                    "set input.format = \"openai-batch\" or remove input.format")
        p.add("input", "set exactly one of 'template' (a string with {column} fields) "
              "or 'messages_column' (a column of chat messages)" + hint)
    if "body_model" in raw and fmt != "openai-batch":
        p.add("input.body_model", "only for OpenAI Batch files (input.format = \"openai-batch\")")
    return InputSpec(
        path=full,
        format=fmt or "jsonl",
        id_column="custom_id" if fmt == "openai-batch" else id_column,
        template=template,
        messages_column=messages_column,
        system=get(raw, "system", str, w, p),
        keep_columns=tuple(get(raw, "keep_columns", list, w, p, [])),
        body_model=body_model,
    )


def _guess_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return "openai-batch" if looks_like_openai_batch(path) else "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return None


def looks_like_openai_batch(path: Path) -> bool:
    """Is the first line an OpenAI Batch request (custom_id, url and body)? False if unreadable."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            for line in f:
                if line.strip():
                    first = orjson.loads(line.removeprefix(b"\xef\xbb\xbf"))
                    return isinstance(first, dict) and {"custom_id", "url", "body"} <= first.keys()
    except (OSError, EOFError, ValueError):
        pass
    return False


def _output(raw: dict[str, Any], base: Path, p: Problems) -> OutputSpec | None:
    w = "output."
    check_keys(raw, ("path", "flush_rows", "flush_seconds", "raw_response", "attempt_log"), w, p)
    path = get(raw, "path", str, w, p, required=True)
    flush_rows = get(raw, "flush_rows", int, w, p, 1000)
    flush_seconds = get(raw, "flush_seconds", float, w, p, 5.0)
    raw_response = get(raw, "raw_response", bool, w, p, False)
    if path is None:
        return None
    return OutputSpec(path=(base / path).resolve(), flush_rows=flush_rows, flush_seconds=flush_seconds,
                      raw_response=raw_response, attempt_log=get(raw, "attempt_log", bool, w, p, True))


_MODEL_KEYS = (
    "provider", "model", "requests_per_minute", "tokens_per_minute", "context_window",
    "price_input_per_million", "price_output_per_million", "service_tier",
)
SERVICE_TIERS = ("flex", "priority", "default", "auto")


def _models(root: Mapping[str, Any], p: Problems) -> tuple[ModelSpec, ...]:
    raw = root.get("models")
    if raw is None:
        p.add("models", "required: at least one [[models]] table with provider and model")
        return ()
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw) or not raw:
        p.add("models", "expected one or more [[models]] tables")
        return ()
    specs = []
    for i, m in enumerate(raw):
        w = f"models[{i}]."
        check_keys(m, _MODEL_KEYS, w, p)
        price_in = get(m, "price_input_per_million", float, w, p, positive=False)
        price_out = get(m, "price_output_per_million", float, w, p, positive=False)
        for key, price in (("price_input_per_million", price_in), ("price_output_per_million", price_out)):
            if price is not None and price < 0:
                p.add(w + key, f"expected zero or more, got {price!r}")
        spec = ModelSpec(
            provider=get(m, "provider", str, w, p, "openrouter"),
            model=get(m, "model", str, w, p, "", required=True),
            requests_per_minute=get(m, "requests_per_minute", int, w, p),
            tokens_per_minute=get(m, "tokens_per_minute", int, w, p),
            context_window=get(m, "context_window", int, w, p),
            price_input_per_million=price_in,
            price_output_per_million=price_out,
            service_tier=choice(m, "service_tier", SERVICE_TIERS, w, p, "") or None,
        )
        specs.append(spec)
    labels = [s.label for s in specs]
    for label in {x for x in labels if labels.count(x) > 1}:
        p.add("models", f"{label} is listed twice; each model appears once in the chain (the same model may "
              "appear again at another service_tier)")
    return tuple(specs)


def _providers(root: Mapping[str, Any], models: tuple[ModelSpec, ...], p: Problems) -> dict[str, ProviderSpec]:
    raw = table(root, "providers", p)
    providers: dict[str, ProviderSpec] = {}
    for name, builtin in BUILTIN_PROVIDERS.items():
        providers[name] = ProviderSpec(name=name, **builtin)
    for name, given in raw.items():
        w = f"providers.{name}."
        if not isinstance(given, dict):
            p.add(f"providers.{name}", "expected a table")
            continue
        check_keys(given, ("base_url", "api_key_env", "headers", "batch_api"), w, p)
        old = providers.get(name)
        base_url = get(given, "base_url", str, w, p, old.base_url if old else None, required=old is None)
        headers = given.get("headers", old.headers if old else {})
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            p.add(w + "headers", "expected a table of header names to strings")
            headers = {}
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            p.add(w + "base_url", f"expected an http:// or https:// URL, got {base_url!r}")
        providers[name] = ProviderSpec(
            name=name,
            base_url=(base_url or "").rstrip("/"),
            api_key_env=get(given, "api_key_env", str, w, p, old.api_key_env if old else None),
            headers=dict(headers),
            batch_api=choice(given, "batch_api", ("openrouter", "openai"), w, p, (old.batch_api if old else None) or "")
            or None,
        )
    for i, m in enumerate(models):
        if m.provider not in providers:
            close = difflib.get_close_matches(m.provider, list(providers), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            p.add(f"models[{i}].provider", f"unknown provider {m.provider!r}; {hint}"
                  f"define it in a [providers.{m.provider}] table with base_url and api_key_env")
    return providers


_RUN_KEYS = tuple(f for f in RunSpec.__dataclass_fields__)


_CHOICES = {"on_bad_row": ON_BAD_ROW, "cache": CACHE_MODES}


def _run(raw: dict[str, Any], base: Path, p: Problems) -> RunSpec:
    """Every [run] key is read as its RunSpec field is typed, with the field's default."""
    w = "run."
    check_keys(raw, _RUN_KEYS, w, p)
    d = RunSpec()
    values: dict[str, Any] = {}
    for name, hint in get_type_hints(RunSpec).items():
        kind = next(t for t in (get_args(hint) or (hint,)) if t is not type(None))  # X | None -> X
        default = getattr(d, name)
        if name == "lanes":
            values[name] = _lanes(raw, p)
        elif name in _CHOICES:
            values[name] = choice(raw, name, _CHOICES[name], w, p, default)
        elif kind is Path:  # relative to the job file
            given = get(raw, name, str, w, p)
            values[name] = (base / Path(given).expanduser()).resolve() if given else default
        else:
            values[name] = get(raw, name, kind, w, p, default)
    spec = RunSpec(**values)
    if spec.deadline is not None:
        now = time.time()
        try:
            at = parse_deadline(spec.deadline, now)
        except ValueError as exc:
            p.add("run.deadline", str(exc))
        else:
            if at <= now:  # only an ISO time can be past: a time of day is its next occurrence
                when = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                p.add("run.deadline", f"{spec.deadline!r} ({when}) has already passed; give a time to come, a time "
                      "of day (\"07:00\", the next one) or a duration (\"8h\")")
    if "batch" in spec.lanes and "online" in spec.lanes and spec.deadline is None:
        p.add("run.lanes", "both lanes need run.deadline to plan against (e.g. deadline = \"07:00\" or \"8h\"); "
              "lanes = [\"batch\"] alone sends everything to provider batches and waits for them")
    return spec


LANES = ("online", "batch")


def _lanes(raw: dict[str, Any], p: Problems) -> tuple[str, ...]:
    given = get(raw, "lanes", list, "run.", p, ["online"])
    bad = [x for x in given if x not in LANES]
    if bad or not given:
        p.add("run.lanes", f"expected a list of {' and '.join(LANES)}, got {given!r}")
        return ("online",)
    return tuple(dict.fromkeys(given))


# Keys of [sim]: the fields of SimConfig (batch/sim_config.py), checked by their types (batch/sim_knobs.py).
SIM_KEYS = tuple(k.name for k in knobs())


def _sim(raw: dict[str, Any], p: Problems) -> SimSpec:
    before = len(p.lines)
    check_keys(raw, SIM_KEYS, "sim.", p)
    options = options_from_table(raw, p)
    for name, prob in (options.get("faults") or {}).items():
        if name not in SIM_FAULTS:
            close = difflib.get_close_matches(name, SIM_FAULTS, n=1)
            p.add(f"sim.faults.{name}", f"unknown fault{'; did you mean ' + repr(close[0]) + '?' if close else ''}"
                  f" (known: {', '.join(SIM_FAULTS)})")
        elif not 0 <= prob <= 1:
            p.add(f"sim.faults.{name}", f"expected a probability between 0 and 1, got {prob!r}")
    if len(p.lines) == before:
        try:  # the checks SimConfig makes itself (choices, odd reply kinds)
            SimConfig(**options)
        except ValueError as exc:
            p.add("sim", str(exc))
    return SimSpec(options=options)


_FORMAT_KEYS = ("labels", "normalize", "json_schema", "json_schema_file", "regex", "max_repairs",
                "response_format", "instruct")
RESPONSE_FORMATS = ("auto", "json_schema", "json_object", "none")


def _output_format(raw: dict[str, Any], base: Path, p: Problems) -> OutputFormatSpec | None:
    if not raw:
        return None
    w = "output_format."
    check_keys(raw, _FORMAT_KEYS, w, p)
    given = [k for k in ("labels", "json_schema", "json_schema_file", "regex") if k in raw]
    if len(given) != 1:
        p.add("output_format", "set exactly one of labels (a list), json_schema (a table), json_schema_file "
              f"(a path) or regex (a string); got {', '.join(given) or 'none'}")
        return None
    kind = "json_schema" if given[0] == "json_schema_file" else given[0]
    labels = tuple(get(raw, "labels", list, w, p, []))
    normalize = tuple(get(raw, "normalize", list, w, p, ["strip", "casefold"]))
    for step in normalize:
        if step not in NORMALIZERS:
            close = difflib.get_close_matches(step, list(NORMALIZERS), n=1)
            p.add(w + "normalize", f"unknown step {step!r}{'; did you mean ' + repr(close[0]) + '?' if close else ''}"
                  f" (steps: {', '.join(NORMALIZERS)})")
            normalize = ("strip", "casefold")
    if kind == "labels" and not labels and "labels" in raw:
        p.add(w + "labels", "expected a non-empty list of strings")
    if kind == "labels" and labels:
        checker = make_checker("labels", labels=labels, normalize=normalize)
        if len(checker.labels) < len(labels):
            p.add(w + "labels", f"two labels are the same after normalize {list(normalize)}: {list(labels)}")
    schema = raw.get("json_schema")
    if "json_schema_file" in raw:
        name = get(raw, "json_schema_file", str, w, p)
        if name is not None:
            path = (base / name).resolve()
            try:
                schema = orjson.loads(path.read_bytes())
            except OSError as exc:
                p.add(w + "json_schema_file", f"cannot read {path}: {exc.strerror or exc}")
            except orjson.JSONDecodeError as exc:
                p.add(w + "json_schema_file", f"{path} is not valid JSON: {exc}")
    if kind == "json_schema" and schema is not None:
        for problem in schema_problems(schema, w + "json_schema"):
            p.add(problem.split(":", 1)[0], problem.split(":", 1)[1].strip())
    regex = get(raw, "regex", str, w, p)
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            p.add(w + "regex", f"not a valid regular expression: {exc}")
    mode = choice(raw, "response_format", RESPONSE_FORMATS, w, p, "auto")
    if mode in ("json_schema", "json_object") and kind != "json_schema":
        p.add(w + "response_format", f"{mode!r} needs a json_schema; labels and regex are checked after")
    return OutputFormatSpec(
        kind=kind, labels=labels, normalize=normalize, json_schema=schema if isinstance(schema, dict) else None,
        regex=regex, max_repairs=get(raw, "max_repairs", int, w, p, 2, positive=False),
        response_format=mode, instruct=get(raw, "instruct", bool, w, p, True),
    )


def _check_prices(models: tuple[ModelSpec, ...], run: RunSpec, p: Problems) -> None:
    """A cost cap needs every model's price before anything is sent: a model priced at $0 would let
    ``concurrency`` requests at a time past the cap."""
    if run.max_cost_usd is None or run.check_models:
        return  # with check_models the live prices are read at start, and a model still unpriced stops it there
    for i, m in enumerate(models):
        if None in prices_for(m.model, m.price_input_per_million, m.price_output_per_million, m.service_tier):
            p.add(f"models[{i}]", f"run.max_cost_usd needs a price for {m.model}, which the built-in price table "
                  "does not know: set price_input_per_million and price_output_per_million (USD) on this model, "
                  "or run.check_models = true to read live prices from the provider's model list")


OPENAI_BASE_URL = "https://api.openai.com"
_TOP_KEYS = ("input", "output", "request", "models", "providers", "run", "sim", "output_format")


def parse_job(data: Mapping[str, Any], source: Path) -> Job:
    """Validate an already-parsed TOML document; ``source`` anchors relative paths."""
    p = Problems(source)
    check_keys(data, _TOP_KEYS, "", p)
    base = source.parent
    inp = _input(table(data, "input", p), base, p)
    out = _output(table(data, "output", p), base, p)
    raw_request = table(data, "request", p)
    for key, problem in request_problems(raw_request):
        p.add(f"request.{key}", problem)
    request = request_body(raw_request)
    models = _models(data, p)
    providers = _providers(data, models, p)
    run = _run(table(data, "run", p), base, p)
    _check_prices(models, run, p)
    sim = _sim(table(data, "sim", p), p)
    output_format = _output_format(table(data, "output_format", p), base, p)
    if (output_format is not None and output_format.kind == "json_schema"
            and output_format.response_format != "none" and "response_format" in request):
        p.add("request.response_format", "set by [output_format]; remove one of them "
              "(or set output_format.response_format = \"none\")")
    p.raise_if_any()
    assert inp is not None and out is not None
    return Job(source=source, input=inp, output=out, request=request, models=models,
               providers=providers, run=run, sim=sim, output_format=output_format,
               warnings=_warnings(data, raw_request, models, providers))


def _warnings(data: Mapping[str, Any], request: Mapping[str, Any], models: tuple[ModelSpec, ...],
              providers: Mapping[str, ProviderSpec]) -> tuple[str, ...]:
    """What is valid but probably not meant: shown by validate and at the start of a run."""
    urls = {m.label: providers[m.provider].base_url for m in models}
    to_openai = [label for label, url in urls.items() if url.startswith(OPENAI_BASE_URL)]
    found = provider_warnings(request, to_openai)
    if data.get("sim") and SIM_BASE_URL not in urls.values():
        found.append("[sim] is ignored: no model of this job uses provider \"sim\" (the embedded simulator). "
                     "A simulator started with `batch sim` takes these settings as flags")
    return tuple(found)


def load_job(path: str | Path) -> Job:
    """Read and validate a TOML job file; raises JobError naming every problem."""
    source = Path(path).resolve()
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"{path}: cannot read job file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already carries "(at line N, column M)".
        raise JobError(f"{path}: not valid TOML: {exc}") from None
    return parse_job(data, source)
