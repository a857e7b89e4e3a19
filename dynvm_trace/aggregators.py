"""Pure aggregators: totals, per-VM figures, rates per interval, last counter values.

Every aggregator takes batches (lists of records, see events.py) through `feed(records, kinds)`
(`kinds`: the records' kinds, which `Aggregates` computes once for all of them; an aggregator fed
alone computes them) and keeps state; `snapshot()` returns it as JSON-serialisable data. The
same code serves live, emulated and replayed data. `Aggregates` fans each batch out to all of
them.

Records are expected in timestamp order, as every source emits them (a counters record after
the events it covers). The hot loops rely on that: they find interval and window boundaries by
position, and let C code (map, compress, Counter, bisect) walk the records that need no work.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from itertools import compress
from operator import itemgetter
from typing import Any

from .events import MERGE_KINDS, RECLAIM_KINDS

Record = dict[str, Any]

kind_of = itemgetter("kind")
ts_of = itemgetter("ts")

RELEASE_STATUSES = ("released", "retry", "failed")
DEFAULT_STATUS = "released"
HOST = "host"  # the per-VM key of records that name neither a VM nor a pid

# Kinds whose records Totals must read beyond their kind.
_TOTALS_DETAIL = frozenset(RECLAIM_KINDS + ("lost", "vm_exit", "tally"))
TALLY = "tally"  # events counted in the kernel, not streamed: see add_tally()


def owner_label(key: str | int) -> str:
    return f"pid {key}" if isinstance(key, int) else key


class Totals:
    """Records per kind; pages per reclaim kind; reclaim_release pages by status; lost events."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.pages: dict[str, int] = dict.fromkeys(RECLAIM_KINDS, 0)
        self.release: dict[str, int] = dict.fromkeys(RELEASE_STATUSES, 0)
        self.lost = 0
        self.released_at_exit = 0  # released pages a VM still had when it exited
        self.merged_at_exit = 0  # merged pages a process still had when it exited (ksm source)

    def feed(self, records: list[Record], kinds: list[str] | None = None) -> None:
        if kinds is None:
            kinds = list(map(kind_of, records))
        self.events.update(kinds)
        pages, release = self.pages, self.release
        for r in compress(records, map(_TOTALS_DETAIL.__contains__, kinds)):
            k = r["kind"]
            if k == "lost":
                self.lost += r["count"]
                continue
            if k == "vm_exit":
                self.released_at_exit += r.get("released", 0)
                self.merged_at_exit += r.get("merged", 0)
                continue
            if k == TALLY:
                self.add_tally(r)
                continue
            n = r["pages"]
            pages[k] += n
            if k == "reclaim_release":
                status = r.get("status", DEFAULT_STATUS)
                release[status] = release.get(status, 0) + n

    def add_tally(self, r: Record) -> None:
        """A tally record counts as its counts' worth of records (and pages), not as itself."""
        self.events.update(r["counts"])
        self.events[TALLY] -= 1
        if not self.events[TALLY]:
            del self.events[TALLY]
        for k, n in r.get("pages", {}).items():
            if k in self.pages:
                self.pages[k] += n
                if k == "reclaim_release":
                    self.release[DEFAULT_STATUS] += n

    def snapshot(self) -> dict[str, Any]:
        return {"events": dict(sorted(self.events.items())), "pages": dict(self.pages),
                "release": dict(self.release), "released_at_exit": self.released_at_exit,
                "merged_at_exit": self.merged_at_exit,
                "lost": self.lost}


# Per-VM columns, in table order: the first four count events, the last two sum pages.
VM_COLUMNS = ("merges", "cow_breaks", "unmerges", "merge_fails", "released", "refaulted",
              "merged_at_exit", "released_at_exit")
_VM_COLUMN = {"merge": 0, "cow_break": 1, "unmerge": 2, "merge_fail": 3,
              "reclaim_release": 4, "reclaim_refault": 5, TALLY: -1, "vm_exit": -2}


