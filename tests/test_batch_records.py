"""batch_records.py: the durable record of batches, kill-safe at every step, and its use with the real client."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batch.batch_api import BatchInfo, RequestCounts, client_for
from batch.batch_records import BATCHES_DIR, BatchRecords, ids_path, record_path
from batch.errors import OutputError
from batch.sim import SimConfig, Simulator
from tests.test_batch_client import FAST, collect, endpoint, rows, run, wait

POOL = [f"r{i}" for i in range(30)]
STATUSES = ("validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "expired", "cancelled")


def info(provider_id: str, status: str, api: str = "openrouter") -> BatchInfo:
    return BatchInfo(api=api, id=provider_id, status=status, provider_status=status,
                     request_counts=RequestCounts(3, 1, 0), expires_at=2_000_000_000)


def held(records: BatchRecords) -> list[str]:
    return sorted(records.held_ids().to_pylist())


class TestLifecycle:
    def test_create_records_ids_before_the_record(self, tmp_path: Path) -> None:
        """create leaves the ids file and the planned record on disk, and a reopen sees both."""
        records = BatchRecords(tmp_path)
        rec = records.create(api="openai", provider="oa", model="m", ids=["a", "b", "c"], now=1000.0)
        assert rec.state == "planned" and rec.rows == 3 and rec.tag.startswith(rec.local_id + "-")
        assert ids_path(tmp_path / BATCHES_DIR, rec.local_id).exists()
        again = BatchRecords(tmp_path)
        assert again.get(rec.local_id) == rec and held(again) == ["a", "b", "c"]
        assert again.pending().unknown == (rec,) and rec.find_after == 1000.0 - 300
        other = again.create(api="openai", provider="oa", model="m", ids=pa.array(["d"]))
        assert other.local_id != rec.local_id and other.tag != rec.tag

    def test_moves_forward_and_releases_rows(self, tmp_path: Path) -> None:
        """planned, submitted, terminal, collected: rows are held until collected, and pending says what to do."""
        records = BatchRecords(tmp_path)
        rec = records.create(api="openrouter", provider="or", model="m", ids=["a", "b"])
        rec = records.mark_submitted(rec.local_id, info("p1", "validating"))
        assert rec.state == "submitted" and rec.provider_id == "p1" and records.pending().running == (rec,)
        with pytest.raises(ValueError):
            records.mark_terminal(rec.local_id, info("p1", "in_progress"))
        rec = records.mark_terminal(rec.local_id, info("p1", "expired"))
        assert rec.state == "terminal" and rec.status == "expired" and records.pending().finished == (rec,)
        assert rec.request_counts == {"total": 3, "completed": 1, "failed": 0} and held(records) == ["a", "b"]
        rec = records.mark_collected(rec.local_id, lines=2)
        assert rec.state == "collected" and held(records) == [] and records.provider_ids() == {"p1"}
        assert BatchRecords(tmp_path).get(rec.local_id) == rec
        assert records.ids(rec.local_id).to_pylist() == ["a", "b"]  # still on disk, no longer held

    def test_moves_never_go_back(self, tmp_path: Path) -> None:
        """A collected or abandoned batch stays so; a stale non-terminal poll of a terminal batch is ignored."""
        records = BatchRecords(tmp_path)
        a = records.create(api="openrouter", provider="or", model="m", ids=["a"])
        b = records.create(api="openrouter", provider="or", model="m", ids=["b"])
        with pytest.raises(ValueError):
            records.mark_collected(a.local_id, lines=0)  # nothing to collect before it is terminal
        with pytest.raises(ValueError):
            records.mark_status(a.local_id, info("p1", "in_progress"))  # no provider id yet
        records.mark_submitted(a.local_id, info("p1", "completed"))
        assert records.mark_status(a.local_id, info("p1", "in_progress")).state == "terminal"
        with pytest.raises(ValueError):
            records.mark_submitted(a.local_id, info("p2", "completed"))
        with pytest.raises(ValueError):
            records.mark_submitted(a.local_id, info("p1", "completed", api="openai"))
        records.mark_collected(a.local_id, lines=1)
        assert records.mark_collected(a.local_id, lines=1).state == "collected"  # a rerun repeating it
        with pytest.raises(ValueError):
            records.mark_status(a.local_id, info("p1", "completed"))
        with pytest.raises(ValueError):
            records.mark_abandoned(a.local_id, "x")
        records.mark_abandoned(b.local_id, "refused: no_batch_endpoint")
        with pytest.raises(ValueError):
            records.mark_submitted(b.local_id, info("p3", "validating"))
        assert records.get(b.local_id).reason == "refused: no_batch_endpoint" and held(records) == []

    def test_a_row_is_held_by_one_batch_at_a_time(self, tmp_path: Path) -> None:
        """A row already held cannot go into a second batch; once released it can; repeats and nulls are refused."""
        records = BatchRecords(tmp_path)
        first = records.create(api="openai", provider="oa", model="m", ids=["a", "b"])
        with pytest.raises(ValueError, match="'b'"):
            records.create(api="openai", provider="oa", model="m", ids=["c", "b"])
        for bad in ([], ["x", "x"], pa.array(["x", None])):
            with pytest.raises(ValueError):
                records.create(api="openai", provider="oa", model="m", ids=bad)
        records.mark_abandoned(first.local_id, "submit refused")
        assert records.create(api="openai", provider="oa", model="m", ids=["b"]).rows == 1

    def test_crash_leftovers_are_handled(self, tmp_path: Path) -> None:
        """An ids file without a record and a half-written temp file are removed; a record without ids is refused."""
        records = BatchRecords(tmp_path)
        rec = records.create(api="openai", provider="oa", model="m", ids=["a"])
        torn = records.create(api="openai", provider="oa", model="m", ids=["b"])
        folder = tmp_path / BATCHES_DIR
        record_path(folder, torn.local_id).unlink()  # kill -9 between the ids file and the record
        (folder / f".{rec.local_id}.json.tmp").write_bytes(b"{half")  # kill -9 inside a record's rewrite
        again = BatchRecords(tmp_path)
        assert [r.local_id for r in again.records()] == [rec.local_id] and held(again) == ["a"]
        assert sorted(p.name for p in folder.iterdir()) == [f"{rec.local_id}.ids.parquet", f"{rec.local_id}.json"]
        assert again.create(api="openai", provider="oa", model="m", ids=["b"]).local_id > torn.local_id
        ids_path(folder, rec.local_id).unlink()
        with pytest.raises(OutputError, match="row ids"):
            BatchRecords(tmp_path)
        record_path(folder, rec.local_id).write_bytes(b"not json")
        with pytest.raises(OutputError, match="not ignored"):
            BatchRecords(tmp_path)

    def test_a_reader_beside_a_run_removes_nothing(self, tmp_path: Path) -> None:
        """``batch status`` opens the records while a run may be between the two files of a create: a reader
        leaves an ids file without its record (and temp files) alone, and cannot write."""
        records = BatchRecords(tmp_path)
        done = records.create(api="openai", provider="oa", model="m", ids=["a"])
        creating = records.create(api="openai", provider="oa", model="m", ids=["b"])
        folder = tmp_path / BATCHES_DIR
        record_path(folder, creating.local_id).unlink()  # the run has written the ids, not yet the record
        (folder / f".{done.local_id}.json.tmp").write_bytes(b"{half")  # the run is rewriting a record
        before = sorted(p.name for p in folder.iterdir())
        reader = BatchRecords(tmp_path, writer=False)
        assert [r.local_id for r in reader.records()] == [done.local_id]
        assert sorted(p.name for p in folder.iterdir()) == before
        with pytest.raises(RuntimeError, match="reads only"):
            reader.create(api="openai", provider="oa", model="m", ids=["c"])

    def test_many_rows_stay_in_arrow(self, tmp_path: Path) -> None:
        """80 batches of 5,000 ids (a 400k-row job) reopen as one Arrow array of held ids."""
        records = BatchRecords(tmp_path)
        for b in range(80):
            records.create(api="openrouter", provider="or", model="m", ids=pa.array([f"{b}-{i}" for i in range(5_000)]))
        held_ids = BatchRecords(tmp_path).held_ids()
        assert isinstance(held_ids, pa.Array) and len(held_ids) == 400_000


class TestWithClient:
    def test_rerun_reattaches_and_finds_a_lost_submission(self, tmp_path: Path) -> None:
        """After a "crash", one batch is polled and collected by its recorded id, the other found by its tag."""
        async def test(sim: Simulator, s: aiohttp.ClientSession) -> None:
            client, ep = client_for("openai"), endpoint(sim, prefix="/v1")
            records = BatchRecords(tmp_path)
            kept = records.create(api="openai", provider="sim", model="gpt-4o-mini", ids=[c for c, _ in rows(3, "k")])
            records.mark_submitted(kept.local_id, await client.submit(s, ep, "gpt-4o-mini", rows(3, "k"), kept.tag))
            lost = records.create(api="openai", provider="sim", model="gpt-4o-mini", ids=[c for c, _ in rows(2, "l")])
            await client.submit(s, ep, "gpt-4o-mini", rows(2, "l"), lost.tag)  # killed before mark_submitted
            records = BatchRecords(tmp_path)  # the rerun
            pending = records.pending()
            assert [r.local_id for r in pending.unknown] == [lost.local_id]
            assert [r.local_id for r in pending.running] == [kept.local_id]
            found = await client.find(s, ep, model=lost.model, tag=lost.tag, created_after=lost.find_after, total=2)
            assert len(found) == 1 and found[0].id not in records.provider_ids()
            records.mark_submitted(lost.local_id, found[0])
            for rec in records.pending().running:
                done = await wait(client, s, ep, await client.get(s, ep, records.get(rec.local_id).provider_id or ""))
                records.mark_status(rec.local_id, done)
                got = await collect(client.results(s, ep, done))
                assert sorted(got) == sorted(records.ids(rec.local_id).to_pylist())
                records.mark_collected(rec.local_id, lines=len(got))
            assert held(BatchRecords(tmp_path)) == []
            assert sim.batches is not None and set(sim.batches.counters().submitted.values()) == {1}
        run(SimConfig(**FAST), test)


# Repeated names weigh the draw towards sequences that get batches all the way to collected.
OPS = st.lists(st.tuples(st.sampled_from(["create"] * 2 + ["submit"] * 5 + ["status"] * 3 + ["collect"] * 4
                                         + ["abandon", "crash", "crash", "torn"]),
                         st.integers(0, 30), st.sampled_from(STATUSES + STATUSES[4:])), min_size=5, max_size=30)


def _expected(state: str, op: str, status: str, has_id: bool) -> str | None:
    """The state an operation leads to, written apart from the code under test; None: it must be refused."""
    terminal = status in ("completed", "failed", "expired", "cancelled")
    if op in ("submit", "status"):
        if (op == "status" and not has_id) or state in ("collected", "abandoned"):
            return None
        return "terminal" if terminal or state == "terminal" else "submitted"
    if op == "collect":
        return "collected" if state in ("terminal", "collected") else None
    return "abandoned" if state != "collected" else None


class TestKillSafety:
    @settings(max_examples=150, deadline=None)
    @given(OPS)
    def test_any_sequence_with_crashes_keeps_every_held_row(self, ops: list[tuple[str, int, str]]) -> None:
        """After any operations and crashes, disk agrees with what was acknowledged and no held row is lost."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            records = BatchRecords(out)
            model: dict[str, dict[str, Any]] = {}  # local_id -> state, ids, provider id
            for op, n, status in ops:
                records = _apply(records, model, out, op, n, status)
                for view in (records, BatchRecords(out)):  # the live object, and a rerun after kill -9 here
                    assert {r.local_id: r.state for r in view.records()} == {k: m["state"] for k, m in model.items()}
                    must_hold = sorted(i for m in model.values() if m["state"] in ("planned", "submitted", "terminal")
                                       for i in m["ids"])
                    assert held(view) == must_hold  # every held row, each once


