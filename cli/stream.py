"""Commands that stream a source's records somewhere: record (a log), trace (the terminal),
emulate (the emulated host, to a log and/or an emulated sysfs tree)."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import click

from dynvm_trace import exitcodes, jsonio
from dynvm_trace.alerts import Alerts, interleave
from dynvm_trace.environment import Environment
from dynvm_trace.log_spool import SpooledLogWriter
from dynvm_trace.pipeline import drive, stop_on_sigint
from dynvm_trace.sources.base import Batch, Source
from dynvm_trace.sources.select import SourceOptions, open_source

from .options import roots_options, source_options, timing_options

NS = 1_000_000_000
LIVE_SOURCES = ("ksm", "pone")  # record's --nice applies to these: they share the host's CPUs


class Progress:
    """Counts records by kind; shows a progress line at most once a wall second, and at the end."""

    def __init__(self, env: Environment, label: str, start: int):
        self.env, self.label = env, label
        self.kinds: Counter[str] = Counter()
        self.lost = 0
        self.start = self.now = start  # source time at the start (the header's anchor)
        self._shown = 0.0

    def __call__(self, batch: Batch) -> None:
        self.kinds.update(batch.kind_counts())
        self.lost += sum(r["count"] for r in batch.dict_records if r["kind"] == "lost")
        self.now = batch.now
        if time.monotonic() - self._shown >= 1.0:
            self._shown = time.monotonic()
            self._show(final=False)

    def line(self) -> str:
        events = sum(n for k, n in self.kinds.items() if k != "counters")
        kinds = " ".join(f"{k} {n:,}" for k, n in sorted(self.kinds.items()) if k not in ("counters", "lost"))
        secs = (self.now - self.start) / NS
        return (f"{self.label}: {secs:,.1f} s, {events:,} events" + (f" ({kinds})" if kinds else "")
                + f", {self.kinds['counters']:,} counter snapshots, {self.lost:,} lost")

    def _show(self, final: bool) -> None:
        if self.env.stderr.isatty() and not final:
            self.env.stderr.write("\r\x1b[K" + self.line())
            self.env.stderr.flush()
        elif final:
            self.env.stderr.write(("\r\x1b[K" if self.env.stderr.isatty() else "") + self.line() + "\n")

    def finish(self) -> None:
        self._show(final=True)


def run_to_log(env: Environment, source: Source, interval: float, duration: float | None,
               output: Path | None, label: str) -> int:
    """Drive a source into a log (if given) with a progress line; SIGINT ends it cleanly.
    The alerts derived from the stream (dynvm_trace.alerts) are written into the log as they
    are raised, and said on stderr. The log is encoded by a low-priority child process
    (dynvm_trace.log_spool), handed every interval: a killed recorder loses at most one."""
    header = source.header()
    progress = Progress(env, label, header["wall_anchor"]["ts"])
    writer = SpooledLogWriter(output, header) if output else None
    alerts = Alerts()

    def write(batch: Batch) -> None:
        raised = alerts.feed(batch.dict_records)  # column events (merges, COW breaks) raise none
        if writer:
            writer.write(interleave(batch.dict_records, raised), batch.columns)
            writer.flush()
        for a in raised:
            env.warn(alert_note(a))

    consumers = [write, progress]
    try:
        with stop_on_sigint(source) as interrupted:
            drive(source, int(interval * NS), None if duration is None else int(duration * NS), consumers)
    finally:
        source.close()
        if writer:
            writer.close()
        progress.finish()
    if writer:
        env.note(f"wrote {writer.records:,} records to {output}")
    if interrupted[0]:
        env.note("stopped by signal; the log is complete up to that point")
    return exitcodes.OK


@click.command()
@source_options(default_speed="max")
@timing_options()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the event log to write (.jsonl, or .jsonl.gz to compress)")
@click.option("--nice", type=click.IntRange(-20, 19), default=10, show_default=True,
              help="the recorder's CPU priority while it traces a live host (ksm, pone): the "
                   "traced workload keeps the CPU in a burst, and the kernel's ring buffer holds "
                   "what is not read yet (losses are counted); 0: normal priority")
@roots_options
@click.pass_obj
def record(env: Environment, source_opts: SourceOptions, interval: float, duration: float | None,
           output: Path, nice: int) -> int:
    """Record events and counter snapshots to an event log (stop with Ctrl-C)."""
    source, why = open_source(source_opts, env.roots, env.warn)
    env.note(why)
    if source.name in LIVE_SOURCES:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except PermissionError:
            source.close()
            raise PermissionError(f"--nice {nice}: a priority above the current one needs root "
                                  "(CAP_SYS_NICE)") from None
    return run_to_log(env, source, interval, duration, output, "recording")


@click.command()
@click.option("--scenario", default="demo", show_default=True, help="a shipped scenario name or a TOML file")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--speed", default="max", show_default=True,
              help="'max' (as fast as possible) or a factor of real time")
@click.option("--dialect", type=click.Choice(["guide", "virt_release"]),
              help="the pone sysfs dialect to emulate (default: the scenario's)")
@click.option("--sysfs-out", type=click.Path(file_okay=False, path_type=Path),
              help="keep the emulated /sys tree here (a sysfs root: DIR/kernel/mm/pone)")
@timing_options()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="write the event log here")
@click.option("--list", "list_only", is_flag=True, help="list the shipped scenarios and exit")
@click.pass_obj
def emulate(env: Environment, scenario: str, seed: int, speed: str, dialect: str | None,
            sysfs_out: Path | None, interval: float, duration: float | None, output: Path | None,
            list_only: bool) -> int:
    """Run the emulated pone host: VMs, a merge daemon, guest writes and frees."""
    from dynvm_trace.emulator.scenario import list_scenarios
    from dynvm_trace.sources.pacing import parse_speed
    if list_only:
        for name, description in list_scenarios():
            env.out(f"{name:<14} {description}")
        return exitcodes.OK
    try:
        pace = parse_speed(speed)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--speed") from None
    opts = SourceOptions(source="emulate", scenario=scenario, seed=seed, speed=pace, dialect=dialect,
                         emulated_sysfs=sysfs_out)
    source, _ = open_source(opts, env.roots)
    return run_to_log(env, source, interval, duration, output, "emulating")


def alert_note(a: dict) -> str:
    """The line said when an alert is raised."""
    from dynvm_trace.report import alert_subject
    return f"alert {a['alert']} ({alert_subject(a)}) at ts {a['ts']:,}: {a['message']}"


KEY_FIELDS = ("kind", "ts", "src", "pid", "comm", "vm")


def format_record(rec: dict) -> str:
    """One line of `trace` text: time, kind, who, then the kind's fields."""
    who = rec.get("vm") or (f"pid {rec['pid']}" if "pid" in rec else "host")
    if rec["kind"] == "counters":
        fields = f"group={rec['group']} ({len(rec['values'])} values)"
    else:
        fields = " ".join(f"{k}={_value(k, v)}" for k, v in rec.items() if k not in KEY_FIELDS)
    return f"{rec['ts'] / NS:14.6f} {rec['kind']:<16} {who:<16} {fields}".rstrip()


