"""``batch status OUT``: the output's provider batches (the batch lane) as the records say, without running.

It reads only ``OUT/batches/`` (batch/batch_records.py), sends nothing and needs no key: what a run in
progress shows in its progress line, or what a stopped run left in flight for the next one to collect.
"""

from __future__ import annotations

import argparse
import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from batch.batch_records import BatchRecords
from batch.progress import plural


def add_status_parser(sub: Any) -> None:
    s = sub.add_parser("status", help="the output's provider batches (batch lane) and their counts; sends nothing")
    s.add_argument("output", type=Path, help="the output directory of a job (its output.path)")
    s.add_argument("--json", action="store_true", help="print the batches as JSON")


def run_status(args: argparse.Namespace) -> int:
    from batch.output import existing_output

    out = existing_output(args.output, "status")
    records = BatchRecords(out, writer=False).records()  # a run may be writing beside us
    if args.json:
        print(orjson.dumps({"batches": [dataclasses.asdict(r) for r in records]}, option=orjson.OPT_INDENT_2).decode())
        return 0
    if not records:
        print(f"{out}: no provider batches (the job's run.lanes has no \"batch\", or nothing was submitted yet)")
        return 0
    print(f"{'batch':10} {'provider id':38} {'model':28} {'state':10} {'status':11} {'rows':>6} {'done':>6} "
          f"{'failed':>6}  submitted")
    for r in records:
        counts = r.request_counts or {}
        when = datetime.fromtimestamp(r.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        print(f"{r.local_id:10} {r.provider_id or '-':38} {r.model:28} {r.state:10} {r.status or '-':11} "
              f"{r.rows:6} {counts.get('completed', 0):6} {counts.get('failed', 0):6}  {when}")
        if r.reason or r.error:  # why it was given up, or why the provider failed it
            print(f"{'':10} {r.state}: {r.reason or r.error}")
    holding = [r for r in records if r.holds_rows]
    held = plural(sum(r.rows for r in holding), "row")
    print(f"\n{plural(len(holding), 'batch', 'batches')} {'holds' if len(holding) == 1 else 'hold'} {held}; a run collects them "
          "(rerun the job to reattach to those still in flight)" if holding else "\nno batch holds rows")
    return 0
