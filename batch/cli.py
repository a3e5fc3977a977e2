"""Command line: ``batch run | validate | estimate | stats | report | compact | export | cache | sim``; a thin
layer over the Python API.

Exit codes: 0 every row ok; 1 finished with some ``error`` rows; 2 invalid job
or input, nothing sent; 3 stopped early (signal, budget, fatal provider
error): rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from types import ModuleType
from pathlib import Path

import orjson

from batch import __version__
from batch.cache import default_cache_path
from batch.cli_sim import add_sim_parser, run_sim
from batch.cli_status import add_status_parser, run_status
from batch.cli_validate import add_validate_parser, run_validate
from batch.errors import BatchError, InputError, Interrupted, JobError, OutputError
from batch.job import CACHE_MODES, load_job
from batch.progress import plural
from batch.runner import EXIT_INVALID, EXIT_STOPPED, RunOptions, run_async
from batch.summary import format_summary, summary_dict


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="batch", description="Run many LLM chat completions from a TOML job file.")
    p.add_argument("--version", action="version", version=f"batch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a job (resumes where an earlier run stopped)")
    r.add_argument("job", type=Path, help="the job file (TOML)")
    r.add_argument("--output", type=Path, help="override output.path")
    r.add_argument("--concurrency", type=int, help="override run.concurrency")
    r.add_argument("--limit", type=int, help="send at most N rows this run (the rest stay for later)")
    r.add_argument("--retry-errors", action="store_true", help="also redo rows that ended as error")
    r.add_argument("--retry-truncated", action="store_true",
                   help="also redo rows whose answer was cut at max_tokens (finish_reason length)")
    r.add_argument("--force", action="store_true", help="write into an output made by a different job")
    r.add_argument("--fresh", action="store_true", help="delete earlier results in output.path and start over")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument("--cache", choices=CACHE_MODES, help="override run.cache: off, read-write, or replay "
                   "(send nothing; rows not in the cache fail)")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on Ray (pip install 'batch[ray]'): join the cluster at ADDRESS (ray://host:10001 or "
                        "host:6379), or start a local one when no address is given")
    r.add_argument("--ray-workers", type=int, metavar="N", help="with --ray: worker actors (default 2)")
    r.add_argument("--cache-path", type=Path, help="override run.cache_path (the SQLite response cache)")

    add_validate_parser(sub)

    e = sub.add_parser("estimate", help="tokens and cost range of a job, from its input; send nothing")
    e.add_argument("job", type=Path, help="the job file (TOML)")
    e.add_argument("--json", action="store_true", help="print the estimate as JSON")

    s = sub.add_parser("stats", help="summarise an output directory")
    s.add_argument("output", type=Path, help="an output directory (a job's output.path)")
    s.add_argument("--json", action="store_true", help="print the runs, models and totals as JSON")

    rp = sub.add_parser("report", help="write a self-contained HTML report of an output directory: throughput, "
                        "429s, errors, latency, cost (needs pip install 'batch[report]')")
    rp.add_argument("output", type=Path, help="the output directory of a job (its output.path)")
    rp.add_argument("--html", type=Path, help="the file to write (default OUTPUT/report.html)")
    rp.add_argument("--live", action="store_true", help="rewrite the report every --every seconds while a run "
                    "goes on (the page reloads itself); stops when the run ends, or on Ctrl-C")
    rp.add_argument("--every", type=float, default=10.0, metavar="SECONDS",
                    help="with --live: seconds between rewrites (default 10)")

    c = sub.add_parser("compact", help="write an output's results as one Parquet file")
    c.add_argument("output", type=Path, help="an output directory (a job's output.path)")
    c.add_argument("--to", type=Path, help="destination file (default OUTPUT/results.parquet)")

    x = sub.add_parser("export", help="write an output's results in another format (OpenAI Batch output lines)")
    x.add_argument("output", type=Path, help="an output directory (a job's output.path)")
    x.add_argument("file", type=Path, help="the file to write, e.g. results.jsonl")
    x.add_argument("--format", choices=("openai-batch",), default="openai-batch", help="the output format")
    x.add_argument("--errors", type=Path, help="write error rows to this file instead (OpenAI's error file)")

    k = sub.add_parser("cache", help="inspect or prune the response cache")
    k.add_argument("action", choices=("info", "prune"), help="info: what the cache holds; prune: delete old answers")
    k.add_argument("--cache-path", type=Path, help="the cache file (default: the user's, see README)")
    k.add_argument("--older-than-days", type=float, help="prune: delete answers stored more than N days ago")
    k.add_argument("--json", action="store_true", help="print what the cache holds as JSON")

    add_sim_parser(sub)
    add_status_parser(sub)
    for parser in (p, *sub.choices.values()):  # "--fr" must not silently mean "--fresh"
        parser.allow_abbrev = False
    return p


def _keep_pandas_out() -> None:
    """Spare the CLI pyarrow's pandas probe.

    pyarrow imports pandas on its first ``pa.array(list)`` call, only to ask
    whether the list is a pandas object: ~0.45 s of start-up on a machine with
    pandas installed. The CLI never gives pyarrow a pandas object, so it lets
    pyarrow record "no pandas" once. The Python API (notebooks) is left alone.
    """
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    class HidePandas:
        def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> None:
            if name == "pandas" or name.startswith("pandas."):
                raise ModuleNotFoundError("hidden from pyarrow's probe")

    finder = HidePandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([None])
    finally:
        sys.meta_path.remove(finder)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _keep_pandas_out()
    commands = {"run": _run, "validate": run_validate, "estimate": _estimate, "stats": _stats, "report": _report,
                "compact": _compact, "export": _export, "cache": _cache, "sim": run_sim, "status": run_status}
    try:
        return commands[args.command](args)
    except (KeyboardInterrupt, Interrupted):  # before a run installed its own handlers
        print("interrupted. Answers already written are kept: rerun without --fresh to resume.", file=sys.stderr)
        return EXIT_STOPPED
    except (JobError, InputError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STOPPED


def _run(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    if args.output is not None:
        job = dataclasses.replace(job, output=dataclasses.replace(job.output, path=args.output.resolve()))
    if args.concurrency is not None and args.concurrency < 1:
        raise JobError("--concurrency: expected a positive integer")
    run_overrides = {"concurrency": args.concurrency, "cache": args.cache,
                     "cache_path": args.cache_path.resolve() if args.cache_path else None}
    if given := {k: v for k, v in run_overrides.items() if v is not None}:
        job = dataclasses.replace(job, run=dataclasses.replace(job.run, **given))
    options = RunOptions(retry_errors=args.retry_errors, retry_truncated=args.retry_truncated, force=args.force, fresh=args.fresh,
                         limit=args.limit, quiet=args.quiet, engine="local" if args.ray is None else "ray",
                         ray_address=args.ray or None, ray_workers=args.ray_workers)
    if args.ray_workers is not None and args.ray_workers < 1:
        raise JobError("--ray-workers: expected a positive integer")
    if args.ray_workers is not None and args.ray is None:  # once silently ignored: the run went local
        raise JobError("--ray-workers works with --ray only; add --ray (a local Ray cluster) or drop it")
    summary = asyncio.run(run_async(job, options))
    if args.json:
        print(orjson.dumps(summary_dict(summary), option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_summary(summary))
    if summary.stop_reason:
        print(f"stopped: {summary.stop_reason}", file=sys.stderr)
    return summary.exit_code


def _stats(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from batch.store import Ledger, part_files, read_parts
    from batch.stats import COUNTERS

    path = args.output / "stats.parquet"
    if args.output.is_file() or not path.exists():
        return _stats_before_end(args)
    runs = pq.read_table(path).to_pylist()
    for r in runs:
        r["errors_by_type"] = dict(r["errors_by_type"] or [])
    sums = (*COUNTERS, "errors")
    models: dict[str, dict[str, float]] = {}
    for r in runs:
        m = models.setdefault(f"{r['provider']}:{r['model']}", dict.fromkeys(sums, 0))
        for k in sums:
            m[k] += r.get(k) or 0  # columns added by later versions are absent from older files
    total = {k: sum(m[k] for m in models.values()) for k in sums}
    ledger = Ledger.read(args.output)
    row_cost = sum(float(pc.sum(t["cost_usd"]).as_py() or 0.0)
                   for _, t in read_parts(part_files(args.output / "results"), ["cost_usd"]))
    results = {"rows": len(ledger.ids), "ok": ledger.ok, "error": ledger.errors, "cost_usd": row_cost}
    if args.json:
        print(orjson.dumps({"runs": runs, "models": models, "lanes": _lanes_of(models, sums), "total": total,
                            "results": results},
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    head = f"{'run':24} {'model':34} {'requests':>8} {'ok':>7} {'errors':>6} {'retries':>7} {'429s':>5} " \
           f"{'prompt':>9} {'completion':>10} {'cost_usd':>10} {'p50 ms':>7} {'p95 ms':>7}"
    print(head)
    for r in runs:
        print(f"{r['run_id']:24} {r['provider'] + ':' + r['model']:34} {r['requests']:8} {r['ok']:7} "
              f"{r['errors']:6} {r['retries']:7} {r['rate_limited']:5} {r['prompt_tokens']:9} "
              f"{r['completion_tokens']:10} {r['cost_usd']:10.6f} {_ms(r['latency_p50_ms'])} {_ms(r['latency_p95_ms'])}")
    print()
    for name, m in models.items():
        print(f"{'all runs':24} {name:34} {m['requests']:8} {m['ok']:7} {m['errors']:6} {m['retries']:7} "
              f"{m['rate_limited']:5} {m['prompt_tokens']:9} {m['completion_tokens']:10} {m['cost_usd']:10.6f}")
    lanes = _lanes_of(models, sums)
    if lanes:
        print("\nby lane     " + "; ".join(
            f"{lane}: {m['ok']} answers, {m['prompt_tokens']} + {m['completion_tokens']} tokens, ${m['cost_usd']:.6f}"
            + (f" ({m['second_answers']} second answers, billed, not kept)" if m["second_answers"] else "")
            for lane, m in lanes.items()))
    per_k = total["cost_usd"] / results["rows"] * 1000 if results["rows"] else 0.0
    print(f"\ntotal cost ${total['cost_usd']:.6f} (${per_k:.4f} per 1,000 rows); results: {results['rows']} rows, "
          f"{results['ok']} ok, {results['error']} error")
    if total["cache_hits"]:
        print(f"rows answered from the response cache (no request, no cost): {total['cache_hits']}")
    if total["invalid_outputs"]:
        print(f"answers that failed [output_format]: {total['invalid_outputs']}, repairs asked: {total['repairs']} "
              "(both billed, and included above)")
    return 0


def _stats_before_end(args: argparse.Namespace) -> int:
    """No stats.parquet: a first run still going, or one killed before it ended. What results/ holds so far."""
    from batch.output import existing_output
    from batch.store import Ledger

    out = existing_output(args.output, "stats")
    ledger = Ledger.read(out)
    rows = len(ledger.ids)
    results = {"rows": rows, "ok": ledger.ok, "error": ledger.errors}
    note = (f"no stats yet: stats.parquet is written when a run ends; {rows:,} rows in results/ so far "
            f"({ledger.ok:,} ok, {ledger.errors:,} error)")
    if args.json:
        print(orjson.dumps({"runs": [], "models": {}, "lanes": {}, "total": {}, "results": results, "note": note},
                           option=orjson.OPT_INDENT_2).decode())
    else:
        print(note)
    return 0


def _ms(latency: float | None) -> str:
    """A latency column: '-' for a model with no timed request (a batch lane, a run answered from the cache)."""
    return f"{latency:7.1f}" if latency is not None else f"{'-':>7}"


def _lanes_of(models: dict[str, dict[str, float]], sums: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The models' sums by lane (batch, online); empty when no run used a batch lane."""
    from batch.stats import lane_of

    if not any(lane_of(name) == "batch" for name in models):
        return {}
    lanes: dict[str, dict[str, float]] = {}
    for name, m in models.items():
        lane = lanes.setdefault(lane_of(name), dict.fromkeys(sums, 0))
        for k in sums:
            lane[k] += m[k]
    return dict(sorted(lanes.items()))


