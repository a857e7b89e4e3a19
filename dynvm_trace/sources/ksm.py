"""The `ksm` source: a stock kernel's KSM, free page reporting's host side and COW breaks, traced
live with bcc tracepoint programs (probes/ksm.c).

Which processes are tracked (their write-protect faults, discards and refaults are watched in
the kernel; merges, unmerges and scans are seen for every process):
  - every process that enters KSM while tracing (ksm:ksm_enter, in the kernel),
  - processes already in KSM when tracing starts (/proc/PID/ksm_stat: rmap items, merging pages
    or `ksm_mergeable: yes`),
  - qemu processes (VM discovery), whose guest RAM discards are free page reporting,
  - the pids given with --pid.
The mm of a process that entered KSM before tracing began is learnt at its first page fault
after the probes attached (current->mm, at its BTF offset); until then its merges carry no
pid. Where each tracked process maps the files its fds open (shared mappings: /proc/PID/maps,
/proc/PID/fd) is written into the kernel at the start and every interval, so that a punch
hole's file range becomes addresses whose refaults are seen (probes/ksm.c).

A COW break is a write fault on a page in the process's merged page set, which the merges seen
while tracing fill. The pages a process already had merged when tracing started are put in at
attach time ("seeding": dynvm_trace/ksm_pages.py finds them in /proc/PID/smaps, pagemap and
/proc/kpageflags; the header's `seeded_merged_pages` says how many per pid). The order is: attach
the probes, track the processes, then seed, so no merge is missed (a merge seen meanwhile sets
its bit, and seeding ORs into it). The cost is a window, from the attach until a process's
pages are in (seeding reads /proc for one process after another: milliseconds for a small one,
about 0.1 s per GiB of a large one), in which the COW break of a page merged before the attach
is missed; the bit of such a page is then set after its break, and a later write-protect fault
there that is no COW break would count as one. Seeding needs CAP_SYS_ADMIN and a kernel with
/proc/kpageflags; without them a warning says so (and the header's `seed_incomplete`) and
tracing goes on without it.

Every interval the source reads the in-kernel counters (per-CPU, the totals) and takes counter
snapshots: group "ksm" (/sys/kernel/mm/ksm), "vmstat" (cow_ksm, ksm_swpin_copy), "ksm_stat"
(one record per tracked pid, with its pid) and "ksm_probes" (the in-kernel event counters).
With the stream open (the default; trace and record need it) every event is also a record, and
ring buffer overruns, counted in the kernel, become `lost` records. Without it (top) the kernel
counts events per (process, kind) and every interval brings one `tally` record per process
that had events: what happened in the window, counted in the kernel.

A snapshot is retaken when an event lies within SNAPSHOT_GUARD_NS of it (with the stream: by
the events' times; without it: the tallies read before and after must be equal): an event whose
tracepoint fired just before the snapshot may move its kernel counter just after (cow_ksm is
counted at the end of the fault the tracepoint saw begin). Under a storm of events no quiet
moment comes: after SNAPSHOT_RETRIES the counters records carry `in_flight`, the events that
came meanwhile, and correlation allows a window that much.
"""

from __future__ import annotations

import bisect
import errno
import time
from operator import itemgetter
from collections.abc import Iterator
from importlib import resources
from typing import Any

import numpy as np

from .. import bpf_host, exitcodes, vms
from ..btf import kernel_member_offset
from ..ksm_fd_maps import FD_MAPS, MAX_FDS, FdMaps
from ..ksm_pages import KsmPageFinder, PagesUnreadable
from ..ksm_sysfs import read_ksm
from ..logfile import make_header
from ..paths import Roots, page_size
from ..procfs import list_pids, read_comm, read_ksm_stat, read_vmstat
from ..ksm_columns import (BULK_KINDS, E_COW, E_MERGE_EXISTING, E_MERGE_FAIL, E_MERGE_NEW,
                           E_MERGE_ZERO, E_REFAULT, E_RELEASE, E_RELEASE_PAGES, E_SCAN_END,
                           E_SCAN_START, E_UNMERGE, EVENT, EventColumns)
from ..ringbuf import RingReader
from .base import Batch, Source, SourceUnavailable

