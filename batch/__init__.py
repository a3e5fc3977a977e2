"""batch: push many LLM chat completions through OpenAI-compatible APIs at the
rate limit, exactly once per row, with usage and cost accounting.

Python API (the CLI is a thin layer over it)::

    import batch
    job = batch.load_job("jobs/demo.toml")
    summary = batch.run(job)            # or: await batch.run_async(job) (a notebook: see README, Python API)
    print(summary.exit_code, summary.usage.cost_usd)
"""

from batch.errors import BatchError, InputError, JobError, OutputError
from batch.job import Job, load_job
from batch.runner import RunOptions, Summary, run, run_async

__all__ = ["BatchError", "InputError", "Job", "JobError", "OutputError", "RunOptions", "Summary", "load_job", "run",
           "run_async"]
__version__ = "0.1.0"
