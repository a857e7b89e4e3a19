"""Alerts: the patched kernel's own failures (kernel/pone.md, "Failure modes of the kernel
itself"), derived from the event stream and the counters.

A pure detector with the aggregators' interface: `feed(records)` (it also returns the alert
records raised by that batch, for a writer to put into the log) and `snapshot()` (every alert
raised so far, JSON-serialisable). Records are expected in time order, as every source emits
them.

| alert | evidence | what it means |
|---|---|---|
| `release_stuck` | `reclaim_release` records with status `failed` for the same pages (`pfn`, else `pid`+`addr`) in STUCK_CYCLES consecutive base cycles (`scan_start` seq; without scan records every repeat counts); or, when the stream has no `reclaim_release` records at all, `virt page merge count err` (pone_info) rising by the same amount in STUCK_CYCLES consecutive windows in which it rose | freed pages that hold an extra reference are never released: pone clears their slot before it checks the reference count and does not put it back |
| `worker_stalled` | pone_info: `slice deamon find volatile cnt` rose while `slice out que cnt` did not move, in STALL_SNAPSHOTS consecutive snapshots in which the first rose (snapshots in which neither moved do not count; one in which `slice out que cnt` moved starts over) | a `spthrd_*` worker died (an Oops, e.g. from a negative pool id in a guest's mark): its queue is never served again |
| `worker_gone` | the `workers` counters group (pone threads alive, name -> pid) no longer lists a thread it listed before | the same, seen in /proc: the thread is gone |

Alerts are deduplicated: one per alert id and subject (release_stuck: the VM, else the pid, else
"host", or "counters" for the counters-only form; worker_stalled: one for the host; worker_gone:
the thread), raised once, then updated: `count` is how many times the condition has been seen
(release_stuck: consecutive failing cycles of its pages, or windows of the same rise;
worker_stalled: snapshots without progress; worker_gone: snapshots without the thread),
`last_ts` when it was last seen, `pages`/`pfns` the pages it concerns now.

The alert record raised (events.py kind `alert`) has `ts` 1 ns after the record that completed
its evidence: it follows that record in time order, and a log reader never counts it as a record
that came after a later counters snapshot. Alert records fed back in (reading a log that carries
them) are merged with the ones derived again, by alert id and subject: never counted twice.
"""

from __future__ import annotations

from itertools import compress
from operator import itemgetter
from typing import Any

Record = dict[str, Any]
_kind_of = itemgetter("kind")
_READ = frozenset(("reclaim_release", "counters", "scan_start", "alert"))  # the rest: skipped

STUCK_CYCLES = 2
STALL_SNAPSHOTS = 3
PRUNE_AT = 65536  # failed pages remembered before the ones that cannot be stuck are forgotten

ERR = "virt page merge count err"
FIND = "slice deamon find volatile cnt"
OUT = "slice out que cnt"

MESSAGES = {
    "release_stuck": (
        "the same freed pages fail to be released every base cycle: they hold an extra reference "
        "(e.g. pinned by I/O) and pone cleared their slot before checking it, so they are never "
        "released ('virt page merge count err' grows by these pages each cycle)"),
    "worker_stalled": (
        "a pone worker (spthrd_*) serves nothing while the daemon keeps queueing pages "
        "('slice deamon find volatile cnt' rises, 'slice out que cnt' stopped): it died (e.g. an "
        "Oops from guest-controlled page content: a negative pool id in a mark) and its queue is "
        "never served again: merging and reclaim of the pages queued to it have stopped"),
    "worker_gone": (
        "a pone worker thread is gone: it died (e.g. an Oops from guest-controlled page content: "
        "a negative pool id in a mark) and its queue is never served again: merging and reclaim "
        "of the pages queued to it have stopped"),
}
_GONE = {
    "spdeamon": ("the pone scan daemon (spdeamon) is gone: nothing is scanned, merged or "
                 "released any more"),
    "spthrd_divide": ("the pone thread spthrd_divide is gone: big clusters of the content tree "
                      "are no longer split"),
}


def message(alert: str, worker: str | None = None) -> str:
    """The one-line meaning of an alert id (worker_gone: of that thread)."""
    if alert == "worker_gone" and worker in _GONE:
        return _GONE[worker]
    return MESSAGES.get(alert, alert)


