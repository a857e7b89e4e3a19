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
from dynvm_trace.log_spool import SpooledLogWriter
from dynvm_trace.pipeline import drive, stop_on_sigint
from dynvm_trace.alerts import interleave
from dynvm_trace.report import aggregates_for, alert_line, fmt_bytes, render_text, summary_of
from dynvm_trace.sources.base import Batch
from dynvm_trace.sources.select import SourceOptions, open_source

from .tables import table
from .options import roots_options, source_options, timing_options

NS = 1_000_000_000
RATE_KINDS = MERGE_KINDS + RECLAIM_KINDS


def _rates_table(agg: Aggregates) -> Table:
    last = agg.interval() or {"events_per_s": {}, "pages_per_s": {}}
    totals = agg.totals.snapshot()
    t = table("event", "events/s", "pages/s", "total events", "total pages")
    for kind in RATE_KINDS:
        pages = totals["pages"].get(kind)
        t.add_row(kind, f"{last['events_per_s'].get(kind, 0):,.1f}",
                      f"{last['pages_per_s'].get(kind, 0):,.1f}",
                      f"{totals['events'].get(kind, 0):,}", "-" if pages is None else f"{pages:,}")
    return t


def _vm_table(agg: Aggregates, limit: int = 20) -> Table:
    t = table("vm", "merges", "cow breaks", "shared now", "saved", "released", "refaulted",
              "reclaimed")
    for row in agg.per_vm.table()[:limit]:
        t.add_row(row["vm"], f"{row['merges']:,}", f"{row['cow_breaks']:,}",
                      f"{row['shared_pages']:,}", fmt_bytes(row["saved_bytes"]), f"{row['released']:,}",
                      f"{row['refaulted']:,}", fmt_bytes(row["reclaimed_bytes"]))
    return t


def _status_line(agg: Aggregates, why: str, now: int | None) -> str:
    secs = 0.0 if now is None or agg.first_ts is None else (now - agg.first_ts) / NS
    corr = agg.correlation
    lost = agg.totals.snapshot()["lost"]
    rows = agg.per_vm.table()
    saved = sum(r["saved_bytes"] for r in rows)
    reclaimed = sum(r["reclaimed_bytes"] for r in rows)
    return (f"{why} | {secs:,.1f} s | saved by merging {fmt_bytes(saved)} | reclaimed "
            f"{fmt_bytes(reclaimed)} | counters vs events: {corr.verdict} | lost events: {lost:,}")


def _alerts_text(agg: Aggregates, limit: int = 8) -> Text:
    """The alerts raised so far (failures of the kernel itself), under the tables."""
    alerts = agg.alerts.snapshot() if hasattr(agg, "alerts") else []
    if not alerts:
        return Text("alerts: none")
    lines = [f"ALERTS ({len(alerts):,})"]
    for a in alerts[:limit]:
        lines.append(f"! {alert_line(a)}")
        lines.append(f"  {a.get('message', '')}")
    if len(alerts) > limit:
        lines.append(f"  ... {len(alerts) - limit:,} more in the report")
    return Text("\n".join(lines), style="bold red")


def _screen(agg: Aggregates, why: str, now: int | None) -> Group:
    return Group(Text(_status_line(agg, why, now)), _rates_table(agg), Text(""), _vm_table(agg),
                 Text(""), _alerts_text(agg))


def _plain_line(agg: Aggregates, final: bool = False) -> str | None:
    """One line per completed interval, for a run without a terminal (a pipe, a file, CI);
    None while the interval has not completed (a big scan arrives in several batches). The
    final line (at the end of the run) gives the totals and the verdict at the last record."""
    last = agg.interval()
    if final:
        if agg.last_ts is None:
            return None
        rates, end = "end", (agg.last_ts - agg.first_ts) / NS
    elif last is None:
        return None
    else:
        per_s = last["pages_per_s"]  # pages: one per merge-kind event, `pages` of reclaim events
        rates = " ".join(f"{k} {per_s[k]:,.0f}" + (" pages/s" if k in RECLAIM_KINDS else "/s")
                         for k in RATE_KINDS if per_s.get(k)) or "no merge or reclaim events"
        end = (last["end_ns"] - agg.first_ts) / NS
    totals = agg.totals.snapshot()["events"]
    return (f"{end:9.1f} s  {rates} | merges "
            f"{totals.get('merge', 0):,} cow {totals.get('cow_break', 0):,} | "
            f"counters vs events: {agg.correlation.verdict}")


class PlainLines:
    """Prints _plain_line once per completed interval, and a final line at the end."""

    def __init__(self, env: Environment, agg: Aggregates):
        self.env, self.agg, self.shown = env, agg, None

    def __call__(self, batch: Batch) -> None:
        last = self.agg.interval()
        if last is not None and last["index"] != self.shown:
            self.shown = last["index"]
            self.env.out(_plain_line(self.agg))

    def finish(self) -> None:
        line = _plain_line(self.agg, final=True)
        if line is not None:
            self.env.out(line)


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
    writer = SpooledLogWriter(output, header) if output else None

    def feed(batch: Batch) -> None:
        raised = agg.feed(batch.records, batch.now)  # aggregates and alerts
        if writer:
            writer.write(interleave(batch.dict_records, raised), batch.columns)
            writer.flush()
        if raised and not env.stdout_isatty:
            for a in raised:
                env.out(f"alert: {alert_line(a)}: {a['message']}")

    short_why = why.split(" (")[0]
    try:
        with stop_on_sigint(source):
            if env.stdout_isatty:
                with Live(_screen(agg, short_why, None), console=env.console, auto_refresh=False) as live:
                    def show(batch: Batch) -> None:
                        live.update(_screen(agg, short_why, batch.now), refresh=True)
                    drive(source, int(interval * NS), _ns(duration), [feed, show])
            else:
                lines = PlainLines(env, agg)
                drive(source, int(interval * NS), _ns(duration), [feed, lines])
                lines.finish()
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
