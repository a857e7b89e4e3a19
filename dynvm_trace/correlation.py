"""Do the kernel's counters agree with the events? A first-class output, rule by rule.

A window is the time between two consecutive counters records of the same group: (prev.ts,
cur.ts]. In each window a rule compares what its counters moved by (the delta; a sum when the
rule names several) with what the events say happened, and records the difference
(counters minus events). A difference no larger than the events lost in that window, plus the
events in flight while its two snapshots were read (`in_flight` of a counters record: a source
that found no quiet moment to take it says how many came meanwhile), is "explained"; any other
is "differs". A rule applies to a window only when every counter it names is present in both
snapshots. An approximate rule (a kernel counter that lags the events) is judged on its totals:
"settling" while they differ and the last window still moved.

Records are taken in stream order (sources emit a counters record after the events it covers),
so the events of a window are the running totals at its end minus those at its start. Records
whose ts is not after the latest counters record already seen are counted ("late_records"):
they land in a later window than their timestamp says.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .aggregators import Record, Totals, kind_of, ts_of

# Running event quantities a rule can use, read from Totals.
QUANTITIES: dict[str, Callable[[Totals], int]] = {
    "merges": lambda t: t.events["merge"],
    "cow_breaks": lambda t: t.events["cow_break"],
    "unmerges": lambda t: t.events["unmerge"],
    "released": lambda t: t.release["released"],  # pages, reclaim_release with status released
    "release_failed": lambda t: t.release["failed"],  # pages
    "refaulted": lambda t: t.pages["reclaim_refault"],  # pages
    "released_at_exit": lambda t: t.released_at_exit,  # pages, vm_exit's `released`
    "merged_at_exit": lambda t: t.merged_at_exit,  # pages, vm_exit's `merged`
    "lost": lambda t: t.lost,
}

AGREES, EXPLAINED, DIFFERS, NO_COUNTERS = "agrees", "explained", "differs", "no counters"
# an approximate rule whose totals differ while its counters or events still move: the kernel
# has not caught up yet (it is judged once a window passes without either moving)
SETTLING = "settling"


@dataclass(frozen=True)
class Rule:
    name: str
    group: str
    counters: tuple[str, ...]  # counter labels in `group`; their deltas are summed
    events: tuple[tuple[str, int], ...]  # (quantity, +1 or -1)
    approximate: bool = False  # the kernel's counter does not move in step with the events
    note: str = ""

    def describe_counters(self) -> str:
        return " + ".join(f"Δ{c}" for c in self.counters)

    def describe_events(self) -> str:
        text = ""
        for q, sign in self.events:
            text += (" - " if sign < 0 else " + " if text else "") + q
        return text


_MERGED_NOW = (("merges", 1), ("cow_breaks", -1), ("unmerges", -1), ("merged_at_exit", -1))
_RECLAIMED_NOW = (("released", 1), ("refaulted", -1), ("released_at_exit", -1))

RULES: tuple[Rule, ...] = (
    Rule("merges", "pone_info", ("slice merge cnt",), (("merges", 1),)),
    Rule("sharing removed", "pone_info", ("delete merge page cnt",),
         (("cow_breaks", 1), ("unmerges", 1))),
    Rule("pages released", "pone_info", ("virt page merge count",), (("released", 1),)),
    Rule("release failures", "pone_info", ("virt page merge count err",),
         (("release_failed", 1),)),
    # A level (pages released right now), compared as deltas: the log may start with pages
    # already released.
    Rule("released in place", "pone_info", ("page recycle count",), _RECLAIMED_NOW),
    Rule("merged now", "pone_abstract", ("page merge count",), _MERGED_NOW),
    Rule("reclaimed now", "pone_abstract", ("page reclaim count",), _RECLAIMED_NOW),
    # KSM (the ksm source). pages_shared/pages_sharing/ksm_zero_pages rise at the merge, but
    # fall only when ksmd's next scan reaches a page that was COW-broken, unmapped or released:
    # compared over the whole log, which agrees once the log ends a full scan after the last
    # such event.
    Rule("ksm merged now", "ksm", ("pages_sharing", "pages_shared"), _MERGED_NOW,
         approximate=True,
         note="compared over the whole log: the kernel lowers these counters at its next scan, "
              "not at the COW break or unmap; with use_zero_pages=1, merges into the zero page "
              "count in ksm_zero_pages instead"),
    Rule("ksm cow breaks", "vmstat", ("cow_ksm",), (("cow_breaks", 1),),
         note="cow_ksm is host-wide, and also counts KSM pages copied by unmerging "
              "(MADV_UNMERGEABLE, run=2) or pinning, which are not write faults"),
    # The ksm source's in-kernel counters against its own event stream: any difference is
    # events the stream lost.
    Rule("ksm stream: merges", "ksm_probes", ("merge_new", "merge_existing", "merge_zero"),
         (("merges", 1),)),
    Rule("ksm stream: cow breaks", "ksm_probes", ("cow_break",), (("cow_breaks", 1),)),
    Rule("ksm stream: released pages", "ksm_probes", ("released_pages",), (("released", 1),)),
    Rule("ksm stream: refaults", "ksm_probes", ("reclaim_refault",), (("refaulted", 1),)),
    # The pone source's in-kernel counters against its own event stream (perf buffer losses).
    Rule("pone stream: merges", "pone_probes", ("merge",), (("merges", 1),)),
    Rule("pone stream: cow breaks", "pone_probes", ("cow_break",), (("cow_breaks", 1),)),
    Rule("pone stream: unmerges", "pone_probes", ("unmerge",), (("unmerges", 1),)),
    Rule("pone stream: released pages", "pone_probes", ("released",), (("released", 1),)),
    Rule("pone stream: refaults", "pone_probes", ("refault",), (("refaulted", 1),)),
)


class _RuleState:
    """What one rule found over the windows so far."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.windows = self.differing = self.explained = 0
        self.counter_total = self.events_total = self.lost_in_explained = self.lost_total = 0
        self.in_flight_in_explained = 0
        self.worst: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None

    def add(self, window: dict[str, Any]) -> None:
        self.windows += 1
        self.counter_total += window["counters"]
        self.events_total += window["events"]
        self.lost_total += window["lost"]
        diff = window["difference"]
        if diff:
            if abs(diff) <= window["lost"] + window["in_flight"]:
                self.explained += 1
                self.lost_in_explained += window["lost"]
                self.in_flight_in_explained += window["in_flight"]
            else:
                self.differing += 1
            if self.worst is None or abs(diff) > abs(self.worst["difference"]):
                self.worst = window
        self.last = window

    @property
    def verdict(self) -> str:
        if self.rule.approximate:  # only the totals over the log must agree
            diff = abs(self.counter_total - self.events_total)
            if not diff:
                return AGREES
            if diff <= self.lost_total:
                return EXPLAINED
            last = self.last
            moving = last is not None and (last["counters"] or last["events"])
            return SETTLING if moving else DIFFERS
        return DIFFERS if self.differing else EXPLAINED if self.explained else AGREES

    def snapshot(self) -> dict[str, Any]:
        r = self.rule
        return {
            "rule": r.name, "group": r.group, "counters": r.describe_counters(),
            "events": r.describe_events(), "approximate": r.approximate, "note": r.note,
            "verdict": self.verdict, "windows": self.windows,
            "windows_differing": self.differing, "windows_explained": self.explained,
            "lost_in_explained": self.lost_in_explained,
            "in_flight_in_explained": self.in_flight_in_explained,
            "counters_total": self.counter_total, "events_total": self.events_total,
            "difference_total": self.counter_total - self.events_total,
            "worst": self.worst, "last": self.last,
        }


