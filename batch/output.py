"""The output directory before a run sends anything: fresh start, fingerprint, what is done.

Called while holding the output's lock (batch/lock.py), so nothing else
writes here meanwhile:

- ``--fresh`` deletes what batch wrote (parts, manifest, stats, journals), and
  only in a directory batch made (its manifest is there): ``output.path = "."``
  must never cost a user their own files.
- The job's fingerprint is compared with the one the output was made by.
- Runs that never ended (killed, crashed) are marked so in the manifest, and
  their spend journals become their rows in stats.parquet.
- Damaged parts are set aside; an id held twice (by batch before 0.2) is
  reduced to its newest row; the ledger says which rows are done and which
  part holds each row to redo.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batch.attempts import ATTEMPTS_DIR
from batch.batch_records import BATCHES_DIR, BatchRecords
from batch.catalog import SIM_BASE_URL
from batch.errors import OutputError
from batch.job import Job
from batch.lock import LOCK_FILE
from batch.plan import ScanReport, describe_changes, fingerprint, input_change
from batch.spend import JOURNAL_PREFIX, journal_usage, orphan_journals, remove_journal
from batch.stats import (BATCH_LANE_SUFFIX, STATS_FILE, Usage, append_stats, previous_cost, recorded_ok, recorded_runs,
                         stats_rows)
from batch.store import (MANIFEST, RESULTS_DIR, SHARDS_DIR, Ledger, part_files, read_manifest, read_parts, reconcile,
                         set_aside_damaged)

REPORT_FILE = "report.html"  # `batch report OUT` writes it here by default
_PART_TEMPS = (".part-",)  # hidden temporary and damaged part files


def existing_output(path: Path, command: str) -> Path:
    """``path`` when it is a batch output (it has a manifest.json), else OutputError (exit 2) saying what it is;
    for the commands that read or rewrite an output (``command``: e.g. "report"), which must not write a report
    or a lock file into a directory that is not one."""
    if path.is_file() and path.suffix == ".toml":
        from batch.errors import JobError
        from batch.job import load_job

        try:
            named = load_job(path).output.path
        except JobError:
            raise OutputError(f"{path} is a job file, not an output directory; give the output.path of a "
                              "job") from None
        raise OutputError(f"{path} is a job file, not an output directory; its output is {named}: "
                          f"batch {command} {named}")
    if not path.is_dir():
        raise OutputError(f"{path}: not a directory; give the output.path of a job")
    if not (path / MANIFEST).is_file():
        raise OutputError(f"{path} is not a batch output (no {MANIFEST}); give the output.path of a job")
    return path


def delete_previous(out: Path, embedded: frozenset[str] = frozenset()) -> None:
    """--fresh: delete what batch wrote in ``out``, and only in an output batch made. ``embedded``: the
    job's providers that are the embedded simulator, whose batches ended with their run."""
    if not out.exists():
        return
    if read_manifest(out) is None:
        if part_files(out / RESULTS_DIR):
            raise OutputError(f"{out}: --fresh deletes only outputs batch made, and there is no {MANIFEST} here; "
                              f"nothing was deleted. Delete {out / RESULTS_DIR} yourself if it is yours to lose")
        return
    _delete_batch_records(out, embedded)
    for folder in (out / RESULTS_DIR, out / ATTEMPTS_DIR):
        for path in [*part_files(folder), *(p for p in _listing(folder) if p.name.startswith(_PART_TEMPS))]:
            path.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    # a killed Ray driver's shards would be folded into the fresh results; an old report would describe them
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    for path in _listing(out):
        if path.name in (MANIFEST, STATS_FILE, REPORT_FILE) or path.name.startswith(JOURNAL_PREFIX):
            path.unlink(missing_ok=True)


def _delete_batch_records(out: Path, embedded: frozenset[str]) -> None:
    """--fresh forgets provider batches, but not ones a provider may still answer and bill: those are the
    user's to collect (a run without --fresh) or to give up knowingly (deleting OUT/batches)."""
    folder = out / BATCHES_DIR
    if not folder.is_dir():
        return
    holding = [r for r in BatchRecords(out).records() if r.holds_rows and r.provider not in embedded]
    if holding:
        raise OutputError(f"{out}: {len(holding)} provider batches of an earlier run ({sum(r.rows for r in holding)} "
                          f"rows) may still be answered, and billed: `batch status {out}` lists them. Run without "
                          f"--fresh to collect them first, or delete {folder} to give them up. Nothing was deleted")
    for path in _listing(folder):
        path.unlink(missing_ok=True)
    folder.rmdir()


