"""Smaller holes in the exactly-once promise, each with its test: schema changes, --fresh on a user's
folder, part numbers past 99999, dead workers, the cache's privacy, and keys echoed by providers."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batch.cache import ResponseCache
from batch.job import load_job
from batch.output import Resume
from batch.plan import make_plan
from batch.progress import Progress, Tally
from batch.provider import open_session
from batch.pump import Pump, Stop
from batch.router import Policy, Router
from batch.sim import SimThread
from batch.sinks import Sink, result_schema
from batch.store import next_part_number, part_files
from batch.targets import build_targets
from tests.conftest import ROOT, TEST_KEY, assert_secret_nowhere, run_cli, write_job, write_jsonl

Factory = Callable[..., SimThread]


def rows(n: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": f"row {i}"} for i in range(n)]


class TestSchemaChanges:
    def test_changed_keep_columns_are_refused_and_forced_mixes_still_read(self, tmp_path: Path,
                                                                          sim_factory: Factory) -> None:
        """keep_columns is part of the fingerprint; with --force the mixed parts compact and export cleanly."""
        sim = sim_factory()
        data = write_jsonl(tmp_path / "in.jsonl", rows(40))
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
        assert run_cli("run", str(job), "--quiet", "--limit", "20").returncode == 3
        job = write_job(tmp_path, input_path=data, base_url=sim.base_url, input={"keep_columns": ["text"]})
        refused = run_cli("run", str(job), "--quiet")
        assert refused.returncode == 2 and "keep_columns" in refused.stderr
        assert run_cli("run", str(job), "--quiet", "--force").returncode == 0
        compacted = run_cli("compact", str(tmp_path / "out"))
        assert compacted.returncode == 0, compacted.stderr
        table = pq.read_table(tmp_path / "out" / "results.parquet")
        assert table.num_rows == 40 and table["text"].null_count == 20
        exported = run_cli("export", str(tmp_path / "out"), str(tmp_path / "x.jsonl"))
        assert exported.returncode == 0 and "Traceback" not in exported.stderr


class TestFresh:
    def test_fresh_deletes_only_what_batch_wrote(self, tmp_path: Path, sim_factory: Factory) -> None:
        """--fresh in a folder of the user's: their files stay; batch's parts, manifest and stats go."""
        sim = sim_factory()
        folder = tmp_path / "mine"
        (folder / "results").mkdir(parents=True)
        (folder / "notes.txt").write_text("mine")
        (folder / "results" / "draft.txt").write_text("mine too")
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(30)), base_url=sim.base_url,
                        output={"path": str(folder)})
        assert run_cli("run", str(job), "--quiet", "--fresh").returncode == 0
        assert run_cli("run", str(job), "--quiet", "--fresh").returncode == 0
        assert (folder / "notes.txt").read_text() == "mine" and (folder / "results" / "draft.txt").exists()
        assert sim.counters.requests == 60 and len(part_files(folder / "results")) == 1

    def test_fresh_refuses_parts_batch_did_not_make(self, tmp_path: Path, sim_factory: Factory) -> None:
        """Part files without batch's manifest: --fresh deletes nothing and says so (exit 2)."""
        sim = sim_factory()
        folder = tmp_path / "theirs"
        (folder / "results").mkdir(parents=True)
        pq.write_table(pa.table({"id": ["x"]}), folder / "results" / "part-00001.parquet")
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(3)), base_url=sim.base_url,
                        output={"path": str(folder)})
        proc = run_cli("run", str(job), "--quiet", "--fresh")
        assert proc.returncode == 2 and "nothing was deleted" in proc.stderr
        assert (folder / "results" / "part-00001.parquet").exists() and sim.counters.requests == 0


def test_parts_are_ordered_by_number_past_99999(tmp_path: Path, sim_factory: Factory) -> None:
    """part-100000 is newer than part-99999: the next part and the newest row of an id follow the number."""
    sim = sim_factory()
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(10)), base_url=sim.base_url)
    assert run_cli("run", str(job), "--quiet").returncode == 0
    results = tmp_path / "out" / "results"
    (only,) = part_files(results)
    table = pq.read_table(only)
    only.rename(results / "part-99999.parquet")
    newer = table.set_column(table.schema.get_field_index("output"), "output", pa.array(["newer"] * 10))
    pq.write_table(newer, results / "part-100000.parquet")  # as an older version left a crash: ids twice
    assert next_part_number(results) == 100001
    assert run_cli("compact", str(tmp_path / "out")).returncode == 0
    compacted = pq.read_table(tmp_path / "out" / "results.parquet")
    assert compacted.num_rows == 10 and set(compacted["output"].to_pylist()) == {"newer"}


