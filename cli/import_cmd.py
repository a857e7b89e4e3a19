"""`import`: a text recording of a real patched kernel as a counters-only event log."""

from __future__ import annotations

from pathlib import Path

import click

from dynvm_trace import exitcodes
from dynvm_trace.environment import Environment
from dynvm_trace.recordings import recording_to_log


@click.command("import")
@click.argument("recording", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the event log to write (.jsonl, or .jsonl.gz to compress)")
@click.pass_obj
def import_recording(env: Environment, recording: Path, output: Path) -> int:
    """Turn a recording of pone_info samples (`--- pone_info @ uptime T` sections, or
    `PPR[t]: INFO` lines; the format is detected) into a counters-only event log."""
    if output.exists() and recording.exists() and output.resolve() == recording.resolve():
        raise click.BadParameter("would overwrite the recording", param_hint="-o/--output")
    rec = recording_to_log(recording, output)
    groups = sorted({r["group"] for r in rec.records()})
    env.note(f"wrote {len(rec.snapshots):,} snapshots ({len(rec.records()):,} counters records: "
             f"{', '.join(groups)}; clock {rec.clock}) from the {rec.format} recording "
             f"{recording} to {output}")
    return exitcodes.OK