def _listing(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def output_problem(job: Job, *, force: bool) -> str | None:
    """Why this job may not add to its output directory as it is (without ``--fresh``), or None."""
    out = job.output.path
    manifest = read_manifest(out)
    if manifest is None:
        if part_files(out / RESULTS_DIR) and not force:
            return f"{out}: holds results but no manifest.json; use --force to add to them or --fresh to start over"
        return None
    old, new = manifest.get("fingerprint", {}), fingerprint(job)
    changes = describe_changes(old, new)
    if len(changes) == 1 and changes[0].startswith("input (") and not force:  # the same job, new input
        what = input_change(old.get("input"), new["input"])
        return (f"{out}: the input changed since this output was started ({what}); --force to continue with it "
                "(rows already answered are kept), --fresh to start over")
    if changes and not force:
        errors = Ledger.read(out).errors
        redo = (f" ({errors} of its rows are error rows, kept as they are: add --retry-errors to redo them)"
                if errors else "")
        return (f"{out}: holds answers to a different job; changed since: " + "; ".join(changes)
                + f". Rerun with --force to mix them anyway{redo}, --fresh to start over, or use another "
                "output.path")
    return None


def prepare_output(job: Job, *, fresh: bool, force: bool) -> dict[str, Any]:
    """Check the output directory against this job; returns the manifest to continue."""
    out = job.output.path
    if fresh:
        delete_previous(out, frozenset(n for n, p in job.providers.items() if p.base_url == SIM_BASE_URL))
    if problem := output_problem(job, force=force):
        raise OutputError(problem)
    manifest = read_manifest(out)
    fp = fingerprint(job)
    if manifest is None:
        return {"fingerprint": fp, "runs": []}
    manifest["fingerprint"] = fp
    return manifest


def close_unfinished(out: Path, manifest: dict[str, Any]) -> None:
    """Runs that never ended: ``killed`` in the manifest, their journals into stats.parquet."""
    for entry in manifest.get("runs", []):
        if isinstance(entry, dict) and entry.get("outcome") == "running":
            entry["outcome"] = "killed"  # we hold the lock, so it is not running any more
            entry["stop_reason"] = "the process ended without finishing (kill -9, crash or power cut)"
    known = recorded_runs(out)
    orphans = {run_id: path for run_id, path in orphan_journals(out).items()
               if run_id.split(".")[0] not in known}  # a Ray worker's journal: RUN_ID.WORKER
    unrecorded = _answers_unrecorded(out) if orphans else {}
    for run_id, path in orphans.items():
        usage = journal_usage(path)
        for key, answers in unrecorded.items():  # the journal knows what was billed, the results what was kept
            usage[key] = usage.get(key, Usage()) + Usage(ok=answers)
        unrecorded = {}  # two killed runs in a row: the first one's row carries them all
        append_stats(out, stats_rows(run_id, usage))
    for path in orphan_journals(out).values():
        remove_journal(path)


def _answers_unrecorded(out: Path) -> dict[tuple[str, str], int]:
    """Answers in results/ that no run's stats count: those of a run that was killed (its stats row is made
    from its spend journal, which knows what was billed, not what was answered). Per (provider, model), the
    batch lane's as ``MODEL@batch``, as stats.parquet keys them; cache hits are not answers."""
    kept: dict[tuple[str, str], int] = {}
    for _, t in read_parts(part_files(out / RESULTS_DIR), ["status", "provider", "model", "lane", "cached"]):
        for status, provider, model, lane, cached in zip(*(t[c].to_pylist() for c in t.column_names)):
            if status == "ok" and not cached and provider and model:
                key = (provider, model + (BATCH_LANE_SUFFIX if lane == "batch" else ""))
                kept[key] = kept.get(key, 0) + 1
    for key, counted in recorded_ok(out).items():
        kept[key] = kept.get(key, 0) - counted
    return {key: n for key, n in kept.items() if n > 0}


@dataclass(slots=True)
class Resume:
    """Where this run starts: rows already done, and the part holding each row to redo."""

    done_mask: pa.Array | None  # per input row: answered by an earlier run and left alone
    old_parts: pa.Array | None  # per input row: the number of the part holding its row (-1: none), when redoing
    skipped: int
    spent: float  # what earlier runs of this output were billed
    before: int = 0  # rows the output held when the run began (a redone row is one of them)


def resume_state(out: Path, report: ScanReport, *, retry_errors: bool, retry_truncated: bool) -> Resume:
    for name in set_aside_damaged(out):
        print(f"warning: {out / RESULTS_DIR / name} is damaged (half-written or truncated) and was set aside "
              f"as .{name}.damaged; its rows will be redone", file=sys.stderr)
    reconcile(out)  # outputs of batch before 0.2 could hold an id twice after a crash in a --retry-* run
    ledger = Ledger.read(out)
    skip = ledger.skip_set(retry_errors=retry_errors, retry_truncated=retry_truncated)
    done_mask = report.skip_mask(skip)
    old_parts = None
    if (retry_errors or retry_truncated) and len(ledger.ids) and report.ids is not None:
        old_parts = ledger.parts_of(report.ids)
    skipped = int(pc.sum(done_mask).as_py() or 0) if done_mask is not None else 0
    return Resume(done_mask, old_parts, skipped, previous_cost(out), before=len(ledger.ids))


__all__ = ["LOCK_FILE", "Resume", "close_unfinished", "delete_previous", "output_problem", "prepare_output",
           "resume_state"]