class Correlation:
    """Windows per counters group, checked against the rule table.

    It owns the running Totals (it needs them at every counters record); Aggregates reads
    them from here instead of counting every record twice.
    """

    def __init__(self, rules: tuple[Rule, ...] = RULES) -> None:
        self.totals = Totals()
        self.rules: dict[str, list[_RuleState]] = {}
        for rule in rules:
            self.rules.setdefault(rule.group, []).append(_RuleState(rule))
        self.counters_seen = 0
        self.late_records = 0
        self._last_counters_ts: int | None = None
        # group -> (ts, values, running quantities, in_flight) of its latest snapshot
        self._prev: dict[str, tuple[int, dict[str, Any], dict[str, int], int]] = {}

    def feed(self, records: list[Record], kinds: list[str] | None = None) -> None:
        if kinds is None:
            kinds = list(map(kind_of, records))
        n, start = len(records), 0
        while start < n:
            try:
                stop = kinds.index("counters", start)
            except ValueError:
                stop = n
            if stop > start:
                if self._last_counters_ts is not None:
                    self.late_records += bisect_right(records, self._last_counters_ts,
                                                      start, stop, key=ts_of) - start
                self.totals.feed(records[start:stop], kinds[start:stop])
            if stop < n:
                self._snapshot_taken(records[stop])
            start = stop + 1

    def _snapshot_taken(self, rec: Record) -> None:
        self.counters_seen += 1
        ts, group, values = rec["ts"], rec["group"], rec["values"]
        self._last_counters_ts = ts if self._last_counters_ts is None \
            else max(ts, self._last_counters_ts)
        states = self.rules.get(group)
        if states is None:
            return
        now = {q: get(self.totals) for q, get in QUANTITIES.items()}
        in_flight = rec.get("in_flight", 0)
        prev = self._prev.get(group)
        self._prev[group] = (ts, values, now, in_flight)
        if prev is None:
            return
        prev_ts, prev_values, before, prev_in_flight = prev
        lost = now["lost"] - before["lost"]
        for state in states:
            rule = state.rule
            if not all(_is_count(values.get(c)) and _is_count(prev_values.get(c))
                       for c in rule.counters):
                continue
            counted = sum(values[c] - prev_values[c] for c in rule.counters)
            happened = sum(sign * (now[q] - before[q]) for q, sign in rule.events)
            state.add({"start_ts": prev_ts, "end_ts": ts, "counters": counted,
                       "events": happened, "difference": counted - happened, "lost": lost,
                       "in_flight": prev_in_flight + in_flight})

    def applicable(self) -> list[_RuleState]:
        """The rules that compared at least one window, in table order."""
        return [s for states in self.rules.values() for s in states if s.windows]

    @property
    def verdict(self) -> str:
        verdicts = {s.verdict for s in self.applicable()}
        if not verdicts:
            return NO_COUNTERS
        for verdict in (DIFFERS, EXPLAINED, SETTLING):
            if verdict in verdicts:
                return verdict
        return AGREES

    def snapshot(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "counters_records": self.counters_seen,
                "late_records": self.late_records,
                "rules": [s.snapshot() for s in self.applicable()]}


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