SRC = "ksm"
# Index order of the counts map: keep in step with the enum in probes/ksm.c.
COUNTERS = ("merge_new", "merge_existing", "merge_zero", "merge_fail", "unmerge",
            "unmerge_after_cow", "scan_start", "scan_end", "ksm_enter", "ksm_exit", "cow_break",
            "reclaim_release", "released_pages", "release_untracked_pages", "reclaim_refault",
            "dropped", "page_set_full", "unresolved_mm", "tally_full",
            "unmerge_after_exit", "pid_out_of_range", "punch_untracked_pages", "release_repeat")
# Tallies (the in-kernel per-process counts, without the stream): event kind -> the record
# kind it counts, and the kinds whose `pages` a tally carries.
TALLY_KINDS = {E_MERGE_NEW: "merge", E_MERGE_EXISTING: "merge", E_MERGE_ZERO: "merge",
               E_MERGE_FAIL: "merge_fail", E_UNMERGE: "unmerge", E_SCAN_START: "scan_start",
               E_SCAN_END: "scan_end", E_COW: "cow_break", E_RELEASE: "reclaim_release",
               E_REFAULT: "reclaim_refault"}
TALLY_PAGES = {E_RELEASE_PAGES: "reclaim_release", E_REFAULT: "reclaim_refault"}
VMSTAT_KEYS = ("cow_ksm", "ksm_swpin_copy")
SNAPSHOT_GUARD_NS = 2_000_000
SNAPSHOT_RETRIES = 10
_TS = itemgetter("ts")
POLL_S = 0.02
# Records taken from the ring buffer per read (dynvm_trace/ringbuf.py: copied out in bulk, no
# callback per record). While events arrive faster than they are taken the ring never empties:
# taking at most this many at a time keeps snapshots on time and a backlog in the kernel's ring
# (where overruns are counted) instead of in this process's memory.
CONSUME_BUDGET = 16384
MAX_PROCS = 65536
CHUNK_PAGES = 512  # pages per chunk of a page set (CHUNK_PAGES in probes/ksm.c)
MAX_CHUNKS = 1 << 18  # 2 MiB chunks per page set: 512 GiB of tracked guest RAM
MAX_RELEASE_CHUNKS = 32  # a discard marks at most 64 MiB for refault tracking
PID_LIMIT = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit: pid_max cannot exceed it
RINGBUF_PAGES = 1 << 13  # 32 MiB: 524,288 records (a 56-byte event and the ring's 8-byte header)


def _probe_source() -> str:
    return resources.files("dynvm_trace.probes").joinpath("ksm.c").read_text()


# Probe parts that need both tracepoints of a pair.
PAIRS = {"HAVE_SCAN": ("ksm:ksm_start_scan", "ksm:ksm_stop_scan"),
         "HAVE_ENTER": ("ksm:ksm_enter", "ksm:ksm_exit"),
         "HAVE_MADVISE": ("syscalls:sys_enter_madvise", "syscalls:sys_exit_madvise"),
         "HAVE_FALLOCATE": ("syscalls:sys_enter_fallocate", "syscalls:sys_exit_fallocate")}


def _defines(tracepoints: dict[str, str], rmap_addr_off: int | None, stream: bool,
             ringbuf_pages: int, task_mm_off: int | None = None) -> list[str]:
    """The probe's compile flags; tracepoints: bpf_host.available_tracepoints()."""
    have = {"ksm:ksm_merge_one_page": "HAVE_MERGE_ONE", "ksm:ksm_remove_rmap_item": "HAVE_REMOVE_RMAP",
            "exceptions:page_fault_user": "HAVE_FAULT", "sched:sched_process_fork": "HAVE_FORK"}
    flags = [f"-D{macro}" for tp, macro in have.items() if tp in tracepoints]
    flags += [f"-DRAW_{tp.split(':')[1]}" for tp, mode in tracepoints.items()
              if mode == bpf_host.RAW]
    flags += [f"-D{macro}" for macro, tps in PAIRS.items() if all(t in tracepoints for t in tps)]
    flags += [f"-DPAGE_SHIFT_={page_size().bit_length() - 1}",
              f"-DRMAP_ADDR_OFF={-1 if rmap_addr_off is None else rmap_addr_off}",
              f"-DTASK_MM_OFF={-1 if task_mm_off is None else task_mm_off}",
              f"-DMAX_PROCS={MAX_PROCS}", f"-DMAX_CHUNKS={MAX_CHUNKS}",
              f"-DMAX_RELEASE_CHUNKS={MAX_RELEASE_CHUNKS}", f"-DRINGBUF_PAGES={ringbuf_pages}",
              f"-DPID_WORDS={PID_LIMIT // 64}", f"-DMAX_FDS={MAX_FDS}", f"-DFD_MAPS={FD_MAPS}"]
    flags.append("-DSTREAM" if stream else "-DTALLY")
    return flags