def _apply(records: BatchRecords, model: dict[str, dict[str, Any]], out: Path, op: str, n: int,
           status: str) -> BatchRecords:
    """Run one operation on ``records`` and on the model; returns the records object to go on with."""
    if op == "crash":
        return BatchRecords(out)
    if op in ("create", "torn"):
        busy = {i for m in model.values() if m["state"] in ("planned", "submitted", "terminal") for i in m["ids"]}
        ids = [i for i in POOL if i not in busy][: 1 + n % 4]
        if ids:
            rec = records.create(api="openrouter", provider="or", model="m", ids=ids)
            if op == "torn":  # killed between the ids file and the record: create never returned
                record_path(out / BATCHES_DIR, rec.local_id).unlink()
                return BatchRecords(out)
            model[rec.local_id] = {"state": "planned", "ids": ids, "pid": None}
        return records
    if not model:
        return records
    local_id = sorted(model)[n % len(model)]
    m = model[local_id]
    expected = _expected(m["state"], op, status, m["pid"] is not None)
    pid = m["pid"] or f"p-{local_id}"
    moves = {"submit": lambda: records.mark_submitted(local_id, info(pid, status)),
             "status": lambda: records.mark_status(local_id, info(pid, status)),
             "collect": lambda: records.mark_collected(local_id, lines=len(m["ids"])),
             "abandon": lambda: records.mark_abandoned(local_id, "test")}
    if expected is None:
        with pytest.raises(ValueError):
            moves[op]()
        return records
    moves[op]()
    m["state"] = expected
    if op == "submit":
        m["pid"] = pid
    return records
