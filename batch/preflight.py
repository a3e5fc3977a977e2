"""Everything that stops a run before anything is sent: one list, which ``batch validate`` prints and
``batch run`` raises (exit 2).

::

    what                                        found by                    run checks it
    the job file (keys, types, [request] names)  job.load_job                when the job is loaded
    a provider's key missing from the environment setup_problems              before reading the input
    cache = "replay" without a cache file         setup_problems              before reading the input
    the input (lines, ids, columns, fields)       plan.ScanReport.blocking    after the scan
    an output another batch process holds         lock.holder                 when it takes the lock
    an output made by a different job             output.output_problem       under the output's lock

``batch validate`` collects them all at once (``blocking``); ``batch run``
checks them in the order above, so a missing key is said before a long scan.
Two checks need the providers' model list and are made by ``run`` only, when
``run.check_models`` asks for it: models the provider does not have, and
live prices for a cost cap.
"""

from __future__ import annotations

from batch.cache import default_cache_path, replay_problem
from batch.errors import JobError
from batch.job import Job
from batch.lock import holder, in_use
from batch.output import output_problem
from batch.plan import ScanReport
from batch.provider import missing_key


def setup_problems(job: Job) -> list[str]:
    """What is missing around the job, found without reading its input: keys, the cache a replay needs."""
    problems = []
    if job.run.cache == "replay":  # nothing is sent, so no key is needed
        if problem := replay_problem(job.run.cache_path or default_cache_path()):
            problems.append(problem)
        return problems
    for name in dict.fromkeys(m.provider for m in job.models):  # each provider once, in chain order
        spec = job.providers[name]
        if problem := missing_key(spec.name, spec.api_key_env):
            problems.append(problem)
    return problems


def check_setup(job: Job) -> None:
    """Raise JobError (exit 2) naming every setup problem, before anything is read or sent."""
    if problems := setup_problems(job):
        raise JobError("\n  ".join(problems))


def blocking(job: Job, report: ScanReport) -> list[str]:
    """Every problem that stops ``batch run`` of this job (without --force or --fresh), from one scan."""
    problems = [*setup_problems(job), *report.blocking(job.run.on_bad_row)]
    if (who := holder(job.output.path)) is not None:
        problems.append(in_use(job.output.path, who, "batch run would send nothing"))
    if problem := output_problem(job, force=False):
        problems.append(problem)
    return problems