def test_a_worker_that_dies_is_reported_and_stops_the_run(tmp_path: Path, sim_factory: Factory) -> None:
    """A worker ending in an exception (a bug: here the sink's writer is already shut) is reported with
    its traceback and stops the run, instead of silently leaving fewer workers."""
    sim = sim_factory()
    job = load_job(write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(20)),
                             base_url=sim.base_url, output={"flush_rows": 1}))
    plan = make_plan(job)
    messages: list[str] = []

    async def go() -> Stop:
        targets, _ = build_targets(job, None)
        sink = Sink(job.output.path, result_schema([]), flush_rows=1, flush_seconds=5)
        await sink.close()  # its writer thread is gone: the first flush raises
        stop = Stop()
        progress = Progress(20, quiet=True)
        progress.message = messages.append  # type: ignore[method-assign]
        async with open_session(4) as session:
            policy = Policy(max_attempts=1, timeout=5, fallback=True, backoff_base=0, backoff_max=0,
                            max_rate_limit_waits=1, max_tokens=8)
            router = Router(session, targets, policy, lambda e: None)
            await Pump(job, plan, Resume(None, None, 0, 0.0), None, 1.0, router, sink, stop, Tally(), progress,
                       targets).run()
        return stop

    stop = asyncio.run(asyncio.wait_for(go(), 30))
    assert stop.reason is not None and "a worker stopped" in stop.reason
    assert any("Traceback" in m for m in messages)


def test_response_cache_close_is_safe_twice_and_the_cache_is_private(tmp_path: Path) -> None:
    """close() twice is harmless; a cache folder batch creates is 0700 and its file 0600."""
    path = tmp_path / "new" / "cache.sqlite3"
    cache = ResponseCache(path, "read-write")
    cache.put(b"k" * 20, b"{}", "m")
    cache.close()
    cache.close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_run_limit_in_the_job_is_honoured(tmp_path: Path, sim_factory: Factory) -> None:
    """[run] limit = 7 sends 7 rows, like --limit 7, and leaves the rest for a rerun (exit 3)."""
    sim = sim_factory()
    job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(30)), base_url=sim.base_url,
                    run={"limit": 7})
    proc = run_cli("run", str(job), "--quiet")
    assert proc.returncode == 3 and sim.counters.requests == 7
    assert "23 of 30 input rows have no result yet" in proc.stderr


def test_ctrl_c_during_the_input_scan_is_a_clean_stop(tmp_path: Path, sim_factory: Factory) -> None:
    """SIGINT while the whole input is being checked: exit 3, a sentence, no traceback, nothing sent."""
    sim = sim_factory()
    data = tmp_path / "in.jsonl"
    data.write_bytes(b"".join(orjson.dumps({"id": f"r{i}", "text": f"row {i} " * 5}) + b"\n" for i in range(400_000)))
    job = write_job(tmp_path, input_path=data, base_url=sim.base_url)
    proc = subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "out" / ".batch.lock").exists():  # the lock is taken just before the scan
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # the scan of 400,000 rows takes most of a second
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "Traceback" not in err and "interrupted" in err
    assert sim.counters.requests == 0


class TestEchoedKeys:
    def run_with_echo(self, tmp_path: Path, sim_factory: Factory, how: str) -> tuple[str, SimThread]:
        sim = sim_factory(api_key=TEST_KEY, echo_key=how, faults={"500": 0.2, "error_in_200": 0.1, "503": 0.1},
                          seed=4)
        job = write_job(tmp_path, input_path=write_jsonl(tmp_path / "in.jsonl", rows(200)), base_url=sim.base_url,
                        api_key_env="SIM_API_KEY", run={"max_attempts": 1})
        proc = run_cli("run", str(job), env={"SIM_API_KEY": TEST_KEY})
        assert proc.returncode == 1, proc.stderr
        return proc.stdout + proc.stderr, sim

    def test_a_key_repeated_in_full_reaches_no_output(self, tmp_path: Path, sim_factory: Factory) -> None:
        """A proxy that repeats the whole key in its errors: the key is in no row, file, log or message."""
        printed, sim = self.run_with_echo(tmp_path, sim_factory, "full")
        assert sum(sim.counters.faults.values()) > 20
        assert_secret_nowhere(TEST_KEY, tmp_path / "out", printed)
        assert_secret_nowhere(TEST_KEY[4:-3], tmp_path / "out", printed)  # nor a long piece of it

    def test_a_masked_key_reaches_no_output(self, tmp_path: Path, sim_factory: Factory) -> None:
        """OpenAI's masked echo (sk-tes****…9a) is scrubbed too: it gives away the key's ends."""
        printed, _ = self.run_with_echo(tmp_path, sim_factory, "masked")
        masked = f"{TEST_KEY[:6]}{'*' * (len(TEST_KEY) - 10)}{TEST_KEY[-4:]}"
        assert_secret_nowhere(masked, tmp_path / "out", printed)
        assert_secret_nowhere(TEST_KEY, tmp_path / "out", printed)


def test_no_key_in_the_environment_leaves_no_secret_to_scrub(tmp_path: Path) -> None:
    """The scrubber never turns ordinary text into '[redacted]' when there is no key."""
    from batch.errors import redact
    assert redact("upstream error 502: try again", None) == "upstream error 502: try again"
    assert os.environ.get("SIM_API_KEY") is None
