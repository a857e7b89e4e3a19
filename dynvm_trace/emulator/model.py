"""The emulated pone host: guest RAM as numpy arrays, the pone scan daemon, ppr.

Page state lives in two arrays over all VMs' pages (a VM is a slice [base, base+pages)):
`content` (uint32 content id: equal ids = identical pages, 0 = the zero page) and `state`
(uint8, below). No per-page Python objects; every scan is a handful of vectorised passes, and
Python only runs per page for pages that produce an event (merges, COW breaks, unmerges).

Page states and the pone pipeline (kernel/pone.md; timing inferred from the recorded run, see
docs in the package __init__):

    ABSENT     never touched (no host page)
    UNTRACKED  present, not tracked by pone (comm is not qemu-system-x86, or pone_run was 0)
    VOLATILE   tracked, written since the daemon's last walk  ("slice alloc cnt" at first touch)
    AGED       tracked, not written during one whole base cycle (walk) -> candidate
    WATCH      write-protected by a merge scan, waiting for the next merge scan
    TREE       in the content tree (a unique entry or a member of a shared group)
    RELEASED   released by ppr: maps the shared zero page, no host memory
    MARKED     guest freed it (ppr mark written), waiting for the next base cycle
    MARKED_BAD same, with a bad pool slot: the release will fail
    PINNED     same, but the page holds an extra reference (pinned, e.g. by I/O): the release
               fails, and every later one too (the host clears the slot before it checks the
               reference count and does not put it back; pone.md "Failure modes")

Each 5 s base cycle (`seq` k = 1, 2, ... at k*5 s): release marked pages (when pone_recycle_run
/ pone_reclaim_run is on), then, when it is a merge scan (k % (period // 5000) == 0): insert
every WATCH page into the tree (merge with an identical entry, or a new unique entry), then
write-protect every AGED page (-> WATCH); then age every VOLATILE page (-> AGED). So a page
written at t is merged at the second merge scan after the first base cycle after t: with
period 5000, 10-15 s after the write, which is what the real kernel did (run1: filled at
~11.5 s, write-protected between 13.5 and 23.6 s, merged between 23.7 and 33.8 s; the 2,000
COW-broken pages were merged again "within 15 s").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .scenario import KNOB_DEFAULTS, QEMU_COMM, Scenario, Step

ABSENT, UNTRACKED, VOLATILE, AGED, WATCH, TREE, RELEASED, MARKED, MARKED_BAD, PINNED = range(10)

BASE_CYCLE_NS = 5_000_000_000  # the daemon's base cycle (msleep(5000 - cost))
MIN_PERIOD_MS = 5000
EVENT_NS = 20  # spacing of the timestamps of events produced by one step or one scan
CHUNK = 65536  # pages worked on (and records built) at a time: bounds every batch
WINDOW = 1 << 22  # pages searched at a time by the daemon's walk: bounds temporary arrays
SRC = "emulate"

# pone_info's 34 counters, normalized labels, in the kernel's order (pone_sysfs.PONE_INFO_KEYS;
# duplicated here so that the model does not depend on the renderer; a test checks they agree).
PONE_INFO_KEYS = (
    "slice alloc cnt", "slice change volatile ok cnt", "slice out que cnt",
    "virt page merge count", "slice que change watch cnt", "slice mem que free cnt",
    "slice protect err cnt", "virt page merge count err", "slice out watch que cnt",
    "slice new insert cnt", "slice merge cnt", "slice insert sd tree err cnt",
    "slice change ref err cnt", "slice fix free cnt", "slice volatile free cnt",
    "slice other free cnt", "slice watch free cnt", "slice sys free cnt",
    "slice mem watch reuse cnt", "data map key cnt", "data unmap key cnt",
    "delete sd tree ok cnt", "delete sd tree no found cnt", "delete merge page cnt",
    "insert sd tree ok cnt", "slice pre fix check cnt", "slice deamon find volatile cnt",
    "slice deamon fine watch cnt", "slice deamon in que fail cnt", "deamon task state",
    "slice copy pte count", "slice copy pte1 count", "tree page free cnt", "page recycle count",
)
DAEMON_TASK_STATE = 2  # what the real kernel always showed (TASK_UNINTERRUPTIBLE: in msleep)

# short names for the counters the model moves
ALLOC = "slice alloc cnt"
VOLATILE_OK = "slice change volatile ok cnt"
OUT_QUE = "slice out que cnt"
VIRT_MERGE = "virt page merge count"
QUE_WATCH = "slice que change watch cnt"
VIRT_MERGE_ERR = "virt page merge count err"
OUT_WATCH_QUE = "slice out watch que cnt"
NEW_INSERT = "slice new insert cnt"
MERGE = "slice merge cnt"
WATCH_REUSE = "slice mem watch reuse cnt"
DEL_TREE = "delete sd tree ok cnt"
DEL_MERGE = "delete merge page cnt"
INS_TREE = "insert sd tree ok cnt"
PRE_FIX = "slice pre fix check cnt"
FIND_VOLATILE = "slice deamon find volatile cnt"
FINE_WATCH = "slice deamon fine watch cnt"
RECYCLE = "page recycle count"

# The pone kernel threads of the emulated host, as pone.md saw them at boot with 2 vCPUs, with
# made-up pids (the `workers` counters group: thread name -> pid). spthrd_1 is the only worker:
# it does all the write-protect, tree insert, merge and release work.
WORKER = "spthrd_1"
THREADS = {"spthrd_1": 97, "spthrd_divide": 98, "spdeamon": 99}


@dataclass
class Chunk:
    """Records of one step or scan (or part of one), in time order, and the counters right
    after them. `t` is the time of the step or scan (its records may be a little later: they
    are EVENT_NS apart)."""

    t: int
    records: list[dict[str, Any]]
    counters: dict[str, int]
    workers: dict[str, int] = field(default_factory=dict)  # pone threads alive: name -> pid


def _rank(c: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements hold the same value."""
    n = len(c)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(c, kind="stable")
    cs = c[order]
    first = np.empty(n, bool)
    first[0] = True
    np.not_equal(cs[1:], cs[:-1], out=first[1:])
    pos = np.arange(n)
    start = np.maximum.accumulate(np.where(first, pos, 0))
    r = np.empty(n, np.int64)
    r[order] = pos - start
    return r


