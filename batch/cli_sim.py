"""``batch sim``: the simulator on its own, for someone else's client or CI; every knob of a
job's ``[sim]`` table is a flag (batch/sim_knobs.py derives both from ``SimConfig``)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from batch.errors import JobError
from batch.sim_knobs import add_flags, config_from_flags


def add_sim_parser(sub: Any) -> None:
    """The ``sim`` subcommand on the CLI's subparsers."""
    m = sub.add_parser("sim", help="run the OpenAI-compatible simulator on 127.0.0.1",
                       description="Run the OpenAI-compatible simulator on 127.0.0.1. Every key of a job's [sim] "
                       "table is a flag: tables as repeatable KEY=VALUE (--fault 500=0.05, --down MODEL=SECONDS, "
                       "--schedule '*=429:0.5,ok'), lists repeatable or comma-separated (--retired a,b).")
    m.add_argument("--port", type=int, default=8765, help="the port to listen on (default: 8765)")
    add_flags(m)


def run_sim(args: argparse.Namespace) -> int:
    from batch.sim import serve

    try:
        config = config_from_flags(args)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    try:
        asyncio.run(serve(config, args.port))
    except KeyboardInterrupt:
        pass
    return 0
