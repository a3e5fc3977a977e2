"""The Python API (batch.load_job, run, run_async): the README's examples run as written, in a script and
inside a running event loop as in a notebook."""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

import batch
from tests.conftest import ROOT, write_job, write_jsonl


def readme_examples(section: str = "## Python API") -> list[str]:
    """The ```python blocks of one README section, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


async def run_cell(source: str, namespace: dict[str, Any]) -> None:
    """Run ``source`` as a notebook cell: top-level await allowed, on the event loop that is running."""
    code = compile(source, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if inspect.iscoroutine(result):
        await result


@pytest.fixture
def demo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of jobs/ to run the README's examples in (demo.toml writes to ../out/demo, here in tmp_path)."""
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


class TestReadme:
    def test_script_example_runs(self, demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The README's first Python API example runs the demo job on the simulator and reads every row back."""
        script, _ = readme_examples()
        namespace: dict[str, Any] = {}
        exec(compile(script, "README.md", "exec"), namespace)
        summary, results = namespace["summary"], namespace["results"]
        assert summary.exit_code == 0 and summary.rows_ok == 300 and summary.rows_this_run_ok == 300
        assert len(results) == 300 and (results["status"] == "ok").all()
        assert summary.out_dir == demo_dir / "out" / "demo"
        assert capsys.readouterr().out.startswith("0 300 0 $")

    def test_notebook_cell_runs_in_a_running_loop(self, demo_dir: Path) -> None:
        """The README's notebook cell runs on a running event loop, as in Jupyter: it awaits run_async with
        quiet=True, then calls batch.run in the same loop."""
        script, cell = readme_examples()
        namespace: dict[str, Any] = {}
        exec(compile(script.split("summary = ")[0], "README.md", "exec"), namespace)  # import and load_job
        asyncio.run(run_cell(cell, namespace))
        summary, again = namespace["summary"], namespace["again"]
        assert summary.exit_code == 0 and summary.rows_this_run == 300
        assert again.exit_code == 0 and again.rows_this_run == 0 and again.rows_skipped == 300


class TestOptions:
    def test_run_and_run_async_take_the_same_keywords(self, tmp_path: Path, sim: Any) -> None:
        """Inside a running loop, batch.run and await batch.run_async accept the same options and refuse
        the same unknown one."""
        data = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": f"row {i}"} for i in range(20)])
        job = batch.load_job(write_job(tmp_path, input_path=data, base_url=sim.base_url))

        async def cell() -> tuple[batch.Summary, batch.Summary]:
            first = batch.run(job, quiet=True, limit=5)
            second = await batch.run_async(job, quiet=True, limit=5)
            refused = "unknown run option.*quit.*known: .*quiet"
            with pytest.raises(TypeError, match=refused):
                batch.run(job, quit=True)
            with pytest.raises(TypeError, match=refused):
                await batch.run_async(job, quit=True)
            return first, second

        first, second = asyncio.run(cell())
        assert (first.rows_this_run_ok, first.rows_left) == (5, 15)
        assert (second.rows_this_run_ok, second.rows_skipped, second.rows_left) == (5, 5, 10)