def _runs(g: np.ndarray, key: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of runs of consecutive numbers in sorted `g` (and equal `key`)."""
    if len(g) == 0:
        return g[:0], g[:0]
    brk = np.diff(g) != 1
    if key is not None:
        brk |= key[1:] != key[:-1]
    starts = np.flatnonzero(np.r_[True, brk])
    lengths = np.diff(np.r_[starts, len(g)])
    return starts, lengths


class Host:
    """The emulated host. `run()` yields Chunks in time order until the scenario's end.

    Knobs use canonical names (run, recycle_run, scan_period, daemon_run, ...; see
    scenario.KNOB_FILES); `knob_hook`, when set, is called at the start of every base cycle (the
    source reads the emulated sysfs tree there, so knobs written by someone else are obeyed).
    """

    def __init__(self, scenario: Scenario, seed: int = 1, dialect: str | None = None):
        self.sc = scenario
        self.seed = seed
        self.dialect = dialect or scenario.dialect
        self.page_size = scenario.page_size
        self.rng = np.random.default_rng(seed)
        self.vms = scenario.vms
        self.vm_index = {v.name: i for i, v in enumerate(self.vms)}
        sizes = np.array([v.pages for v in self.vms], np.int64)
        self.base = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
        self.total = int(sizes.sum())
        self.alive = [False] * len(self.vms)
        self.tracked = [v.comm == QEMU_COMM for v in self.vms]
        self.state = np.zeros(self.total, np.uint8)
        self.content = np.zeros(self.total, np.uint32)
        # fake pfns: page g's current host frame is g + total * gen[g]; gen counts (mod 256)
        # the new host pages it got (first touch, COW copy, refault)
        self.gen = np.zeros(self.total, np.uint8)
        self.next_id = 1  # 0 is the zero page
        cap = 1 << 16
        self.tree_count = np.zeros(cap, np.int32)
        self.tree_kept = np.zeros(cap, np.int64)
        self._named: dict[Any, int] = {}
        self._pools: dict[Any, int] = {}
        self.ctr: dict[str, int] = dict.fromkeys(PONE_INFO_KEYS, 0)
        self.ctr["deamon task state"] = DAEMON_TASK_STATE
        self.knobs: dict[str, int] = dict(KNOB_DEFAULTS)
        self.knobs["scan_period"] = scenario.scan_period
        self.knobs.update(scenario.knobs)
        self.knob_hook: Callable[[Host], None] | None = None
        self.last_ts = -1
        self.end_ns = int(round(scenario.duration * 1e9))
        # totals for invariants and views
        self.pages_scanned_total = 0
        self.cycles = 0
        self.exited_released = 0
        self._marked_pending = False
        self.threads: dict[str, int] = dict(THREADS)  # alive; crash_worker removes one

    @property
    def worker_dead(self) -> bool:
        """The worker died: the daemon still finds and queues work, nobody serves it."""
        return WORKER not in self.threads

    # --- knobs ----------------------------------------------------------------------------------

    def set_knob(self, name: str, value: int) -> None:
        """Store a knob like the kernel does: never an error; a scan period below 5000 ms is
        clamped to 5000; on/off knobs take 0 or 1 (other values ignored)."""
        if name == "scan_period":
            if value <= 0:
                return
            value = max(value, MIN_PERIOD_MS)
        elif name == "nice":
            if not -20 <= value <= 19:
                return
        elif value not in (0, 1):
            return
        self.knobs[name] = value

    @property
    def merge_every(self) -> int:
        """Merge scans run every this many base cycles."""
        return max(self.knobs["scan_period"], MIN_PERIOD_MS) // MIN_PERIOD_MS

    # --- content ids ----------------------------------------------------------------------------

    def _new_ids(self, n: int) -> int:
        first = self.next_id
        self.next_id += n
        if self.next_id >= 1 << 32:
            raise RuntimeError("emulator: content id space (2**32) exhausted")
        cap = len(self.tree_count)
        if self.next_id > cap:
            while cap < self.next_id:
                cap *= 2
            tc = np.zeros(cap, np.int32)
            tc[:len(self.tree_count)] = self.tree_count
            tk = np.zeros(cap, np.int64)
            tk[:len(self.tree_kept)] = self.tree_kept
            self.tree_count, self.tree_kept = tc, tk
        return first

    def _contents(self, st: Step, n: int, old: np.ndarray, pattern: str | None = None) -> np.ndarray:
        pattern = pattern or st.pattern
        name = st.value if st.value is not None else f"step{st.index}"
        if pattern == "zero":
            return np.zeros(n, np.uint32)
        if pattern == "identical":
            key = ("identical", name)
            if key not in self._named:
                self._named[key] = self._new_ids(1)
            return np.full(n, self._named[key], np.uint32)
        if pattern == "unique":
            first = self._new_ids(n)
            return np.arange(first, first + n, dtype=np.uint32)
        if pattern == "sampled":
            key = ("sampled", name, st.distinct)
            if key not in self._pools:
                self._pools[key] = self._new_ids(st.distinct)
            return (self._pools[key] + self.rng.integers(0, st.distinct, n)).astype(np.uint32)
        if pattern == "increment":  # the same change to every page: equal pages stay equal
            u, inv = np.unique(old, return_inverse=True)
            first = self._new_ids(len(u))
            return (first + inv.reshape(-1)).astype(np.uint32)
        if pattern == "mix":
            kinds = list(st.mix)
            p = np.array([st.mix[k] for k in kinds], float)
            which = self.rng.choice(len(kinds), n, p=p / p.sum())
            out = np.empty(n, np.uint32)
            for i, k in enumerate(kinds):
                sel = np.flatnonzero(which == i)
                out[sel] = self._contents(st, len(sel), old[sel], k)
            return out
        raise ValueError(f"unknown pattern {pattern!r}")

    # --- time and records -----------------------------------------------------------------------

    def _ts(self, t: int, n: int) -> int:
        """First of `n` strictly increasing timestamps EVENT_NS apart, at or after `t` and after
        every timestamp given so far."""
        t0 = max(t, self.last_ts + 1)
        if n:
            self.last_ts = t0 + (n - 1) * EVENT_NS
        return t0

    def pfn(self, g: np.ndarray) -> np.ndarray:
        """The fake host pfn that guest pages `g` map now (their own page, not the shared one)."""
        return g + self.total * self.gen[g].astype(np.int64)

    def _vm_of(self, g: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.base, g, side="right") - 1

    def _segments(self, g: np.ndarray) -> Iterator[tuple[int, int, int]]:
        """(vm index, lo, hi) for the runs of sorted global pages `g` that belong to one VM."""
        if len(g) == 0:
            return
        v = self._vm_of(g)
        cut = np.flatnonzero(np.diff(v)) + 1
        bounds = np.r_[0, cut, len(g)]
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            yield int(v[lo]), lo, hi

    def _page_records(self, kind: str, g: np.ndarray, t: int, a: np.ndarray,
                      b: np.ndarray | None = None, reason: str | None = None) -> list[dict[str, Any]]:
        """One record per page of sorted global pages `g`, timestamps from `t`:
        merge (pfn=a, old_pfn=b, into from self._into),
        cow_break (pfn=a, new_pfn=b), unmerge (pfn=a, reason). Built as dict literals (what
        events.event() returns, without its per-field loop): this is the hot path."""
        n = len(g)
        ts0 = self._ts(t, n)
        out: list[dict[str, Any]] = []
        ps = self.page_size
        al = a.tolist()
        bl = b.tolist() if b is not None else None
        for v, lo, hi in self._segments(g):
            vm = self.vms[v]
            pid, comm, name = vm.pid, vm.comm, vm.name
            addrs = ((g[lo:hi] - self.base[v]) * ps).tolist()
            tss = range(ts0 + lo * EVENT_NS, ts0 + hi * EVENT_NS, EVENT_NS)
            if kind == "merge":
                into = self._into[lo:hi]
                out += [{"kind": "merge", "ts": ts, "src": SRC, "pid": pid, "comm": comm,
                         "vm": name, "pfn": pf, "old_pfn": op, "addr": ad,
                         "into": "new" if nw else "existing"}
                        for ts, pf, op, ad, nw in zip(tss, al[lo:hi], bl[lo:hi], addrs, into)]
            elif kind == "cow_break":
                out += [{"kind": "cow_break", "ts": ts, "src": SRC, "pid": pid, "comm": comm,
                         "vm": name, "pfn": pf, "new_pfn": np_, "addr": ad}
                        for ts, pf, np_, ad in zip(tss, al[lo:hi], bl[lo:hi], addrs)]
            else:
                out += [{"kind": kind, "ts": ts, "src": SRC, "pid": pid, "comm": comm,
                         "vm": name, "reason": reason, "pfn": pf, "addr": ad}
                        for ts, pf, ad in zip(tss, al[lo:hi], addrs)]
        return out

    def _vm_record(self, kind: str, v: int, t: int, **fields: Any) -> dict[str, Any]:
        vm = self.vms[v]
        rec = {"kind": kind, "ts": self._ts(t, 1), "src": SRC, "pid": vm.pid, "comm": vm.comm,
               "vm": vm.name}
        rec.update(fields)
        return rec

    def _run_records(self, kind: str, g: np.ndarray, t: int, key: np.ndarray | None = None,
                     status: Callable[[Any], str] | None = None) -> list[dict[str, Any]]:
        """One record per run of contiguous pages in one VM (and equal `key`): pages, addr."""
        out = []
        vmi = self._vm_of(g)
        k = vmi if key is None else vmi * 4 + key
        starts, lengths = _runs(g, k)
        ts0 = self._ts(t, len(starts))
        for j, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
            v = int(vmi[s])
            vm = self.vms[v]
            gs = int(g[s])
            rec = {"kind": kind, "ts": ts0 + j * EVENT_NS, "src": SRC, "pid": vm.pid,
                   "comm": vm.comm, "vm": vm.name, "pages": n,
                   "addr": (gs - int(self.base[v])) * self.page_size}
            if status is not None:
                rec["status"] = status(key[s])
                rec["pfn"] = gs + self.total * int(self.gen[gs])
            out.append(rec)
        return out

    def counters_snapshot(self) -> dict[str, int]:
        return dict(self.ctr)

    def abstract(self) -> dict[str, int]:
        """pone_abstract of the guide dialect: pages merged now, pages released now."""
        return {"page merge count": self.ctr[MERGE] - self.ctr[DEL_MERGE],
                "page reclaim count": self.ctr[RECYCLE]}

    # --- the timeline -----------------------------------------------------------------------------

    def run(self) -> Iterator[Chunk]:
        """Everything that happens, in time order, until the scenario's duration."""
        items: list[tuple[int, int, int, Any]] = []
        for i, vm in enumerate(self.vms):
            items.append((int(round(vm.start * 1e9)), 0, i, ("start", i)))
        for j, st in enumerate(self.sc.steps):
            items.append((int(round(st.at * 1e9)), 1, j, ("step", st)))
        items.sort(key=lambda x: x[:3])
        i, k = 0, 1
        while True:
            t_item = items[i][0] if i < len(items) else math.inf
            t_cyc = k * BASE_CYCLE_NS
            t = min(t_item, t_cyc)
            if t > self.end_ns:
                break
            if t_item <= t_cyc:  # steps at a cycle's time happen before it
                what = items[i][3]
                i += 1
                gen = self._vm_start(what[1], t_item) if what[0] == "start" else self._step(what[1], t_item)
            else:
                gen = self._cycle(k, t_cyc)
                k += 1
            # announce the happening before doing it: a consumer that stops pulling at time t
            # has not let the model run ahead (knobs written meanwhile are read at the cycle)
            yield Chunk(t, [], dict(self.ctr), dict(self.threads))
            for recs in gen:
                yield Chunk(t, recs, dict(self.ctr), dict(self.threads))

    def _vm_start(self, v: int, t: int) -> Iterator[list]:
        self.alive[v] = True
        if self.tracked[v]:
            yield [self._vm_record("vm_start", v, t, pages=self.vms[v].pages)]

    def _select(self, v: int, st: Step) -> np.ndarray:
        vm = self.vms[v]
        lo = st.start
        hi = vm.pages if st.count is None else lo + st.count
        b = int(self.base[v])
        if st.only == "any":
            idx = np.arange(lo, hi, dtype=np.int64)
        else:
            seg = self.state[b + lo:b + hi]
            if st.only == "present":
                m = seg != ABSENT
            elif st.only == "merged":
                m = seg == TREE
            else:  # released
                m = seg == RELEASED
            idx = np.flatnonzero(m).astype(np.int64) + lo
        if st.sample is not None and st.sample < len(idx):
            idx = np.sort(self.rng.choice(idx, st.sample, replace=False))
        return idx + b

    def _step(self, st: Step, t: int) -> Iterator[list]:
        if st.action == "set":
            self.set_knob(st.knob, int(st.value))
            return
        if st.action == "crash_worker":  # an Oops in the thread: it is gone from then on
            self.threads.pop(st.worker, None)
            yield []  # a chunk: the counters after it show the thread gone
            return
        v = self.vm_index[st.vm]
        if not self.alive[v]:
            return
        if st.action == "exit":
            yield from self._exit(v, t)
            return
        g = self._select(v, st)
        if st.action in ("free", "pin"):
            yield from self._free(v, g, st, t, pinned=st.action == "pin")
        else:
            new = self._contents(st, len(g), self.content[g])
            yield from self._write(v, g, new, t)

    # --- guest actions ----------------------------------------------------------------------------

    def _leave_tree(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Remove tree pages `g` (sorted, in one chunk) from their groups, in page order.
        Returns (left a group that still has other sharers, the group's kept pfn)."""
        c = self.content[g].astype(np.int64)
        n0 = self.tree_count[c]
        shared = _rank(c) < n0 - 1
        kept = self.tree_kept[c]
        u, cnt = np.unique(c, return_counts=True)
        self.tree_count[u] -= cnt.astype(np.int32)
        n = len(g)
        self.ctr[DEL_TREE] += n
        self.ctr[PRE_FIX] += n
        self.ctr[DEL_MERGE] += int(shared.sum())
        return shared, kept

    def _write(self, v: int, g: np.ndarray, new: np.ndarray, t: int) -> Iterator[list]:
        """Guest writes `new` contents into sorted global pages `g` of VM v."""
        if len(g) == 0:
            return
        st = self.state[g]
        if not self.tracked[v]:  # pone ignores this process entirely
            self.state[g[st == ABSENT]] = UNTRACKED
            self.content[g] = new
            return
        on = bool(self.knobs["run"])
        tracked_copy = VOLATILE if on else UNTRACKED
        # writes to tree pages: COW breaks (group of > 1) or the sole member leaving the tree
        tree = np.flatnonzero(st == TREE)
        for lo in range(0, len(tree), CHUNK):
            sel = tree[lo:lo + CHUNK]
            gg = g[sel]
            shared, kept = self._leave_tree(gg)
            n = len(gg)
            if on:
                self.ctr[ALLOC] += n
                self.ctr[VOLATILE_OK] += n
            self.state[gg] = tracked_copy
            self.content[gg] = new[sel]
            self.gen[gg] += 1  # a private copy
            gs = gg[shared]
            if len(gs):
                yield self._page_records("cow_break", gs, t, kept[shared], self.pfn(gs))
        # writes to released pages: refaults (one record per contiguous run)
        rel = np.flatnonzero(st == RELEASED)
        for lo in range(0, len(rel), CHUNK):
            sel = rel[lo:lo + CHUNK]
            gg = g[sel]
            n = len(gg)
            self.ctr[RECYCLE] -= n
            if on:
                self.ctr[ALLOC] += n
                self.ctr[VOLATILE_OK] += n
            self.state[gg] = tracked_copy
            self.content[gg] = new[sel]
            self.gen[gg] += 1  # a fresh page
            yield self._run_records("reclaim_refault", gg, t)
        # the rest: no events
        m_abs = st == ABSENT
        m_watch = st == WATCH
        n_abs = int(np.count_nonzero(m_abs))
        n_watch = int(np.count_nonzero(m_watch))
        if on:
            self.ctr[ALLOC] += n_abs
            self.ctr[VOLATILE_OK] += n_abs
        self.ctr[WATCH_REUSE] += n_watch  # a write-protected page written before its insert
        self.ctr[VOLATILE_OK] += n_watch
        self.gen[g[m_abs]] += 1
        rest = ~((st == TREE) | (st == RELEASED))
        gr = g[rest]
        sr = st[rest]
        ns = np.where(sr == UNTRACKED, UNTRACKED, VOLATILE).astype(np.uint8)
        ns[sr == ABSENT] = tracked_copy
        self.state[gr] = ns
        self.content[gr] = new[rest]
        yield []

    def _free(self, v: int, g: np.ndarray, st: Step, t: int, pinned: bool = False) -> Iterator[list]:
        """The guest frees pages: its ppr driver writes a mark (unique content: indicator, pool,
        slot) into each page, which is a write like any other (a merged page is COW-broken
        first), and the page waits for the next base cycle to be released. `pinned` (action
        "pin"): the pages also hold an extra reference, so every release of them fails."""
        marks = self._contents(st, len(g), self.content[g], "unique")
        yield from self._write(v, g, marks, t)
        if not self.tracked[v] or len(g) == 0:
            return
        ok = g[self.state[g] == VOLATILE]  # tracked pages (not while pone_run was 0)
        if len(ok):
            if pinned:
                self.state[ok] = PINNED
            else:
                bad = self.rng.random(len(ok)) < st.fail if st.fail > 0 else np.zeros(len(ok), bool)
                self.state[ok] = np.where(bad, MARKED_BAD, MARKED).astype(np.uint8)
            self._marked_pending = True
        yield [self._vm_record("reclaim_report", v, t, pages=len(g))]

    def _exit(self, v: int, t: int) -> Iterator[list]:
        b, e = int(self.base[v]), int(self.base[v]) + self.vms[v].pages
        if self.tracked[v]:
            seg = self.state[b:e]
            tree = np.flatnonzero(seg == TREE) + b
            for lo in range(0, len(tree), CHUNK):
                gg = tree[lo:lo + CHUNK]
                shared, kept = self._leave_tree(gg)
                self.state[gg] = ABSENT
                gs = gg[shared]
                if len(gs):
                    yield self._page_records("unmerge", gs, t, kept[shared], reason="exit")
            released = int(np.count_nonzero(seg == RELEASED))
            self.ctr[RECYCLE] -= released
            self.exited_released += released
        self.state[b:e] = ABSENT
        self.content[b:e] = 0
        self.alive[v] = False
        if self.tracked[v]:
            yield [self._vm_record("vm_exit", v, t, released=released)]

    # --- the daemon -------------------------------------------------------------------------------

    def _walk(self, lo_state: int, hi_state: int | None = None) -> Iterator[np.ndarray]:
        """Sorted global indices of the pages whose state is lo_state (or in lo..hi_state),
        in chunks of at most CHUNK, searching WINDOW pages at a time (memory stays flat)."""
        state = self.state
        for w in range(0, self.total, WINDOW):
            seg = state[w:w + WINDOW]
            m = seg == lo_state if hi_state is None else (seg >= lo_state) & (seg <= hi_state)
            idx = np.flatnonzero(m)
            if len(idx) == 0:
                continue
            idx += w
            for lo in range(0, len(idx), CHUNK):
                yield idx[lo:lo + CHUNK]

    def _cycle(self, k: int, t: int) -> Iterator[list]:
        if self.knob_hook is not None:
            self.knob_hook(self)
        self.cycles += 1
        if not (self.knobs["run"] and self.knobs.get("daemon_run", 1)):
            return  # pone off: the daemon does no work
        merge = k % self.merge_every == 0
        state = self.state
        out: list[dict[str, Any]] = [
            {"kind": "scan_start", "ts": self._ts(t, 1), "src": SRC, "seq": k, "merge_scan": merge}]
        dead = self.worker_dead
        if merge:
            # insert the pages write-protected by the previous merge scan
            for gg in self._walk(WATCH):
                if dead:  # the daemon finds them; the dead worker never inserts them
                    self.ctr[FINE_WATCH] += len(gg)
                    continue
                out += self._insert(gg, t)
                yield out
                out = []
        # ppr: release the pages marked since the last cycle (every base cycle)
        if self._marked_pending and self.knobs["recycle_run"]:
            self._marked_pending = False
            for gg in self._walk(MARKED, PINNED):
                n = len(gg)
                self.ctr[FIND_VOLATILE] += n
                if dead:  # queued to the dead worker: never served, found again next cycle
                    self._marked_pending = True
                    continue
                s = state[gg]
                bad = s == MARKED_BAD
                pinned = s == PINNED
                failed = bad | pinned
                nf, nb = int(failed.sum()), int(bad.sum())
                self.ctr[OUT_QUE] += n
                self.ctr[VIRT_MERGE] += n - nf
                self.ctr[RECYCLE] += n - nf
                self.ctr[VIRT_MERGE_ERR] += nf
                self.ctr[QUE_WATCH] += nb  # a bad slot goes on to the merge path
                # a pinned page stays marked (its slot is gone): it fails again next cycle
                state[gg] = np.where(pinned, PINNED, np.where(bad, WATCH, RELEASED)).astype(np.uint8)
                self.content[gg[~failed]] = 0
                if nf - nb:
                    self._marked_pending = True
                key = bad.astype(np.int64) + 2 * pinned.astype(np.int64)
                out += self._run_records("reclaim_release", gg, t, key,
                                         lambda b: "failed" if b else "released")
                yield out
                out = []
        # one pass over every page, WINDOW pages at a time: write-protect (merge scans) the
        # pages that stayed unwritten for a whole cycle, age the volatile ones, count the walk
        wp = scanned = 0
        for w in range(0, self.total, WINDOW):
            seg = state[w:w + WINDOW]
            if merge:
                m = seg == AGED
                n = int(np.count_nonzero(m))
                if n:
                    if not dead:  # the worker write-protects; dead, they stay aged
                        seg[m] = WATCH
                    wp += n
            m = seg == VOLATILE
            if m.any():
                seg[m] = AGED
            scanned += int(np.count_nonzero(seg >= VOLATILE)) - int(np.count_nonzero(seg == RELEASED))
        self.ctr[FIND_VOLATILE] += wp
        if not dead:
            self.ctr[OUT_QUE] += wp
            self.ctr[QUE_WATCH] += wp
        self.pages_scanned_total += scanned
        out.append({"kind": "scan_end", "ts": self._ts(t, 1), "src": SRC, "seq": k,
                    "merge_scan": merge, "pages_scanned": scanned})
        yield out

    def _insert(self, g: np.ndarray, t: int) -> list[dict[str, Any]]:
        """Tree insert of write-protected pages `g` (sorted), in page order: a content already
        in the tree -> merge into its kept page; else a new unique entry."""
        c = self.content[g].astype(np.int64)
        n0 = self.tree_count[c]
        rank = _rank(c)
        first_new = (n0 == 0) & (rank == 0)
        self.tree_kept[c[first_new]] = self.pfn(g[first_new])
        u, cnt = np.unique(c, return_counts=True)
        self.tree_count[u] += cnt.astype(np.int32)
        self.state[g] = TREE
        n = len(g)
        n_new = int(first_new.sum())
        self.ctr[FINE_WATCH] += n
        self.ctr[OUT_WATCH_QUE] += n
        self.ctr[INS_TREE] += n
        self.ctr[NEW_INSERT] += n_new
        self.ctr[MERGE] += n - n_new
        m = ~first_new
        gm = g[m]
        if not len(gm):
            return []
        self._into = ((n0 + rank)[m] == 1).tolist()  # the group had one page: a new share
        return self._page_records("merge", gm, t, self.tree_kept[c[m]], self.pfn(gm))