class PerVM:
    """Per VM (the VM name, else the pid, else HOST): merges, COW breaks, unmerges, merge
    failures, released and refaulted pages, and what they mean in memory now.

    Figures are net changes since the first record: a log that starts with pages already
    merged can show a negative shared-pages estimate.
    """

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.rows: dict[str | int, list[int]] = {}

    def feed(self, records: list[Record], kinds: list[str] | None = None) -> None:
        if kinds is None:
            kinds = list(map(kind_of, records))
        rows, column = self.rows, _VM_COLUMN
        for r in compress(records, map(column.__contains__, kinds)):
            key = r.get("vm") or r.get("pid") or HOST
            row = rows.get(key)
            if row is None:
                row = rows[key] = [0] * len(VM_COLUMNS)
            col = column[r["kind"]]
            if col == -2:  # what the exit took away without events of its own
                row[6] += r.get("merged", 0)
                row[7] += r.get("released", 0)
            elif col < 0:
                self.add_tally(row, r)
            elif col < 4:
                row[col] += 1
            elif col == 5 or r.get("status", DEFAULT_STATUS) == DEFAULT_STATUS:
                row[col] += r["pages"]

    @staticmethod
    def add_tally(row: list[int], r: Record) -> None:
        """A tally adds its counts to the event columns and its pages to the page columns."""
        counts, pages = r["counts"], r.get("pages", {})
        for kind, col in _VM_COLUMN.items():
            if 0 <= col < 4:
                row[col] += counts.get(kind, 0)
            elif 4 <= col < 6:
                row[col] += pages.get(kind, 0)

    def table(self) -> list[dict[str, Any]]:
        """One row per VM, sorted by memory saved (largest first), then by name."""
        out = []
        for key, row in self.rows.items():
            d: dict[str, Any] = {"vm": owner_label(key), **dict(zip(VM_COLUMNS, row))}
            d["shared_pages"] = (d["merges"] - d["cow_breaks"] - d["unmerges"]
                                 - d["merged_at_exit"])
            d["saved_bytes"] = d["shared_pages"] * self.page_size
            d["reclaimed_pages"] = d["released"] - d["refaulted"] - d["released_at_exit"]
            d["reclaimed_bytes"] = d["reclaimed_pages"] * self.page_size
            out.append(d)
        out.sort(key=lambda d: (-d["saved_bytes"], d["vm"]))
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        return self.table()


# Kinds whose pages per second Rates reports: one page per merge-kind event, `pages` otherwise.
RATE_PAGE_KINDS = MERGE_KINDS + RECLAIM_KINDS
_RECLAIM = frozenset(RECLAIM_KINDS)
_RATES_DETAIL = frozenset(RECLAIM_KINDS + (TALLY,))


class Rates:
    """Events/s and pages/s per kind, per interval of `interval_ns`.

    Interval i covers [t0 + i*interval_ns, t0 + (i+1)*interval_ns); t0 is the constructor's, or
    the first record's ts. `last()` is the latest completed interval: what a live view shows as
    "this interval". Intervals without records are completed with zeros once a later record,
    or `advance(now)`, shows that time has passed.
    """

    def __init__(self, interval_ns: int, t0: int | None = None) -> None:
        if interval_ns <= 0:
            raise ValueError("interval_ns must be positive")
        self.interval_ns = interval_ns
        self.t0 = t0
        self._index = 0
        self._events: Counter[str] = Counter()
        self._pages: dict[str, int] = dict.fromkeys(RECLAIM_KINDS, 0)
        self._last: dict[str, Any] | None = None

    def _end(self) -> int:
        assert self.t0 is not None
        return self.t0 + (self._index + 1) * self.interval_ns

    def feed(self, records: list[Record], kinds: list[str] | None = None) -> None:
        if not records:
            return
        if kinds is None:
            kinds = list(map(kind_of, records))
        if self.t0 is None:
            self.t0 = records[0]["ts"]
        start, n = 0, len(records)
        while start < n:
            stop = bisect_left(records, self._end(), start, n, key=ts_of)
            self._count(records[start:stop], kinds[start:stop])
            if stop < n:
                self.advance(records[stop]["ts"])
            start = stop

    def _count(self, records: list[Record], kinds: list[str]) -> None:
        self._events.update(kinds)
        pages = self._pages
        for r in compress(records, map(_RATES_DETAIL.__contains__, kinds)):
            if r["kind"] == TALLY:
                self._add_tally(r)
            else:
                pages[r["kind"]] += r["pages"]

    def _add_tally(self, r: Record) -> None:
        """A tally (its ts: the start of the window it counts) adds its counts and pages."""
        self._events.update(r["counts"])
        self._events[TALLY] -= 1
        if not self._events[TALLY]:
            del self._events[TALLY]
        for k, n in r.get("pages", {}).items():
            if k in self._pages:
                self._pages[k] += n

    def advance(self, now: int) -> None:
        """Time has reached `now`: complete the intervals that ended by then."""
        if self.t0 is None or now < self._end():
            return
        index = (now - self.t0) // self.interval_ns
        if index == self._index + 1:
            self._last = self._figures(self._index, self._events, self._pages)
        else:  # the intervals in between had no records
            self._last = self._figures(index - 1, {}, {})
        self._index = index
        self._events = Counter()
        self._pages = dict.fromkeys(RECLAIM_KINDS, 0)

    def _figures(self, index: int, events: dict[str, int], pages: dict[str, int]) -> dict[str, Any]:
        assert self.t0 is not None
        seconds = self.interval_ns / 1e9
        start = self.t0 + index * self.interval_ns
        return {
            "index": index, "start_ns": start, "end_ns": start + self.interval_ns,
            "events": dict(sorted(events.items())),
            "events_per_s": {k: n / seconds for k, n in sorted(events.items())},
            "pages_per_s": {k: (pages.get(k, 0) if k in _RECLAIM else events.get(k, 0)) / seconds
                            for k in RATE_PAGE_KINDS},
        }

    def last(self) -> dict[str, Any] | None:
        """Figures of the latest completed interval, None before one has completed."""
        return self._last

    def snapshot(self) -> dict[str, Any]:
        return {"interval_ns": self.interval_ns, "t0": self.t0, "last": self._last}


