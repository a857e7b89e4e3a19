"""A real recording next to an emulated run: counter by counter, sample by sample.

For each snapshot of the real log (group pone_info unless told), the emulated log's value is
its last snapshot of the same group at or before the same time, after mapping the real clock
onto the emulated one:

    emulated ts = real ts - offset_ns

The shipped run1 scenario runs on the recorded machine's uptime clock (its VM starts at 11.0 s
and fills at 11.5 s, where the recording's workload did: scenarios/run1.toml), so real run1
and emulated run1 line up with offset 0, the default. A scenario written to start at 0 where a
recording starts at uptime U is compared with offset_ns=U.

The difference is emulated - real. A label "matches" when every compared snapshot is equal;
otherwise its verdict names the worst (largest absolute) difference, or the first snapshot the
emulated log had nothing for.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .logfile import LogReader

MATCHES = "matches"
NS = 1_000_000_000

LogLike = str | os.PathLike | LogReader | tuple[dict[str, Any], Iterable[list[dict[str, Any]]]]


@dataclass(frozen=True)
class Point:
    """One real snapshot and what the emulated run said at the same time."""

    real_ts: int  # on the real log's clock
    emulated_ts: int | None  # the emulated snapshot used (on its clock); None: none at or before
    real: int | None  # None: the real snapshot lacks the label
    emulated: int | None  # None: no emulated snapshot, or it lacks the label

    @property
    def difference(self) -> int | None:
        """emulated - real; None when either is missing."""
        if self.real is None or self.emulated is None:
            return None
        return self.emulated - self.real

    @property
    def matches(self) -> bool:
        return self.real is not None and self.real == self.emulated


@dataclass(frozen=True)
class Row:
    """One label over every real snapshot."""

    label: str
    points: tuple[Point, ...]

    @property
    def matches(self) -> bool:
        return bool(self.points) and all(p.matches for p in self.points)

    @property
    def worst(self) -> Point | None:
        """The first point with a missing value, else the one with the largest |difference|
        (the earliest of equals); None when every point matches."""
        if self.matches:
            return None
        missing = [p for p in self.points if p.difference is None]
        if missing:
            return missing[0]
        return max(self.points, key=lambda p: abs(p.difference or 0))

    @property
    def verdict(self) -> str:
        if not self.points:
            return "no real snapshots"
        w = self.worst
        if w is None:
            return MATCHES
        ts = f"ts {w.real_ts / NS:,.2f} s"
        at = f"at {ts}"
        if w.real is None:
            return f"missing from the real snapshot {at}"
        if w.emulated_ts is None:
            return f"no emulated snapshot at or before {ts}"
        if w.emulated is None:
            return f"missing from the emulated snapshot {at}"
        return f"worst difference {w.difference:+,} {at} (real {w.real:,}, emulated {w.emulated:,})"


def snapshots(log: LogLike, group: str = "pone_info") -> list[tuple[int, dict[str, Any]]]:
    """(ts, values) of every counters record of `group`, in log order."""
    if isinstance(log, tuple):
        batches = log[1]
    else:
        reader = log if isinstance(log, LogReader) else LogReader(log)
        batches = reader.batches()
    return [(r["ts"], r["values"]) for batch in batches for r in batch
            if r.get("kind") == "counters" and r.get("group") == group]


def compare_counters(real_log: LogLike, emulated_log: LogLike, labels: Sequence[str],
                     group: str = "pone_info", offset_ns: int = 0) -> list[Row]:
    """One Row per label (in the order given): the real log's snapshots of `group` against the
    emulated log's at emulated ts = real ts - offset_ns. Logs are paths, LogReaders or
    (header, batches) pairs."""
    real = snapshots(real_log, group)
    emulated = snapshots(emulated_log, group)
    emulated_ts = [ts for ts, _ in emulated]
    if any(b < a for a, b in zip(emulated_ts, emulated_ts[1:])):
        raise ValueError("the emulated log's snapshots are not in time order")
    # for every real snapshot: the index of the emulated one at or before it (-1: none)
    at = [bisect_right(emulated_ts, ts - offset_ns) - 1 for ts, _ in real]
    rows = []
    for label in labels:
        points = []
        for (ts, values), i in zip(real, at):
            emu_ts, emu_values = emulated[i] if i >= 0 else (None, {})
            points.append(Point(ts, emu_ts, _count(values.get(label)),
                                _count(emu_values.get(label))))
        rows.append(Row(label, tuple(points)))
    return rows


def _count(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def render_rows(rows: Sequence[Row]) -> str:
    """A plain-text table: one line per label with its verdict."""
    width = max((len(r.label) for r in rows), default=5)
    lines = [f"{'label':<{width}}  {'snapshots':>9}  verdict"]
    lines += [f"{r.label:<{width}}  {len(r.points):>9,}  {r.verdict}" for r in rows]
    return "\n".join(lines)
