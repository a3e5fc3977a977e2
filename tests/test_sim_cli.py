"""`batch sim`'s flags and a job's [sim] table: both are SimConfig's fields, and both work."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from batch.cli import _parser
from batch.errors import JobError
from batch.job import SIM_KEYS, load_job
from batch.sim_config import SimConfig
from batch.sim_knobs import knobs
from tests.conftest import ROOT, run_cli, write_job, write_jsonl

FIELDS = {f.name for f in fields(SimConfig)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(base: str, model: str, prompt: str) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(base + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class TestStandalone:
    def test_flags_make_a_retired_model_a_fault_and_a_limit(self) -> None:
        """`batch sim` started with --retired (comma list), --fault and a request limit answers 404, 500, 429."""
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "batch", "sim", "--port", str(port), "--retired", "vendor/old,openai/gpt-3.5-turbo",
             "--fault", "500=1.0", "--requests-per-minute", "3", "--rate-limit-style", "bare"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert "listening" in proc.stdout.readline()
            base = f"http://127.0.0.1:{port}/v1"
            status, body = post(base, "openai/gpt-3.5-turbo", "a")
            assert status == 404 and "model_deprecated" in json.dumps(body)
            assert post(base, "vendor/old", "b")[0] == 404
            assert post(base, "vendor/new", "c")[0] == 500  # --fault 500=1.0
            assert post(base, "vendor/new", "d")[0] == 429  # the fourth request in the minute, over 3 rpm
        finally:
            proc.terminate()
            proc.wait(timeout=10)

    def test_a_bad_flag_value_names_the_flag(self) -> None:
        """An unknown fault kind or a malformed table entry is exit 2 with the flag's name, nothing served."""
        proc = run_cli("sim", "--port", "1", "--fault", "5OO=0.1", timeout=30)
        assert proc.returncode == 2 and "--fault" in proc.stderr and "500" in proc.stderr
        proc = run_cli("sim", "--port", "1", "--down", "openai/gpt-3.5-turbo", timeout=30)
        assert proc.returncode == 2 and "--down" in proc.stderr and "KEY=VALUE" in proc.stderr


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


class TestOnePlace:
    def test_sim_table_keys_and_flags_are_simconfigs_fields(self) -> None:
        """[sim] accepts exactly SimConfig's fields, `batch sim` has a flag for each, each with help text."""
        assert set(SIM_KEYS) == FIELDS
        sim = _subparsers(_parser())["sim"]
        dests = {a.dest for a in sim._actions} - {"help", "port"}
        assert dests == FIELDS
        assert all(k.help for k in knobs()), [k.name for k in knobs() if not k.help]

    def test_sim_table_takes_every_knob_with_its_type(self, tmp_path: Path) -> None:
        """Knobs that were SimConfig-only (echo_key, limit_windows, odd_replies, batch_*) load from [sim];
        a value of the wrong type names its key."""
        data = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "x"}])
        sim = {"echo_key": "masked", "limit_windows": [1], "odd_replies": {"content_parts": 0.1},
               "batch_price_factor": 0.25, "schedule": {"*": ["429:0.5", "ok"]}, "report_cost": False}
        job = load_job(write_job(tmp_path, input_path=data, models=[{"provider": "sim", "model": "m"}], sim=sim))
        config = SimConfig.from_options(job.sim.options)
        assert (config.echo_key, config.limit_windows, config.odd_replies, config.batch_price_factor,
                config.schedule, config.report_cost) == ("masked", (1.0,), {"content_parts": 0.1}, 0.25,
                                                         {"*": ["429:0.5", "ok"]}, False)
        bad = write_job(tmp_path, input_path=data, models=[{"provider": "sim", "model": "m"}], name="bad.toml",
                        sim={"limit_windows": "1", "echo_key": "loud"})
        with pytest.raises(JobError, match=r"sim\.limit_windows: expected a list of numbers"):
            load_job(bad)


class TestHelp:
    def test_version(self) -> None:
        """`batch --version` prints the installed package's version."""
        proc = run_cli("--version", timeout=30)
        assert proc.returncode == 0 and proc.stdout.strip() == f"batch {version('batch')}"

    def test_every_positional_and_json_flag_has_help(self) -> None:
        """Every subcommand's positional arguments and --json say what they are."""
        for name, sub in _subparsers(_parser()).items():
            for action in sub._actions:
                if not action.option_strings or "--json" in action.option_strings:
                    assert action.help, f"batch {name}: {action.dest} has no help"