class LastCounters:
    """The latest values of every counters group; ksm_stat per pid."""

    PER_PID_GROUPS = frozenset({"ksm_stat"})

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, Any]] = {}
        self.per_pid: dict[str, dict[int, dict[str, Any]]] = {}

    def feed(self, records: list[Record], kinds: list[str] | None = None) -> None:
        if kinds is None:
            kinds = list(map(kind_of, records))
        for r in compress(records, map("counters".__eq__, kinds)):
            group = r["group"]
            if group in self.PER_PID_GROUPS:
                self.per_pid.setdefault(group, {})[r.get("pid", 0)] = r["values"]
            else:
                self.groups[group] = r["values"]

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {g: dict(v) for g, v in sorted(self.groups.items())}
        for group, pids in sorted(self.per_pid.items()):
            out[group] = {str(pid): dict(v) for pid, v in sorted(pids.items())}
        return out


# Records fed to every aggregator at a time: a chunk stays in the CPU cache while each of them
# reads it (measured ~25% faster than whole 1 MiB log blocks); results do not depend on it.
CHUNK = 512


class Aggregates:
    """Fans each batch out to every aggregator; the one object views and reports hold.

    `page_size` comes from the log header or the source (never assumed).
    """

    def __init__(self, page_size: int, interval_ns: int = 1_000_000_000,
                 t0: int | None = None) -> None:
        # Imported here: correlation and lifetimes build on this module's helpers.
        from .correlation import Correlation
        from .lifetimes import Lifetimes

        self.page_size = page_size
        self.correlation = Correlation()
        # Correlation needs the running totals at each counters record, so it drives them;
        # feeding another Totals would count every record twice.
        self.totals = self.correlation.totals
        self.per_vm = PerVM(page_size)
        self.rates = Rates(interval_ns, t0)
        self.lifetimes = Lifetimes()
        self.counters = LastCounters()
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self._aggregators = (self.correlation, self.per_vm, self.rates, self.lifetimes,
                             self.counters)

    def feed(self, records: list[Record], now: int | None = None) -> None:
        """Feed one batch; `now` (a source Batch's `now`) tells that time passed without records."""
        if records:
            if self.first_ts is None:
                self.first_ts = records[0]["ts"]
            self.last_ts = records[-1]["ts"]
            for i in range(0, len(records), CHUNK):
                chunk = records[i:i + CHUNK]
                kinds = list(map(kind_of, chunk))
                for agg in self._aggregators:
                    agg.feed(chunk, kinds)
        if now is not None:
            self.rates.advance(now)

    def feed_all(self, batches: Iterable[list[Record]]) -> None:
        for batch in batches:
            self.feed(batch)

    def interval(self) -> dict[str, Any] | None:
        """The live view's "this interval": rates of the latest completed interval."""
        return self.rates.last()

    def snapshot(self) -> dict[str, Any]:
        span = (None if self.first_ts is None or self.last_ts is None
                else self.last_ts - self.first_ts)
        return {
            "page_size": self.page_size,
            "span": {"first_ts": self.first_ts, "last_ts": self.last_ts, "duration_ns": span},
            "totals": self.totals.snapshot(),
            "vms": self.per_vm.snapshot(),
            "rates": self.rates.snapshot(),
            "lifetimes": self.lifetimes.snapshot(),
            "counters": self.counters.snapshot(),
            "correlation": self.correlation.snapshot(),
        }