def _in_time_order(evs: np.ndarray) -> np.ndarray:
    """Ring records by time: the ring is in reservation order, which is time order on one
    CPU, and nearly so across CPUs."""
    ts = evs["ts"]
    if len(evs) > 1 and np.any(ts[1:] < ts[:-1]):
        return evs[np.argsort(ts, kind="stable")]
    return evs


def _in_flight(counters: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Counters records marked with the events (or pages) that came while they were read,
    when no quiet moment was found (SNAPSHOT_RETRIES): correlation allows that much."""
    if n > 0:
        for rec in counters:
            rec["in_flight"] = n
    return counters


def in_ksm(stat: dict[str, Any] | None) -> bool:
    """Whether a /proc/PID/ksm_stat says the process has (or asked for) KSM memory."""
    if not stat:
        return False
    return bool(stat.get("ksm_rmap_items") or stat.get("ksm_merging_pages")
                or stat.get("ksm_mergeable") is True or stat.get("ksm_merge_any") is True)


def initial_pids(roots: Roots, extra: tuple[int, ...] = ()) -> set[int]:
    """Processes to track from the start: in KSM already, qemu, or asked for."""
    pids = set(extra) | {vm.pid for vm in vms.discover(roots)}
    return pids | {pid for pid in list_pids(roots) if in_ksm(_stat_or_none(roots, pid))}


def page_set_chunks(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chunks of a page set (probes/ksm.c: 512 pages per chunk, chunk = page >> 9) that
    hold these virtual page numbers: the chunk numbers, ascending, and each one's 8 bitmap
    words (bit i of word j: page chunk * 512 + j * 64 + i)."""
    words_per_chunk = CHUNK_PAGES // 64
    pages = np.sort(np.asarray(pages, dtype=np.uint64))
    if not len(pages):
        return np.zeros(0, dtype=np.uint64), np.zeros((0, words_per_chunk), dtype=np.uint64)
    # one OR per run of pages in the same 64-page word (pages are sorted: runs are contiguous)
    word = pages >> np.uint64(6)
    starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
    bits = np.bitwise_or.reduceat(np.uint64(1) << (pages & np.uint64(63)), starts)
    word = word[starts]
    chunks, which = np.unique(word // np.uint64(words_per_chunk), return_inverse=True)
    out = np.zeros((len(chunks), words_per_chunk), dtype=np.uint64)
    out[which, (word % np.uint64(words_per_chunk)).astype(np.intp)] = bits
    return chunks, out


def _stat_or_none(roots: Roots, pid: int) -> dict[str, Any] | None:
    try:
        return read_ksm_stat(roots, pid)
    except OSError:
        return None


class KsmSource(Source):
    name = SRC

    def __init__(self, roots: Roots, pids: tuple[int, ...] = (), stream: bool = True,
                 ringbuf_pages: int = RINGBUF_PAGES, warn=None, raw: bool = True):
        """raw=False attaches every program as a tracepoint with fields, also where BTF
        would let it attach raw (the way kernels without BTF run it)."""
        super().__init__()
        blockers = bpf_host.ksm_blockers(roots)
        if blockers:
            c = blockers[0]
            code = exitcodes.NOT_PERMITTED if c.name == "privilege" else exitcodes.MISSING_FEATURE
            raise SourceUnavailable(f"ksm source unavailable: {c.name}: {c.detail}"
                                    + (f"; fix: {c.fix}" if c.fix else ""), code)
        self.roots = roots
        self.warn = warn or (lambda msg: None)
        self.stream = stream
        self.tracepoints = bpf_host.available_tracepoints(roots, raw)
        self.rmap_addr_off = kernel_member_offset(roots, "ksm_rmap_item", "address")
        if self.rmap_addr_off is None:
            self.warn("no BTF offset for ksm_rmap_item.address: merges carry no address, so COW "
                      "breaks are not told apart from other write faults and are not reported")
        for tp in bpf_host.TRACEPOINTS:
            if tp.path not in self.tracepoints:
                self.warn(f"tracepoint {tp.path} unusable here: no {tp.needed_for}")
        task_mm_off = kernel_member_offset(roots, "task_struct", "mm")
        if task_mm_off is None:
            self.warn("no BTF offset for task_struct.mm: the merges of processes in KSM before "
                      "tracing began carry no pid")
        bcc = bpf_host.import_bcc()
        self.bpf = bcc.BPF(text=_probe_source().encode(), cflags=_defines(
            self.tracepoints, self.rmap_addr_off, stream, ringbuf_pages, task_mm_off))
        # after attaching: a process entering KSM while the probes compiled (seconds) is
        # either seen here or by ksm_enter
        start_pids = initial_pids(roots, pids)
        already = {pid: stat for pid in start_pids if in_ksm(stat := _stat_or_none(roots, pid))}
        self._chunks: list[np.ndarray] = []  # records taken from the ring, not yet taken in
        self._bulk: list[np.ndarray] = []  # held bulk events: parts, each in time order
        self._ring: RingReader | None = None
        if stream:
            table = self.bpf["events"]
            self._ring = RingReader.open(table.map_fd, table.max_entries, EVENT)
        self.anchor = (time.monotonic_ns(), time.time_ns())
        self._comms: dict[int, str] = {}
        self._vm_names = {vm.pid: vm.name for vm in vms.discover(roots)}
        self.tracked: set[int] = set()
        self._track(start_pids)
        # pid -> pages seeded into its merged page set, and why seeding stopped short (header())
        self.seeded: dict[int, int] = {}
        self.seed_incomplete: str | None = None
        if self.rmap_addr_off is not None:  # without it no COW break is reported at all
            self._seed_merged(already)
        self._held: list[dict[str, Any]] = []  # held records of the rare kinds (time order)
        self._last_dropped = 0
        self._tallied: dict[tuple[int, int], int] = {}  # (pid, kind) -> count at the last read
        self._last_ts: int | None = None
        self._tally_gone: set[int] = set()  # exited pids whose tallies go after the next read
        self._exits: list[dict[str, Any]] = []  # vm_exit records for the next snapshot
        punch_holes = all(tp in self.tracepoints for tp in PAIRS["HAVE_FALLOCATE"])
        self._fd_maps = FdMaps(self.bpf["fd_maps"], roots, self._warn_once) if punch_holes else None
        self._warned: set[str] = set()

    # -- kernel side --------------------------------------------------------------------------

    def _consume(self) -> bool:
        """One bounded read of the ring buffer; whether it stopped at the budget (more
        records may be waiting)."""
        if self._ring is None:
            return False
        evs = self._ring.read(CONSUME_BUDGET)
        if len(evs):
            self._chunks.append(evs)
        return len(evs) >= CONSUME_BUDGET

    def _drain(self, until_ns: int | None = None) -> None:
        """Take records from the ring buffer until it is empty or, with until_ns, until one
        newer than until_ns has been taken (the ring is in reservation order)."""
        while self._consume():
            if until_ns is not None and int(self._chunks[-1]["ts"][-1]) > until_ns:
                return

    def _set_bits(self, name: str, pids: set[int], on: bool) -> None:
        """Set or clear pids in one of the probes' bitmaps of tgids: tracked_user (user space's
        tracked tgids; the kernel has its own, for ksm_enter: see probes/ksm.c) or mm_known."""
        masks: dict[int, int] = {}  # word -> the bits of these pids in it
        for pid in pids:
            if pid < PID_LIMIT:
                masks[pid // 64] = masks.get(pid // 64, 0) | 1 << pid % 64
        table = self.bpf[name]
        for word, mask in masks.items():
            key = table.Key(word)
            bits = table[key].value
            table[key] = table.Leaf(bits | mask if on else bits & ~mask)

    def _track(self, pids: set[int]) -> None:
        self._set_bits("tracked_user", pids - self.tracked, True)
        self.tracked |= pids

    def _seed_merged(self, stats: dict[int, dict[str, Any]]) -> None:
        """Put the pages that are KSM pages now into the merged page sets of these processes
        (pid -> its ksm_stat), so their COW breaks are seen: the page sets are otherwise only
        filled by the merges seen while tracing. The probes are attached and the processes
        tracked already: a merge seen meanwhile has set its bit, which is kept (ORed into)."""
        # nothing merged (yet): not read; a ksm_stat without the line (older kernels) is read
        stats = {pid: st for pid, st in stats.items() if st.get("ksm_merging_pages") != 0}
        if not stats:
            return
        try:
            with KsmPageFinder(self.roots, page_size()) as finder:
                for pid, stat in sorted(stats.items()):
                    try:
                        pages = finder.ksm_pages(pid, merge_any=stat.get("ksm_merge_any") is True)
                    except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
                        continue
                    self.seeded[pid] = self._set_merged(pid, pages)
                    if self.seed_incomplete:  # the page set took no more
                        break
        except PagesUnreadable as e:
            self.seed_incomplete = f"pages merged before tracing started are not known: {e}"
        if self.seed_incomplete:
            self.warn(f"{self.seed_incomplete}; their COW breaks are not seen")

    def _set_merged(self, pid: int, pages: np.ndarray) -> int:
        """Set the bits of these virtual page numbers in `pid`'s merged page set, a chunk at a
        time: read, OR, write (a probe that changes the chunk between the read and the write
        loses its change: a window of microseconds per chunk). Returns how many of the pages
        were put in; when the map refuses a chunk (full: MAX_CHUNKS), fewer, and
        seed_incomplete says so."""
        table = self.bpf["merged"]
        chunks, words = page_set_chunks(pages)
        done = 0
        for chunk, bits in zip(chunks.tolist(), words.tolist()):
            key = table.Key(pid, 0, chunk)
            leaf = table.get(key)
            if leaf is None:
                leaf = table.Leaf()
            for i, w in enumerate(bits):
                leaf.w[i] |= w
            try:
                table[key] = leaf
            except Exception as e:  # bcc raises a bare Exception, with the errno's text
                self.seed_incomplete = (
                    f"pid {pid}: {len(pages) - done} merged pages, and those of any process "
                    f"after it, are not in the merged page set ({e}; it holds at most "
                    f"{MAX_CHUNKS} chunks)")
                return done
            done += sum(w.bit_count() for w in bits)
        return done

    def _refresh_tracked(self) -> None:
        """Take in the pids the kernel started tracking (ksm_enter); drop the ones that exited,
        with their page sets."""
        entered = self.bpf["entered"]
        kernel = {k.value for k in entered.keys()}
        for pid in kernel:
            del entered[entered.Key(pid)]
        # user space holds them from now on: the kernel drops its own bit at ksm_exit
        self._track(kernel)
        gone = {pid for pid in self.tracked if not self.roots.procfs(str(pid)).exists()}
        if not gone:
            return
        # Untracked first: from then on the probe leaves their page sets alone (an exited
        # process's rmap items that ksmd removes later are counted as unmerge_after_exit).
        self._set_bits("tracked_user", gone, False)
        self._set_bits("mm_known", gone, False)  # a new process may come with the same pid
        left: dict[str, dict[int, int]] = {}  # page set -> pid -> pages still in it
        for name in ("merged", "released"):
            table, counts = self.bpf[name], left.setdefault(name, {})
            for key, bits in [(k, v) for k, v in table.items() if k.pid in gone]:
                counts[key.pid] = counts.get(key.pid, 0) + sum(w.bit_count() for w in bits.w)
                del table[key]
        # What an exit takes away without an event of its own: the kernel's counters drop by
        # these pages (pages_sharing/pages_shared at ksmd's next scan), so correlation needs them.
        now = time.monotonic_ns()
        self._exits += [{"kind": "vm_exit", "ts": now, "src": SRC, **self._who(pid),
                         "merged": left["merged"].get(pid, 0),
                         "released": left["released"].get(pid, 0)} for pid in sorted(gone)]
        self._tally_gone |= gone  # their last tallies are read first, at the next snapshot
        self.tracked -= gone

    def _refresh_fd_maps(self) -> None:
        """The probe's fd_maps for the tracked processes (dynvm_trace/ksm_fd_maps.py)."""
        if self._fd_maps is not None:
            self._fd_maps.refresh(self.tracked)

    def _warn_once(self, message: str) -> None:
        """A warning about a state a refresh finds again every interval: said the first time."""
        if message not in self._warned:
            self._warned.add(message)
            self.warn(message)

    def read_tallies(self) -> dict[tuple[int, int], int]:
        """The in-kernel per-(process, event kind) counts, summed over CPUs. A process's merges
        are counted with its mm (probes/ksm.c, struct mm_info) until it leaves KSM, then
        added to its tallies: the tallies are read first, so a process leaving between the two
        reads is counted at the next read, never twice."""
        out = {(k.pid, k.kind): int(sum(v)) for k, v in self.bpf["tallies"].items()}
        for info in self.bpf["mm_pid"].values():
            for kind, n in enumerate(info.merges):  # E_MERGE_NEW, E_MERGE_EXISTING, E_MERGE_ZERO
                if n:
                    out[info.pid, kind] = out.get((info.pid, kind), 0) + n
        return out

    def _tally_records(self, start: int, ts: int,
                       now: dict[tuple[int, int], int]) -> list[dict[str, Any]]:
        """One `tally` per process with events since the last read (`now`, read_tallies()):
        the window [start, ts]."""
        per_pid: dict[int, dict[str, dict[str, int]]] = {}
        for (pid, kind), n in now.items():
            delta = n - self._tallied.get((pid, kind), 0)
            if delta <= 0:
                continue
            entry = per_pid.setdefault(pid, {"counts": {}, "pages": {}})
            if kind in TALLY_KINDS:
                name = TALLY_KINDS[kind]
                entry["counts"][name] = entry["counts"].get(name, 0) + delta
            if kind in TALLY_PAGES:
                entry["pages"][TALLY_PAGES[kind]] = delta
        # a count missing from this read keeps its last value: a process's merges leave its
        # mm's entry at ksm_exit for its tallies, and an exit between the two maps' reads
        # shows them in neither (counting them again at the next read, from 0, would be wrong)
        self._tallied.update(now)
        out = []
        for pid, entry in sorted(per_pid.items()):
            if not entry["counts"]:
                continue
            rec = {"kind": "tally", "ts": start, "src": SRC, **self._who(pid),
                   "window_ns": ts - start, "counts": entry["counts"]}
            if entry["pages"]:
                rec["pages"] = entry["pages"]
            out.append(rec)
        return out

    def _forget_tallies(self, gone: set[int]) -> None:
        table = self.bpf["tallies"]
        for key in [k for k in table.keys() if k.pid in gone]:
            del table[key]
            self._tallied.pop((key.pid, key.kind), None)

    def kernel_counts(self) -> dict[str, int]:
        """The in-kernel event counters (summed over CPUs): the totals."""
        table = self.bpf["counts"]
        return {name: int(sum(table[table.Key(i)])) for i, name in enumerate(COUNTERS)}

    # -- records ------------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return make_header(SRC, clock="monotonic", page_size=page_size(), anchor_ts=self.anchor[0],
                           anchor_unix_ns=self.anchor[1], stream=self.stream,
                           tracepoints=sorted(self.tracepoints),
                           raw_tracepoints=sorted(tp for tp, mode in self.tracepoints.items()
                                                  if mode == bpf_host.RAW),
                           rmap_address_offset=self.rmap_addr_off,
                           tracked_pids=sorted(self.tracked), **self._seed_fields())

    def _seed_fields(self) -> dict[str, Any]:
        """What _seed_merged did, for the header (docs/event-log.md)."""
        fields: dict[str, Any] = {}
        if self.rmap_addr_off is not None:
            fields["seeded_merged_pages"] = {str(pid): n for pid, n in sorted(self.seeded.items())}
        if self.seed_incomplete:
            fields["seed_incomplete"] = self.seed_incomplete
        return fields

    def _who(self, pid: int) -> dict[str, Any]:
        if not pid:
            return {}
        comm = self._comms.get(pid)
        if comm is None:
            comm = read_comm(self.roots, pid) or ""
            self._comms[pid] = comm
        who: dict[str, Any] = {"pid": pid}
        if comm:
            who["comm"] = comm
        if pid in self._vm_names:
            who["vm"] = self._vm_names[pid]
        return who

    def _take_in(self) -> None:
        """Move the events taken from the ring into the held ones: the bulk kinds (merges,
        unmerges, COW breaks, refaults) stay columns, held as parts in time order each (joined
        once, into a batch: joining all that is held at every read cost more per event than
        the rest of the recorder), the rare ones (merge failures, scans, discards) become
        records."""
        chunks, self._chunks = self._chunks, []
        for evs in map(_in_time_order, chunks):  # each read is a part: no copy to join them
            bulk = np.isin(evs["kind"], BULK_KINDS)
            if bulk.all():
                self._bulk.append(evs)
                continue
            if bulk.any():
                self._bulk.append(evs[bulk])
            self._hold(self._decode_rare(evs[~bulk]))

    def _held_within(self, lo: int, hi: int) -> int:
        """How many held events lie in [lo, hi]."""
        n = sum(int(np.searchsorted(part["ts"], hi, side="right") - np.searchsorted(part["ts"], lo))
                for part in self._bulk)
        return n + (bisect.bisect_right(self._held, hi, key=_TS)
                    - bisect.bisect_left(self._held, lo, key=_TS))

    def _release_held(self, upto: int | None) -> Batch | None:
        """The held events up to `upto` (all: None) as a batch (now: upto), no longer held."""
        out, keep = [], []
        for part in self._bulk:
            n = len(part) if upto is None else int(np.searchsorted(part["ts"], upto, side="right"))
            if n:
                out.append(part[:n])
            if n < len(part):
                keep.append(part[n:])
        self._bulk = keep
        bulk = (np.zeros(0, dtype=EVENT) if not out else out[0] if len(out) == 1
                else _in_time_order(np.concatenate(out)))
        k = len(self._held) if upto is None else bisect.bisect_right(self._held, upto, key=_TS)
        listed, self._held = self._held[:k], self._held[k:]
        if upto is None:
            if not len(bulk) and not listed:
                return None
            upto = max(int(bulk["ts"][-1]) if len(bulk) else 0, listed[-1]["ts"] if listed else 0)
        return Batch(upto, listed, EventColumns(bulk, self._who, SRC))

    def _decode_rare(self, evs: np.ndarray) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for ts, _mm, pfn, addr, arg, arg2, kind, pid in evs.tolist():
            rec: dict[str, Any] = {"kind": "", "ts": ts, "src": SRC, **self._who(pid)}
            if kind == E_MERGE_FAIL:
                code = -((arg ^ (1 << 63)) - (1 << 63))
                rec.update(kind="merge_fail", reason=errno.errorcode.get(code, str(code)),
                           code=code, stage="zero page" if arg2 else "ksm page", pfn=pfn)
            elif kind in (E_SCAN_START, E_SCAN_END):
                rec.update(kind="scan_start" if kind == E_SCAN_START else "scan_end", seq=arg,
                           rmap_entries=arg2)
            elif kind == E_RELEASE:  # a punch hole's addr: where its file range is mapped, or 0
                punch = arg2 & 1
                rec.update(kind="reclaim_release", pages=arg,
                           discard="punch_hole" if punch else "madvise")
                if punch:
                    rec["offset"] = pfn
                out.extend({"kind": "unmerge", "ts": ts, "src": SRC, **self._who(pid),
                            "reason": "released", "addr": addr} for _ in range(arg2 >> 1))
            else:  # ksm_enter / ksm_exit: kept in the kernel's mm map, no record
                continue
            if addr:
                rec["addr"] = addr
            out.append(rec)
        return out

    def _counters(self, ts: int, counts: dict[str, int]) -> list[dict[str, Any]]:
        recs = [{"kind": "counters", "ts": ts, "src": SRC, "group": "ksm",
                 "values": read_ksm(self.roots)}]
        try:
            vmstat = read_vmstat(self.roots)
            recs.append({"kind": "counters", "ts": ts, "src": SRC, "group": "vmstat",
                         "values": {k: vmstat[k] for k in VMSTAT_KEYS if k in vmstat}})
        except OSError as e:
            self.warn(f"cannot read vmstat: {e.strerror}")
        recs.append({"kind": "counters", "ts": ts, "src": SRC, "group": "ksm_probes",
                     "values": counts})
        for pid in sorted(self.tracked):
            try:
                stat = read_ksm_stat(self.roots, pid)
            except OSError:
                continue
            if stat is not None:
                recs.append({"kind": "counters", "ts": ts, "src": SRC, "group": "ksm_stat",
                             **self._who(pid), "values": stat})
        return recs

    def _snapshot(self) -> Batch:
        """Events up to a time no event is close to (see SNAPSHOT_GUARD_NS), then `lost`
        records, then the counter records taken at that time."""
        if not self.stream:
            return self._tally_snapshot()
        for _ in range(SNAPSHOT_RETRIES):
            ts = time.monotonic_ns()
            counts = self.kernel_counts()
            counters = self._counters(ts, counts)
            after = time.monotonic_ns()
            self._drain(until_ns=after + SNAPSHOT_GUARD_NS)
            self._take_in()
            in_flight = self._held_within(ts - SNAPSHOT_GUARD_NS, after)
            if not in_flight:
                break
            time.sleep(SNAPSHOT_GUARD_NS / 1e9)
        self._hold(self._exits)
        self._exits = []
        batch = self._release_held(ts)
        batch.dict_records += self._lost(ts, counts) + _in_flight(counters, in_flight)
        self._last_ts = ts
        return batch

    def _tally_snapshot(self) -> Batch:
        """Without the stream: the tallies, SNAPSHOT_GUARD_NS later the counters, then the
        tallies again, retaken (at most SNAPSHOT_RETRIES times) until both tally reads are
        equal: no event came from SNAPSHOT_GUARD_NS before the counters until the tallies were
        read. Then the window's tallies hold exactly the events its counters moved by: none fell
        between the two reads, and the last one came early enough for the kernel counter it
        moves late (cow_ksm, at the fault's end) to have moved. (Comparing reads costs the
        probes nothing; a clock read per event cost ~40 ns.) The first snapshot's tallies
        (events since the probes attached) come before its counters: they are in the totals,
        and in the counters baseline."""
        for _ in range(SNAPSHOT_RETRIES):
            before = self.read_tallies()
            time.sleep(SNAPSHOT_GUARD_NS / 1e9)
            ts = time.monotonic_ns()
            counts = self.kernel_counts()
            counters = self._counters(ts, counts)
            tallies = self.read_tallies()
            if tallies == before:
                break
        in_flight = sum(n - before.get(key, 0) for key, n in tallies.items())
        counters = _in_flight(counters, in_flight)
        events, self._exits = self._exits, []  # vm_exit, taken before this snapshot
        # the window starts just after the previous snapshot: it comes after it in the log
        start = ts if self._last_ts is None else self._last_ts + 1
        events = self._tally_records(start, ts, tallies) + events
        if self._tally_gone:
            self._forget_tallies(self._tally_gone)
            self._tally_gone = set()
        self._last_ts = ts
        return Batch(ts, events + self._lost(ts, counts) + counters)

    def _hold(self, records: list[dict[str, Any]]) -> None:
        """Add decoded records (in time order) to the held ones, keeping those in time order."""
        if not records:
            return
        late = self._held and records[0]["ts"] < self._held[-1]["ts"]
        self._held.extend(records)
        if late:
            self._held.sort(key=_TS)

    def _lost(self, ts: int, counts: dict[str, int]) -> list[dict[str, Any]]:
        dropped = counts["dropped"] - self._last_dropped
        self._last_dropped = counts["dropped"]
        if not dropped:
            return []
        return [{"kind": "lost", "ts": ts, "src": SRC, "count": dropped,
                 "where": "ksm ring buffer", "why": "ring buffer full (reader too slow)"}]

    def batches(self, interval_ns: int, duration_ns: int | None) -> Iterator[Batch]:
        if interval_ns <= 0:
            raise ValueError("interval_ns must be > 0")
        self._refresh_fd_maps()
        first = self._snapshot()
        yield first
        next_at = first.now + interval_ns
        end = None if duration_ns is None else first.now + duration_ns
        while True:
            due = next_at if end is None else min(next_at, end)
            while not self.stopped and time.monotonic_ns() < due:
                if not self._consume():  # at the budget: more is waiting, no sleep
                    time.sleep(min(POLL_S, max(0.0, (due - time.monotonic_ns()) / 1e9)))
            last = self.stopped or (end is not None and time.monotonic_ns() >= end)
            if last:
                # Stopping (a signal may have come at any point, also while the previous
                # batch was being written): everything the kernel wrote until now goes into
                # the log, and the last counter snapshot is taken after it.
                self._drain(until_ns=time.monotonic_ns())
            self._refresh_tracked()
            self._refresh_fd_maps()
            yield self._snapshot()
            if last:
                break
            next_at += interval_ns
        self._drain(until_ns=time.monotonic_ns())
        self._take_in()
        rest = self._release_held(None)  # events after the last snapshot: still in the log
        if rest is not None:
            yield rest

    def close(self) -> None:
        ring = getattr(self, "_ring", None)
        if ring is not None:
            ring.close()
            self._ring = None
        bpf = getattr(self, "bpf", None)
        if bpf is not None:
            bpf.cleanup()
            self.bpf = None
