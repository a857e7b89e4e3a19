"""`top`: the live view (rates, totals, per-VM table, agreement with the counters), then the
report of what it saw."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dynvm_trace import exitcodes
from dynvm_trace.aggregators import Aggregates
from dynvm_trace.environment import Environment
from dynvm_trace.events import MERGE_KINDS, RECLAIM_KINDS
from dynvm_trace.logfile import LogWriter
from dynvm_trace.pipeline import drive, stop_on_sigint
from dynvm_trace.report import aggregates_for, fmt_bytes, render_text, summary_of
from dynvm_trace.sources.base import Batch
from dynvm_trace.sources.select import SourceOptions, open_source

from .options import roots_options, source_options, timing_options

NS = 1_000_000_000
RATE_KINDS = MERGE_KINDS + RECLAIM_KINDS


def _rates_table(agg: Aggregates) -> Table:
    last = agg.interval() or {"events_per_s": {}, "pages_per_s": {}}
    totals = agg.totals.snapshot()
    table = Table("event", "events/s", "pages/s", "total events", "total pages", box=None, pad_edge=False)
    for kind in RATE_KINDS:
        pages = totals["pages"].get(kind)
        table.add_row(kind, f"{last['events_per_s'].get(kind, 0):,.1f}",
                      f"{last['pages_per_s'].get(kind, 0):,.1f}",
                      f"{totals['events'].get(kind, 0):,}", "-" if pages is None else f"{pages:,}")
    return table


def _vm_table(agg: Aggregates, limit: int = 20) -> Table:
    table = Table("vm", "merges", "cow breaks", "shared now", "saved", "released", "refaulted",
                  "reclaimed", box=None, pad_edge=False)
    for row in agg.per_vm.table()[:limit]:
        table.add_row(row["vm"], f"{row['merges']:,}", f"{row['cow_breaks']:,}",
                      f"{row['shared_pages']:,}", fmt_bytes(row["saved_bytes"]), f"{row['released']:,}",
                      f"{row['refaulted']:,}", fmt_bytes(row["reclaimed_bytes"]))
    return table


def _status_line(agg: Aggregates, why: str, now: int | None) -> str:
    secs = 0.0 if now is None or agg.first_ts is None else (now - agg.first_ts) / NS
    corr = agg.correlation
    lost = agg.totals.snapshot()["lost"]
    return f"{why} | {secs:,.1f} s | counters vs events: {corr.verdict} | lost events: {lost:,}"


def _screen(agg: Aggregates, why: str, now: int | None) -> Group:
    return Group(Text(_status_line(agg, why, now)), _rates_table(agg), Text(""), _vm_table(agg))


def _plain_line(agg: Aggregates, now: int) -> str:
    """One line an interval for a terminal-less run (a pipe, a log file, CI)."""
    last = agg.interval() or {"events_per_s": {}}
    totals = agg.totals.snapshot()["events"]
    rates = " ".join(f"{k} {last['events_per_s'].get(k, 0):,.0f}/s" for k in RATE_KINDS
                     if totals.get(k))
    secs = (now - agg.first_ts) / NS if agg.first_ts is not None else 0.0
    return (f"{secs:9.1f} s  {rates or 'no events yet'} | merges {totals.get('merge', 0):,} "
            f"cow {totals.get('cow_break', 0):,} | counters vs events: {agg.correlation.verdict}")


@click.command()
@source_options(default_speed="1")
@timing_options()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="also record everything to this event log")
@click.option("--no-report", is_flag=True, help="do not print the report at the end")
@roots_options
@click.pass_obj
def top(env: Environment, source_opts: SourceOptions, interval: float, duration: float | None,
        output: Path | None, no_report: bool) -> int:
    """Live view: event rates, totals, per-VM table, agreement with the kernel's counters.
    Ends after --duration (or Ctrl-C), then prints the report of what it saw."""
    # top aggregates in the kernel; the per-event stream only when recording too (-o)
    source_opts = dataclasses.replace(source_opts, stream=output is not None)
    source, why = open_source(source_opts, env.roots, env.warn)
    env.note(why)
    header = source.header()
    agg = aggregates_for(header, int(interval * NS))
    writer = LogWriter(output, header) if output else None
    state = {"now": None}

    def feed(batch: Batch) -> None:
        if writer:
            writer.write(batch.records)
        agg.feed(batch.records, batch.now)
        state["now"] = batch.now

    short_why = why.split(" (")[0]
    try:
        with stop_on_sigint(source):
            if env.stdout_isatty:
                with Live(_screen(agg, short_why, None), console=env.console, auto_refresh=False) as live:
                    def show(batch: Batch) -> None:
                        live.update(_screen(agg, short_why, batch.now), refresh=True)
                    drive(source, int(interval * NS), _ns(duration), [feed, show])
            else:
                drive(source, int(interval * NS), _ns(duration),
                      [feed, lambda batch: env.out(_plain_line(agg, batch.now))])
    finally:
        source.close()
        if writer:
            writer.close()
    if not no_report:
        env.out("")
        env.stdout.write(render_text(summary_of(header, agg)))
    return exitcodes.OK


def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * NS)
