"""Shared fixtures: a simulator factory, job-file writers and a CLI runner.

Every test talks HTTP to the project's own simulator on 127.0.0.1; nothing
here mocks batch or aiohttp.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from batch.sim import SimConfig, SimThread

ROOT = Path(__file__).resolve().parent.parent
PROVIDER_KEYS = ("OPENROUTER_API_KEY", "OPENAI_API_KEY", "SIM_API_KEY")
TEST_KEY = "sk-test-DO-NOT-LEAK-4f1c9a"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a real provider key from the developer's shell."""
    for name in PROVIDER_KEYS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def sim_factory() -> Iterator[Callable[..., SimThread]]:
    """Start simulators (each on its own thread and port); all are closed at teardown."""
    started: list[SimThread] = []

    def start(**config: Any) -> SimThread:
        s = SimThread(SimConfig(**config))
        s.__enter__()
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


@pytest.fixture
def sim(sim_factory: Callable[..., SimThread]) -> SimThread:
    return sim_factory()


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return orjson.dumps(v).decode()  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{orjson.dumps(k).decode()} = {toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def write_job(
    tmp: Path,
    *,
    input_path: Path,
    base_url: str | None = None,
    models: list[dict[str, Any]] | None = None,
    input: dict[str, Any] | None = None,
    request: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
    output: dict[str, Any] | None = None,
    sim: dict[str, Any] | None = None,
    api_key_env: str | None = None,
    name: str = "job.toml",
    extra: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """A job file whose provider 'local' points at ``base_url`` (a test's simulator)."""
    sections: list[str] = []

    def table(header: str, values: dict[str, Any]) -> None:
        sections.append(f"[{header}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))

    inp = {"path": str(input_path), "id_column": "id", "template": "Say {text}", **(input or {})}
    table("input", {k: v for k, v in inp.items() if v is not None})  # None drops a default key
    table("output", {"path": str(tmp / "out"), **(output or {})})
    table("request", request if request is not None else {"temperature": 0, "max_tokens": 8})
    for m in models or [{"provider": "local", "model": "openai/gpt-4.1-mini"}]:
        sections.append("[[models]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in m.items()))
    if base_url is not None:
        prov = {"base_url": base_url}
        if api_key_env:
            prov["api_key_env"] = api_key_env
        table("providers.local", prov)
    table("run", {"concurrency": 16, "backoff_base_seconds": 0.01, "backoff_max_seconds": 0.2, **(run or {})})
    if sim:
        table("sim", sim)
    for header, values in (extra or {}).items():
        table(header, values)
    path = tmp / name
    path.write_text("\n".join(sections))
    return path


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m batch ARGS`` as a user would run it; bounded in time."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "batch", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def assert_secret_nowhere(secret: str, out_dir: Path, *texts: str) -> None:
    """``secret`` is in none of ``texts`` and in no file under ``out_dir``: Parquet files are decoded
    (their pages are compressed, so a byte search would prove nothing), other files read as bytes."""
    import pyarrow.parquet as pq

    for text in texts:
        assert secret not in text
    for path in out_dir.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            data = orjson.dumps(pq.read_table(path).to_pylist(), default=str)
        else:
            data = path.read_bytes()
        assert secret.encode() not in data, path
