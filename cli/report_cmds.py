"""`report`: the summary of an event log."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dynvm_trace import exitcodes
from dynvm_trace.environment import Environment
from dynvm_trace.logfile import LogReader
from dynvm_trace.compare import compare_counters, render_rows
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


DEFAULT_LABELS = ("slice merge cnt", "slice new insert cnt", "insert sd tree ok cnt",
                  "delete merge page cnt", "delete sd tree ok cnt", "slice alloc cnt",
                  "virt page merge count", "virt page merge count err", "page recycle count")


@click.command()
@click.argument("real", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("emulated", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--label", "labels", multiple=True,
              help=f"a pone_info counter to compare (repeat; default: {', '.join(DEFAULT_LABELS)})")
@click.option("--offset", type=float, default=0.0, show_default=True,
              help="seconds to subtract from the real log's clock to get the emulated one")
@click.pass_obj
def compare(env: Environment, real: Path, emulated: Path, labels: tuple[str, ...], offset: float) -> int:
    """Compare the counters of a real log (e.g. an imported recording) with an emulated run's,
    snapshot by snapshot. Exit 1 (FAILURE) unless every label matches."""
    rows = compare_counters(LogReader(real, env.warn), LogReader(emulated, env.warn),
                            labels or DEFAULT_LABELS, offset_ns=int(offset * 1e9))
    env.out(render_rows(rows))
    return exitcodes.OK if all(r.verdict == "matches" for r in rows) else exitcodes.FAILURE
