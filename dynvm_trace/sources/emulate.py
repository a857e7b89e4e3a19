"""The `emulate` source: an emulated pone host (dynvm_trace.emulator) as a stream of batches.

Runs in simulated time, as fast as it can (speed None / "max") or scaled to real time
(speed=1.0 is real time). Every batch ends with `counters` records: group `workers` (the pone
kernel threads alive, name -> pid, what the pone source polls from /proc), then pone_info (and,
for the guide dialect, pone_abstract) whose values are exactly what the events emitted so far add
up to; when a sysfs root is given, the emulated /sys/kernel/mm/pone tree is rewritten after
every batch with the same counters, and knob files changed by someone else are obeyed.

Batches are bounded: a scan or step that produces more than BATCH_LIMIT records is split into
several batches with the same `now`, each ending with its own counters record (whose `ts` is
that of the batch's last event, so `prev.ts < ts <= cur.ts` attributes every event to exactly
one counters interval).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..emulator.model import SRC, Chunk, Host
from ..emulator.scenario import DIALECTS, Scenario, ScenarioError, load_scenario
from ..logfile import make_header
from .base import Batch, Source
from .pacing import Pacer, parse_speed

BATCH_LIMIT = 65536


class EmulateSource(Source):
    name = "emulate"

    def __init__(self, scenario: Scenario | str | os.PathLike, seed: int = 1,
                 speed: float | str | None = None, dialect: str | None = None,
                 sysfs_root: str | os.PathLike | None = None):
        super().__init__()
        if not isinstance(scenario, Scenario):
            scenario = load_scenario(scenario)
        if dialect is not None and dialect not in DIALECTS:
            raise ScenarioError(scenario.source, "dialect",
                                f"unknown dialect {dialect!r} (one of {', '.join(DIALECTS)})")
        self.speed = parse_speed(speed) if isinstance(speed, str) else speed
        self.scenario = scenario
        self.seed = seed
        self.host = Host(scenario, seed, dialect)
        self.dialect = self.host.dialect
        self.tree = None
        if sysfs_root is not None:
            from ..emulator.sysfs_tree import EmulatedPoneTree
            self.tree = EmulatedPoneTree(Path(sysfs_root), self.dialect)
            self.host.knob_hook = self._sync_knobs
            self.tree.write(self.host.counters_snapshot(), self.host.knobs)
        self.pages_scanned = 0

    def header(self) -> dict[str, Any]:
        return make_header("emulate", clock="emulated", page_size=self.scenario.page_size,
                           anchor_ts=0, scenario=self.scenario.name, seed=self.seed,
                           dialect=self.dialect)

    def _sync_knobs(self, host: Host) -> None:
        if self.tree is not None:
            for name, value in self.tree.read_changed_knobs().items():
                host.set_knob(name, value)

    def _counters(self, ts: int, values: dict[str, int],
                  workers: dict[str, int]) -> list[dict[str, Any]]:
        recs = [{"kind": "counters", "ts": ts, "src": SRC, "group": "workers",
                 "values": dict(workers)},
                {"kind": "counters", "ts": ts, "src": SRC, "group": "pone_info",
                 "values": values}]
        if self.dialect == "guide":
            recs.append({"kind": "counters", "ts": ts, "src": SRC, "group": "pone_abstract",
                         "values": {"page merge count": values["slice merge cnt"]
                                    - values["delete merge page cnt"],
                                    "page reclaim count": values["page recycle count"]}})
        return recs

    def batches(self, interval_ns: int, duration_ns: int | None = None) -> Iterator[Batch]:
        if interval_ns <= 0:
            raise ValueError("interval_ns must be > 0")
        end = self.host.end_ns if duration_ns is None else min(duration_ns, self.host.end_ns)
        chunks = self.host.run()
        pending: Chunk | None = next(chunks, None)
        snap = self.host.counters_snapshot()
        workers = dict(self.host.threads)
        now = 0
        pacer = Pacer(self.speed, self._stop, origin_ts=0)
        try:
            while not self.stopped:
                now = min(now + interval_ns, end)
                recs: list[dict[str, Any]] = []
                while pending is not None and pending.t <= now:
                    if recs and len(recs) + len(pending.records) > BATCH_LIMIT:
                        yield self._batch(now, recs, snap, workers, split=True)
                        recs = []
                    recs.extend(pending.records)
                    snap, workers = pending.counters, pending.workers
                    pending = next(chunks, None)
                pacer.wait_until(now)
                yield self._batch(now, recs, snap, workers, split=False)
                if now >= end:
                    break
        finally:
            chunks.close()
            self.pages_scanned = self.host.pages_scanned_total

    def _batch(self, now: int, recs: list[dict[str, Any]], snap: dict[str, int],
               workers: dict[str, int], split: bool) -> Batch:
        last = recs[-1]["ts"] if recs else now
        ts = last if split else max(now, last)
        recs.extend(self._counters(ts, snap, workers))
        if self.tree is not None:
            self._sync_knobs(self.host)
            self.tree.write(snap, self.host.knobs)
        return Batch(now, recs)