class Alerts:
    def __init__(self, stuck_cycles: int = STUCK_CYCLES, stall_snapshots: int = STALL_SNAPSHOTS):
        if stuck_cycles < 2 or stall_snapshots < 1:
            raise ValueError("stuck_cycles must be >= 2 and stall_snapshots >= 1")
        self.stuck_cycles, self.stall_snapshots = stuck_cycles, stall_snapshots
        self._alerts: dict[tuple[str, Any], Record] = {}  # raise order
        self._new: list[Record] = []
        self._cycle: int | None = None  # seq of the latest scan_start
        # release_stuck from events: pages key -> [cycle, streak, pages, pfn, owner]
        self._fails: dict[Any, list] = {}
        self._stuck: dict[Any, dict[Any, list]] = {}  # owner -> key -> its _fails entry
        self._release_seen = False
        # counters: release_stuck (err deltas) and worker_stalled
        self._err: int | None = None
        self._err_delta = 0
        self._err_repeats = 0
        self._find: int | None = None
        self._out: int | None = None
        self._stall = 0
        self._stall_rise = 0
        # worker_gone
        self._threads_seen: dict[str, int] = {}

    # --- input --------------------------------------------------------------------------------

    def feed(self, records: list[Record]) -> list[Record]:
        """Feed one batch; returns the alert records it raised (new alerts only)."""
        self._new = []
        for r in compress(records, map(_READ.__contains__, map(_kind_of, records))):
            k = r["kind"]
            if k == "reclaim_release":
                self._release(r)
            elif k == "counters":
                group = r.get("group")
                if group == "pone_info":
                    self._pone_info(r)
                elif group == "workers":
                    self._workers(r)
            elif k == "scan_start":
                seq = r.get("seq")
                if isinstance(seq, int):
                    self._cycle = seq
                    if len(self._fails) > PRUNE_AT:
                        self._prune()
            elif k == "alert":
                self._adopt(r)
        return self._new

    def feed_all(self, batches) -> None:
        for b in batches:
            self.feed(b)

    # --- release_stuck ------------------------------------------------------------------------

    def _prune(self) -> None:
        """Forget pages that failed once and not in the last cycle: they can no longer fail in
        consecutive cycles (memory stays bounded on a host with many one-off failures)."""
        stuck = {id(e) for s in self._stuck.values() for e in s.values()}
        c = self._cycle
        self._fails = {k: e for k, e in self._fails.items()
                       if id(e) in stuck or e[0] is None or c is None or e[0] >= c - 1}

    def _release(self, r: Record) -> None:
        self._release_seen = True
        if "pfn" in r:
            key: Any = ("pfn", r["pfn"])
        elif "addr" in r:
            key = ("addr", r.get("pid"), r["addr"])
        else:
            return  # nothing says which pages: they cannot be followed
        owner = r.get("vm") or r.get("pid") or "host"
        if r.get("status", "released") != "failed":
            entry = self._fails.pop(key, None)
            if entry is not None:
                self._stuck.get(entry[4], {}).pop(key, None)
            return
        cycle = self._cycle
        entry = self._fails.get(key)
        if entry is None:
            entry = self._fails[key] = [cycle, 1, r.get("pages", 1), r.get("pfn"), owner]
        else:
            if cycle is not None and entry[0] == cycle:
                return  # the same cycle again
            consecutive = cycle is None or entry[0] is None or cycle == entry[0] + 1
            entry[0] = cycle
            entry[1] = entry[1] + 1 if consecutive else 1
            entry[2] = r.get("pages", 1)
        if entry[1] < self.stuck_cycles:
            return
        stuck = self._stuck.setdefault(owner, {})
        stuck[key] = entry
        fields: Record = {"pages": sum(e[2] for e in stuck.values()),
                          "count": max(e[1] for e in stuck.values()), "evidence": "events"}
        pfns = sorted(e[3] for e in stuck.values() if e[3] is not None)
        if pfns:
            fields["pfns"] = pfns
        if key[0] == "addr" and len(stuck) == 1:
            fields["addr"] = key[2]
        self._raise("release_stuck", owner, r, fields)

    def _pone_info(self, r: Record) -> None:
        values = r.get("values") or {}
        err = values.get(ERR)
        if _is_int(err):
            if self._err is not None and err > self._err:
                d = err - self._err
                self._err_repeats = self._err_repeats + 1 if d == self._err_delta else 1
                self._err_delta = d
                if self._err_repeats >= self.stuck_cycles and not self._release_seen:
                    self._raise("release_stuck", "counters", r,
                                {"pages": d, "count": self._err_repeats, "evidence": "counters"},
                                keep_owner=False)
            self._err = err
        find, out = values.get(FIND), values.get(OUT)
        if _is_int(find) and _is_int(out):
            if self._find is not None and self._out is not None:
                if out != self._out:
                    self._stall = self._stall_rise = 0  # served: progress
                elif find > self._find:
                    self._stall += 1
                    self._stall_rise += find - self._find
                    if self._stall >= self.stall_snapshots:
                        self._raise("worker_stalled", "queue", r,
                                    {"pages": self._stall_rise, "count": self._stall,
                                     "evidence": "counters"}, keep_owner=False)
            self._find, self._out = find, out

    def _workers(self, r: Record) -> None:
        values = r.get("values") or {}
        for name, pid in values.items():
            self._threads_seen[name] = pid
        for name in self._threads_seen:
            if name not in values:
                a = self._alerts.get(("worker_gone", name))
                count = (a["count"] + 1) if a is not None else 1
                self._raise("worker_gone", name, r,
                            {"worker": name, "count": count, "evidence": "workers"},
                            keep_owner=False)

    # --- alerts -------------------------------------------------------------------------------

    def _raise(self, alert: str, subject: Any, r: Record, fields: Record,
               keep_owner: bool = True) -> None:
        ts = r["ts"] + 1
        key = (alert, subject)
        a = self._alerts.get(key)
        if a is not None:  # raised before: update it
            fields["count"] = max(fields.get("count", 1), a.get("count", 1))
            a.update(fields)
            a["last_ts"] = max(ts, a.get("last_ts", ts))
            return
        rec: Record = {"kind": "alert", "ts": ts, "src": r.get("src", "dynvm-trace")}
        if keep_owner:
            rec.update((k, r[k]) for k in ("pid", "comm", "vm") if k in r)
        rec["alert"] = alert
        rec["message"] = message(alert, fields.get("worker"))
        rec.update(fields)
        rec["first_ts"] = ts
        self._new.append(dict(rec))
        rec["last_ts"] = ts
        self._alerts[key] = rec

    def _adopt(self, r: Record) -> None:
        """An alert record read from a log: merged with the same alert derived again."""
        alert = r.get("alert")
        if not isinstance(alert, str):
            return
        if alert == "worker_gone":
            subject: Any = r.get("worker")
        elif alert == "worker_stalled":
            subject = "queue"
        elif r.get("evidence") == "counters":
            subject = "counters"
        else:
            subject = r.get("vm") or r.get("pid") or "host"
        a = self._alerts.get((alert, subject))
        if a is None:
            a = dict(r)
            a.setdefault("first_ts", r["ts"])
            a["last_ts"] = max(r["ts"], a.get("last_ts", r["ts"]))
            self._alerts[(alert, subject)] = a
        else:
            a["count"] = max(a.get("count", 1), r.get("count", 1))

    # --- output -------------------------------------------------------------------------------

    def snapshot(self) -> list[Record]:
        """Every alert raised so far, in the order raised: the alert record's fields (without
        kind, src and ts, which is first_ts) plus last_ts."""
        return [{k: v for k, v in a.items() if k not in ("kind", "src", "ts")}
                for a in self._alerts.values()]

    def __len__(self) -> int:
        return len(self._alerts)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def interleave(records: list[Record], alerts: list[Record]) -> list[Record]:
    """`records` with `alerts` put in time order (an alert before records of the same ts): what
    a writer writes, so that a log carries the alerts raised while it was recorded."""
    if not alerts:
        return records
    out: list[Record] = []
    i = 0
    for rec in records:
        while i < len(alerts) and alerts[i]["ts"] <= rec["ts"]:
            out.append(alerts[i])
            i += 1
        out.append(rec)
    out.extend(alerts[i:])
    return out
