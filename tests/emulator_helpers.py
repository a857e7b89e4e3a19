"""Helpers shared by the emulator tests: run a scenario to its end and keep what it said."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dynvm_trace.emulator.scenario import Scenario, loads_scenario
from dynvm_trace.sources.emulate import EmulateSource

SEC = 1_000_000_000


@dataclass
class Run:
    source: EmulateSource
    records: list[dict[str, Any]] = field(default_factory=list)
    batches: list[tuple[int, int]] = field(default_factory=list)  # (now, number of records)

    @property
    def kinds(self) -> Counter:
        return Counter(r["kind"] for r in self.records)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    def counters(self, group: str = "pone_info") -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == "counters" and r["group"] == group]

    @property
    def last(self) -> dict[str, int]:
        return self.counters()[-1]["values"]

    def at(self, t_s: float) -> dict[str, int]:
        """pone_info as the last counters record at or before t_s seconds said it."""
        vals = self.counters()[0]["values"]
        for r in self.counters():
            if r["ts"] > t_s * SEC:
                break
            vals = r["values"]
        return vals


def scenario(text: str, name: str = "test", page_size: int = 4096) -> Scenario:
    return loads_scenario(text, where=f"{name}.toml", name=name, page_size=page_size)


def run(sc: Scenario | str, seed: int = 1, interval_s: float = 1.0, **kw: Any) -> Run:
    src = EmulateSource(sc, seed=seed, speed=None, **kw)
    out = Run(src)
    for b in src.batches(int(interval_s * SEC), None):
        out.records.extend(b.records)
        out.batches.append((b.now, len(b.records)))
    return out