def _estimate(args: argparse.Namespace) -> int:
    from batch.estimate import estimate, format_estimate

    est = estimate(load_job(args.job))
    print(orjson.dumps(est.as_dict(), option=orjson.OPT_INDENT_2).decode() if args.json else format_estimate(est))
    return 0


def _compact(args: argparse.Namespace) -> int:
    from batch.lock import OutputLock
    from batch.output import existing_output
    from batch.store import compact, reconcile

    existing_output(args.output, "compact")  # before the lock: no lock file in a directory that is no output
    dest = args.to or args.output / "results.parquet"
    with OutputLock(args.output):  # it rewrites parts of outputs made by batch before 0.2: one writer at a time
        reconcile(args.output)
        rows = compact(args.output, dest)
    print(f"wrote {plural(rows, 'row')} to {dest}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from batch.export import export_openai_batch

    ok, failed = export_openai_batch(args.output, args.file, args.errors)
    where = (f"; {plural(failed, 'error line')} to {args.errors}" if args.errors
             else f" ({failed} of them error {'line' if failed == 1 else 'lines'})")
    print(f"wrote {plural(ok + failed if not args.errors else ok, 'line')} to {args.file}{where}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from batch.cache import describe, prune

    path = (args.cache_path or default_cache_path()).expanduser().resolve()
    if args.action == "prune":
        if args.older_than_days is None or args.older_than_days < 0:
            raise JobError("cache prune: say how old, e.g. --older-than-days 30")
        deleted = prune(path, args.older_than_days * 86400)
        print(f"deleted {deleted} answers stored more than {args.older_than_days:g} days ago from {path}")
    info = describe(path)
    if args.json:
        print(orjson.dumps(dataclasses.asdict(info), option=orjson.OPT_INDENT_2).decode())
        return 0

    def when(t: float | None) -> str:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if t else "-"

    print(f"{info.path}: {info.entries} answers, {info.bytes / 1e6:.1f} MB "
          f"(stored {when(info.oldest)} to {when(info.newest)})")
    for model, n in info.models.items():
        print(f"  {model}: {n}")
    return 0


REPORT_EXTRA_MISSING = ("batch report draws its charts with matplotlib, which is not installed here: "
                        "pip install 'batch[report]'")


def _report(args: argparse.Namespace) -> int:
    try:  # the optional extra: every other command works without it
        import matplotlib  # noqa: F401
        import numpy  # noqa: F401
    except ImportError:
        print(f"error: {REPORT_EXTRA_MISSING}", file=sys.stderr)
        return EXIT_INVALID
    from batch.output import REPORT_FILE, existing_output
    from batch.report_html import watch, write_report

    out = existing_output(args.output, "report")
    dest: Path = args.html or out / REPORT_FILE
    if not args.live:
        write_report(out, dest)
        print(dest)
        return 0
    if args.every <= 0:
        raise JobError("--every: expected a positive number of seconds")
    print(f"{dest}: rewritten every {args.every:g} s until the run ends (Ctrl-C stops)", file=sys.stderr)
    try:
        watch(out, dest, every=args.every)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    print(dest)
    return 0

