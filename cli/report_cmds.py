"""`report`: the summary of an event log."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dynvm_trace import exitcodes
from dynvm_trace.environment import Environment
from dynvm_trace.logfile import LogReader
from dynvm_trace.report import render_text, summarize

from .options import json_option


@click.command()
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@click.option("--check", is_flag=True,
              help="exit with 1 (FAILURE) unless the events agree with the kernel's counters")
@click.pass_obj
def report(env: Environment, log: Path, as_json: bool, check: bool) -> int:
    """Summarise an event log: totals per kind, per VM, COW lifetimes, counters, correlation."""
    summary = summarize(LogReader(log, env.warn))
    if as_json:
        env.out(json.dumps(summary, indent=2))
    else:
        env.stdout.write(render_text(summary))
    if check and summary["correlation"]["verdict"] != "agrees":
        return exitcodes.FAILURE
    return exitcodes.OK
