"""batch report on outputs that are old, empty, damaged or still being written; ``--live``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.report_html import build_page
from batch.report_read import ATTEMPT_FIELDS, part_paths, read_dataset
from tests.conftest import ROOT, run_cli
from tests.synthetic_output import faulty_output


class TestOlderAndRunningOutputs:
    def test_without_attempt_log_the_report_says_what_is_missing(self, tmp_path: Path) -> None:
        """An output without attempts/ still reports summary, latency, errors and lanes, and says what is missing."""
        out = faulty_output(tmp_path / "out", lane_column=False).out
        shutil.rmtree(out / "attempts")
        page, data = build_page(out)
        assert not data["has_attempt_log"] and "timeline" not in data and "attempts" not in data
        assert any("no attempt log" in n for n in data["notes"])
        assert 'id="chart-latency"' in page and 'id="chart-throughput"' not in page
        assert page.count("needs the attempt log") == 3
        assert data["latency"]["source"] == "results" and data["rows"]["by_lane"] == {"online": {"ok": 49, "error": 1}}

    def test_empty_directory_gives_a_report_with_notes(self, tmp_path: Path) -> None:
        """An output directory with nothing in it yet (a run about to start) gives a page, not a traceback."""
        page, data = build_page(tmp_path)
        assert data["summary"]["rows"] == 0 and len(data["notes"]) == 4 and "</html>" in page

    def test_unreadable_part_is_skipped_with_a_note(self, tmp_path: Path) -> None:
        """A damaged part file becomes a note; the other parts are still read."""
        out = faulty_output(tmp_path / "out").out
        (out / "attempts" / "part-00004.parquet").write_bytes(b"PAR1 not really")
        _, data = build_page(out)
        assert any("part-00004.parquet: unreadable" in n for n in data["notes"])
        assert data["attempts"]["requests"] == 66

    def test_a_part_renamed_between_listing_and_reading_is_found_again(self, tmp_path: Path) -> None:
        """A listing gone stale (the part was rewritten under a new name) is taken once more; a part gone twice is a note."""
        out = faulty_output(tmp_path / "out").out
        attempts = out / "attempts"
        stale = part_paths(attempts)
        whole = pq.read_table(attempts).num_rows
        moved = pq.read_metadata(attempts / "part-00002.parquet").num_rows
        (attempts / "part-00002.parquet").rename(attempts / "part-00007.parquet")
        listings = iter([stale, part_paths(attempts)])
        notes: list[str] = []
        table = read_dataset(attempts, ATTEMPT_FIELDS, notes, list_parts=lambda d: next(listings))
        assert table is not None and table.num_rows == whole and notes == []
        table = read_dataset(attempts, ATTEMPT_FIELDS, notes, list_parts=lambda d: stale)
        assert table is not None and table.num_rows == whole - moved and "disappeared" in notes[0]

    def test_parts_rewritten_while_reporting_never_crash_it(self, tmp_path: Path) -> None:
        """While another thread keeps replacing and renaming parts atomically, reports keep coming out whole."""
        out = faulty_output(tmp_path / "out").out
        stop = threading.Event()

        def churn() -> None:
            n = 10
            while not stop.is_set():
                for part in part_paths(out / "results"):
                    table = pq.read_table(part)
                    tmp = part.with_name(f".{part.name}.tmp")
                    pq.write_table(table, tmp)
                    os.replace(tmp, part.with_name(f"part-{n:05d}.parquet"))
                    part.unlink()
                    n += 1

        writer = threading.Thread(target=churn)
        writer.start()
        try:
            for _ in range(5):
                _, data = build_page(out)
                assert data["summary"]["rows"] <= 50  # each id once, even when a part is seen twice
                assert all("disappeared" in n or "being redone" in n for n in data["notes"]), data["notes"]
        finally:
            stop.set()
            writer.join(timeout=10)

    def test_a_row_being_redone_counts_once_with_its_newest_answer(self, tmp_path: Path) -> None:
        """Between a redo's new part and the rewrite of the old one, the id counts once, with the newer row."""
        out = faulty_output(tmp_path / "out").out
        table = pq.read_table(out / "results")
        error_row = table.filter(pc.equal(table["status"], "error"))
        fixed = error_row.set_column(1, "status", pa.array(["ok"])).set_column(
            table.schema.get_field_index("error_type"), "error_type", pa.array([None], pa.string()))
        pq.write_table(fixed, out / "results" / "part-00009.parquet")
        _, data = build_page(out)
        assert data["rows"]["by_status"] == {"ok": 50} and data["summary"]["rows"] == 50
        assert any("1 rows were being redone" in n for n in data["notes"])


class TestLive:
    def test_live_stops_by_itself_once_the_run_has_ended(self, tmp_path: Path) -> None:
        """``--live`` on a finished output writes the page once, without the refresh, and exits."""
        out = faulty_output(tmp_path / "out").out
        proc = run_cli("report", str(out), "--live", "--every", "0.2", timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert 'http-equiv="refresh"' not in (out / "report.html").read_text()

    def test_live_rewrites_until_the_manifest_says_the_run_ended(self, tmp_path: Path) -> None:
        """While the last run is "running" the page refreshes itself; when it ends, the command stops."""
        out = faulty_output(tmp_path / "out").out
        manifest = orjson.loads((out / "manifest.json").read_bytes())
        manifest["runs"][-1].update(outcome="running", ended=None)
        (out / "manifest.json").write_bytes(orjson.dumps(manifest))
        proc = subprocess.Popen([sys.executable, "-m", "batch", "report", str(out), "--live", "--every", "0.3"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not (out / "report.html").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            first = (out / "report.html").read_text()
            assert '<meta http-equiv="refresh" content="1">' in first and "Live:" in first
            assert proc.poll() is None
            manifest["runs"][-1].update(outcome="completed", ended="2026-12-01T09:01:00+00:00")
            tmp = out / ".manifest.json.tmp"
            tmp.write_bytes(orjson.dumps(manifest))
            os.replace(tmp, out / "manifest.json")
            stdout, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0 and stdout.strip() == str(out / "report.html")
        assert 'http-equiv="refresh"' not in (out / "report.html").read_text()