def _value(key: str, value) -> str:
    if key in ("addr", "pfn", "old_pfn", "new_pfn") and isinstance(value, int):
        return hex(value)
    return str(value)


@click.command()
@source_options(default_speed="1")
@timing_options()
@click.option("--json", "as_json", is_flag=True, help="JSON Lines, one record a line")
@click.option("--kind", "kinds", multiple=True, help="only these kinds (repeat the option)")
@roots_options
@click.pass_obj
def trace(env: Environment, source_opts: SourceOptions, interval: float, duration: float | None,
          as_json: bool, kinds: tuple[str, ...]) -> int:
    """Stream events as they happen: text, or JSON Lines with --json (alert records too,
    derived from the stream as they are raised)."""
    source, why = open_source(source_opts, env.roots, env.warn)
    env.note(why)
    wanted = set(kinds)
    out = env.stdout
    alerts = Alerts()

    def show(batch: Batch) -> None:
        every = interleave(batch.records, alerts.feed(batch.records))
        recs = [r for r in every if not wanted or r["kind"] in wanted]
        if as_json:
            out.write(jsonio.dumps_lines(recs).decode())
        else:
            out.write("".join(format_record(r) + "\n" for r in recs))
        out.flush()

    try:
        with stop_on_sigint(source):
            drive(source, int(interval * NS), None if duration is None else int(duration * NS), [show])
    except BrokenPipeError:  # `trace | head`: the reader has gone, which is fine
        pass
    finally:
        source.close()
    return exitcodes.OK
