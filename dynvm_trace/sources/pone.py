"""The `pone` source: the patched Linux 4.4.1 kernel (Dynamic VM) traced live with bcc kprobes
(probes/pone.c), with /sys/kernel/mm/pone as the counter truth.

The source is split from the kernel it traces. `PoneSource` does everything that does not need
the patched kernel: the availability checks, resolving the probe points against kallsyms
(`pone_probes.resolve`), choosing the programs and their -D flags, polling the sysfs tree,
decoding the perf buffer records (`decode_events`, the one decoder), `lost` records, and the
in-kernel counters. A `Kernel` does the rest: `BccKernel` compiles, attaches and reads the perf
buffer with bcc; `pone_fake_kernel.FakeKernel` stands in for it in CI, fed by the emulated host,
producing the same binary records.

Every interval the source yields the events up to the snapshot time, then `lost` records, then
the counter records of that time: group `pone_info` (and `pone_abstract` in the guide dialect)
from sysfs, and `pone_probes` (the in-kernel event counters, the totals whatever the stream
lost). Events are per page, timestamps are CLOCK_MONOTONIC (bpf_ktime_get_ns).
"""

from __future__ import annotations

import ctypes
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import exitcodes, pone_probes, pone_sysfs
from ..bpf_host import import_bcc
from ..logfile import make_header
from ..paths import Roots, page_size
from ..pone_threads import list_pone_threads, workers_record
from ..procfs import read_comm
from ..symbols import SymbolsUnavailable, SymbolTable, read_kallsyms
from ..vms import PONE_COMM, vm_name
from .base import Batch, Source, SourceUnavailable

SRC = "pone"
SPDEAMON_COMM = "spdeamon"
# Linux 4.4 x86-64 maps struct page array at this fixed address (vmemmap randomisation came
# with CONFIG_RANDOMIZE_MEMORY in 4.8).
VMEMMAP_BASE = 0xFFFFEA0000000000
# A unique text symbol to attach duplicated names by address: "_text+offset".
ADDRESS_BASE = "_text"
MAX_THREADS = 16384
MAX_MMS = 4096
PERF_PAGES = 1024  # per CPU: 4 MiB, ~75,000 records before the buffer drops
SNAPSHOT_GUARD_NS = 2_000_000
SNAPSHOT_RETRIES = 10
POLL_MS = 20

# Index order of the `counts` map: keep in step with the enum in probes/pone.c.
COUNTERS = ("merge", "merge_fail_change_ref", "merge_fail_tree_insert",
            "merge_fail_write_protect", "tree_new", "tree_duplicate", "cow_break", "unmerge",
            "released", "release_retry", "release_failed", "refault", "released_unmapped",
            "scan_cycles", "pool_registered", "pool_register_failed", "vm_exit", "guest_marked",
            "guest_mark_failed", "guest_alloc", "unresolved_mm", "stash_full")
C = {name: i for i, name in enumerate(COUNTERS)}

# Event kinds of probes/pone.c (struct event's `kind`).
E_MERGE, E_MERGE_FAIL, E_COW, E_UNMERGE, E_RELEASE, E_REFAULT, E_SCAN_START, E_SCAN_END, \
    E_POOL_REG, E_VM_EXIT, E_GUEST_MARK = range(1, 12)
STAGES = {1: "change_ref", 2: "tree_insert", 3: "write_protect"}
CHANGE_REF_ERRORS = {1: "rmap walk or page status error", 2: "page lock not taken"}
RELEASE_STATUS = {0: "released", 1: "retry", 2: "failed"}
RELEASE_CODE = {v: k for k, v in RELEASE_STATUS.items()}

# struct event of probes/pone.c, byte for byte.
RAW_EVENT = np.dtype([("ts", "<u8"), ("pfn", "<u8"), ("pfn2", "<u8"), ("addr", "<u8"),
                      ("code", "<i8"), ("kind", "<u4"), ("pid", "<u4"), ("tid", "<u4"),
                      ("aux", "<u4")])

ENTRY, RETURN = pone_probes.ENTRY, pone_probes.RETURN
# What probes/pone.c attaches: symbol -> hooks. Programs are named on_<symbol> (entry) and
# on_<symbol>_ret (return); each is compiled in only with -DHAVE_<SYMBOL>.
ATTACH: dict[str, tuple[str, ...]] = {
    "handle_mm_fault": (ENTRY,),
    "change_reverse_ref": (ENTRY, RETURN),
    "change_reverse_ref_one": (ENTRY,),
    "insert_sd_tree": (ENTRY, RETURN),
    "make_slice_wprotect": (ENTRY, RETURN),
    "pone_slice_can_reuse": (RETURN,),
    "pone_slice_dec_mapcount_process": (ENTRY,),
    "pone_slice_alloc_process": (ENTRY,),
    "delete_sd_tree": (ENTRY, RETURN),
    "process_virt_page_release": (ENTRY, RETURN),
    "mem_pool_reg": (ENTRY, RETURN),
    "delete_mm_in_pool": (ENTRY,),
    "msleep": (ENTRY, RETURN),
    "virt_mark_page_release": (ENTRY, RETURN),
    "virt_mark_page_alloc": (ENTRY,),
}
# Probe points of the table that the program leaves alone, and why.
NOT_ATTACHED = {
    "pone_slice_free_check_process": "not attached: fires for every page freed on the host, "
                                     "and delete_sd_tree already gives the merged pages removed",
    "is_virt_page_release": "not attached: process_virt_page_release's return gives every "
                            "release attempt with its result",
}
RELEASE_MERGE_PAGE = "release_merge_page"


def program_name(symbol: str, hook: str) -> str:
    return f"on_{symbol}" + ("_ret" if hook == RETURN else "")


def probe_text() -> str:
    return resources.files("dynvm_trace.probes").joinpath("pone.c").read_text()


def comm_words(comm: str) -> tuple[int, int]:
    """A comm as the two little-endian u64 words bpf_get_current_comm fills (zero padded)."""
    raw = comm.encode()[:15].ljust(16, b"\0")
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def cflags(have: set[str], release_merge_page: int | None,
           vmemmap_base: int = VMEMMAP_BASE) -> list[str]:
    """The -D flags of probes/pone.c for the probe points in `have`."""
    q0, q1 = comm_words(PONE_COMM)
    s0, s1 = comm_words(SPDEAMON_COMM)
    flags = [f"-DHAVE_{sym.upper()}" for sym in sorted(have)]
    flags += [f"-DRELEASE_MERGE_PAGE={release_merge_page or 0:#x}ULL",
              f"-DVMEMMAP_BASE={vmemmap_base:#x}ULL",
              f"-DQEMU_COMM0={q0:#x}ULL", f"-DQEMU_COMM1={q1:#x}ULL",
              f"-DSPDEAMON_COMM0={s0:#x}ULL", f"-DSPDEAMON_COMM1={s1:#x}ULL",
              f"-DMAX_THREADS={MAX_THREADS}", f"-DMAX_MMS={MAX_MMS}",
              # bcc picks BPF_F_CURRENT_CPU (4.8) from the headers' version; the CPU number
              # works on every kernel, 4.4 included.
              "-DCUR_CPU_IDENTIFIER=bpf_get_smp_processor_id()"]
    return flags


# --- decoding: the one path from perf buffer bytes to records ---------------------------------

Who = Callable[[int], dict[str, Any]]


def decode_events(raw: bytes, who: Who, src: str = SRC) -> list[dict[str, Any]]:
    """Records (events.py) from concatenated `struct event`s, in time order.

    `who(pid)` gives the pid/comm/vm fields of a process ({} for pid 0).
    """
    if not raw:
        return []
    evs = np.frombuffer(raw, dtype=RAW_EVENT)
    evs = evs[np.argsort(evs["ts"], kind="stable")]
    out: list[dict[str, Any]] = []
    for ts, pfn, pfn2, addr, code, kind, pid, tid, aux in evs.tolist():
        rec: dict[str, Any] = {"kind": "", "ts": ts, "src": src, **who(pid)}
        if kind == E_MERGE:
            rec.update(kind="merge", pfn=pfn, old_pfn=pfn2)
        elif kind == E_MERGE_FAIL:
            stage = STAGES.get(aux, str(aux))
            if stage == "change_ref":
                reason = CHANGE_REF_ERRORS.get(code, f"error {code}")
            elif stage == "tree_insert":
                reason = "tree insert returned NULL"
            else:
                reason = f"write protect failed ({code})"
            rec.update(kind="merge_fail", reason=reason, stage=stage, code=code, pfn=pfn)
        elif kind == E_COW:
            rec.update(kind="cow_break", pfn=pfn, new_pfn=pfn2)
        elif kind == E_UNMERGE:
            rec.update(kind="unmerge", reason="unmap", pfn=pfn)
        elif kind == E_RELEASE:
            rec.update(kind="reclaim_release", pages=1, status=RELEASE_STATUS.get(code, str(code)))
            if pfn:
                rec["pfn"] = pfn
        elif kind == E_REFAULT:
            rec.update(kind="reclaim_refault", pages=1)
        elif kind == E_SCAN_START:
            rec.update(kind="scan_start", seq=aux)
        elif kind == E_SCAN_END:
            rec.update(kind="scan_end", seq=aux, sleep_ms=code)
        elif kind == E_POOL_REG:
            rec.update(kind="vm_start", pool=True)
        elif kind == E_VM_EXIT:
            rec.update(kind="vm_exit")
        elif kind == E_GUEST_MARK:
            rec.update(kind="reclaim_report", pages=1, gfns=[pfn], ok=code == 0)
        else:
            continue  # a kind this decoder does not know: a newer probes/pone.c
        if addr:
            rec["addr"] = addr
        if tid:
            rec["tid"] = tid
        out.append(rec)
    return out


# --- the kernel side ---------------------------------------------------------------------------

class Kernel(Protocol):
    """What PoneSource needs from the traced kernel (BccKernel, or the fake one in CI)."""

    clock: str  # the header's clock of every ts

    def load(self, text: str, flags: list[str]) -> None:
        """Compile and load the programs."""

    def attach(self, program: str, hook: str, event: str, offset: int) -> None:
        """Attach `program` at `event`+`offset` (entry) or at `event`'s return. Raises
        OSError when the kernel refuses."""

    def wait_until(self, deadline_ns: int) -> bool:
        """Collect records until `deadline_ns` on the kernel's clock (or stop()); False
        when the kernel has nothing more to give (the fake's end)."""

    def stop(self) -> None:
        """Make a wait_until in progress return soon."""

    def take(self) -> tuple[bytes, int]:
        """The records collected since the last take, and how many the buffer dropped."""

    def counts(self) -> list[int]:
        """The in-kernel counters, in COUNTERS order."""

    def now(self) -> int:
        """The current time on the kernel's clock."""

    def anchor(self) -> tuple[int, int | None]:
        """(a time on the kernel's clock, the wall clock ns then) for the header."""

    def close(self) -> None:
        ...


class BccKernel:
    """The running kernel, through bcc: kprobes, the counts array and the perf buffer."""

    clock = "monotonic"

    def __init__(self, perf_pages: int = PERF_PAGES):
        self.bcc = import_bcc()
        self.perf_pages = perf_pages
        self.bpf = None
        self._raw: list[bytes] = []
        self._lost = 0
        self._stopped = False

    def load(self, text: str, flags: list[str]) -> None:
        self.bpf = self.bcc.BPF(text=text.encode(), cflags=flags)
        self.bpf["events"].open_perf_buffer(self._on_event, page_cnt=self.perf_pages,
                                            lost_cb=self._on_lost)

    def _on_event(self, cpu, data, size) -> None:  # noqa: ARG002 - bcc's callback signature
        self._raw.append(ctypes.string_at(data, size))

    def _on_lost(self, n: int) -> None:
        self._lost += n

    def attach(self, program: str, hook: str, event: str, offset: int) -> None:
        try:
            if hook == ENTRY:
                self.bpf.attach_kprobe(event=event.encode(), event_off=offset,
                                       fn_name=program.encode())
            else:
                self.bpf.attach_kretprobe(event=event.encode(), fn_name=program.encode())
        except Exception as e:  # bcc raises a bare Exception
            raise OSError(str(e)) from e

    def wait_until(self, deadline_ns: int) -> bool:
        while not self._stopped:
            left_ms = (deadline_ns - time.monotonic_ns()) // 1_000_000
            if left_ms <= 0:
                break
            self.bpf.perf_buffer_poll(timeout=min(POLL_MS, left_ms))
        self.bpf.perf_buffer_poll(timeout=0)
        return True

    def stop(self) -> None:
        self._stopped = True

    def take(self) -> tuple[bytes, int]:
        self.bpf.perf_buffer_poll(timeout=0)
        raw, lost = b"".join(self._raw), self._lost
        self._raw, self._lost = [], 0
        return raw, lost

    def counts(self) -> list[int]:
        table = self.bpf["counts"]
        return [int(table[table.Key(i)].value) for i in range(len(COUNTERS))]

    def now(self) -> int:
        return time.monotonic_ns()

    def anchor(self) -> tuple[int, int | None]:
        return time.monotonic_ns(), time.time_ns()

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


# --- availability ------------------------------------------------------------------------------

def headers_dir() -> Path:
    return Path("/lib/modules") / platform.release() / "build"


def kprobe_events(roots: Roots) -> Path | None:
    for d in (roots.sys("kernel", "debug", "tracing"), roots.sys("kernel", "tracing")):
        if (d / "kprobe_events").exists():
            return d / "kprobe_events"
    return None


def why_unavailable(roots: Roots, symbols: SymbolTable | None) -> tuple[str, str, int] | None:
    """Why the live pone source cannot run here, as (what is missing, the fix, exit code), or
    None when it can; checked in order: the patched kernel, root, bcc, kprobes, headers."""
    guest = symbols is not None and pone_probes.GUEST in pone_probes.detect_sides(symbols)
    if pone_sysfs.detect_dialect(roots) is None and not guest:
        return (f"{roots.pone_dir} not found and no ppr guest symbols: this kernel does not have "
                "the Dynamic VM patch", "boot the patched kernel (CONFIG_PONE_MODULE on the host, "
                "CONFIG_PPR_MODULE in a guest)", exitcodes.MISSING_FEATURE)
    if os.geteuid() != 0:
        return ("not root: kprobes and kallsyms addresses need root", "run as root (sudo)",
                exitcodes.NOT_PERMITTED)
    try:
        import_bcc()
    except (ImportError, OSError) as e:
        return f"cannot import bcc ({e})", "apt-get install python3-bpfcc", exitcodes.MISSING_FEATURE
    if kprobe_events(roots) is None:
        return ("no kprobe_events in tracefs: CONFIG_KPROBES off or tracefs not mounted",
                "mount -t debugfs none /sys/kernel/debug (a kernel with CONFIG_KPROBES=y)",
                exitcodes.MISSING_FEATURE)
    if not (headers_dir() / "include").is_dir():
        return (f"{headers_dir()} missing: bcc compiles the probes against the running kernel's "
                "headers", f"install the headers of {platform.release()} at {headers_dir()}",
                exitcodes.MISSING_FEATURE)
    return None


def check_available(roots: Roots, symbols: SymbolTable | None) -> None:
    """Raise SourceUnavailable (one line with the fix, and the exit code) when
    why_unavailable has a reason."""
    reason = why_unavailable(roots, symbols)
    if reason is not None:
        what, fix, code = reason
        raise SourceUnavailable(f"pone source unavailable: {what}; fix: {fix}", code)


# --- the source --------------------------------------------------------------------------------

@dataclass
class Plan:
    """Which programs to attach where, and what cannot be traced."""

    have: set[str] = field(default_factory=set)
    attach: list[tuple[str, str, str, int]] = field(default_factory=list)  # program, hook, event, off
    skipped: list[str] = field(default_factory=list)  # one line per probe point not attached
    unavailable: list[str] = field(default_factory=list)  # events it would have given
    release_merge_page: int | None = None


def plan_probes(resolutions: list[pone_probes.Resolution], symbols: SymbolTable) -> Plan:
    """The attachments for the resolved probe points: by name when the name is unique, by
    address (ADDRESS_BASE+offset) when it is not; skipped ones with the reason."""
    plan = Plan()
    text_base = [s.address for s in symbols.lookup(ADDRESS_BASE) if s.is_text]

    def skip(r: pone_probes.Resolution, why: str) -> None:
        plan.skipped.append(f"{r.symbol}: {why}")
        plan.unavailable += [g for g in (r.point.gives if r.point else ()) if g not in plan.unavailable]

    for r in resolutions:
        if r.point is None:  # a known trap, not a probe point
            plan.skipped.append(f"{r.symbol}: {r.detail}")
            continue
        if r.symbol == RELEASE_MERGE_PAGE:
            if r.usable and len(r.addresses) == 1:
                plan.release_merge_page = r.addresses[0]
            else:
                skip(r, r.detail or "needs its one address")
            continue
        if r.symbol in NOT_ATTACHED:
            plan.skipped.append(f"{r.symbol}: {NOT_ATTACHED[r.symbol]}")
            continue
        hooks = ATTACH.get(r.symbol)
        if hooks is None:
            plan.skipped.append(f"{r.symbol}: no program for it in probes/pone.c")
            continue
        if not r.usable:
            skip(r, r.detail)
            continue
        if not r.attach_by_address:
            plan.have.add(r.symbol)
            plan.attach += [(program_name(r.symbol, h), h, r.symbol, 0) for h in hooks]
            continue
        if RETURN in hooks:
            skip(r, f"{len(r.addresses)} symbols of this name and bcc 0.26 attaches return "
                 "probes by name only")
            continue
        if len(text_base) != 1:
            skip(r, f"{len(r.addresses)} symbols of this name, and no {ADDRESS_BASE} address "
                 "to attach them by address")
            continue
        plan.have.add(r.symbol)
        plan.attach += [(program_name(r.symbol, ENTRY), ENTRY, ADDRESS_BASE, a - text_base[0])
                        for a in r.addresses]
    return plan


class PoneSource(Source):
    name = SRC

    def __init__(self, roots: Roots, kernel: Kernel | None = None,
                 warn: Callable[[str], None] | None = None, page_size_: int | None = None):
        """The live source on `roots`. Without `kernel` it checks this host and traces it
        with bcc; with one (the fake kernel in CI), the host checks are left out."""
        super().__init__()
        self.roots = roots
        self.warn = warn or (lambda msg: None)
        try:
            symbols: SymbolTable | None = read_kallsyms(roots)
        except SymbolsUnavailable as e:
            symbols = None
            symbols_problem = str(e)
        if kernel is None:
            check_available(roots, symbols)
        if symbols is None:
            raise SourceUnavailable(f"pone source unavailable: {symbols_problem}; fix: run as "
                                    "root on the traced kernel", exitcodes.MISSING_FEATURE)
        self.dialect = pone_sysfs.detect_dialect(roots)
        self.sides, resolutions = pone_probes.resolve_for_kernel(symbols)
        self.plan = plan_probes(resolutions, symbols)
        if not self.plan.have:
            raise SourceUnavailable("pone source unavailable: none of the probe points of "
                                    f"{', '.join(self.sides)} found in {symbols.describe()}; "
                                    "fix: run `dynvm-trace doctor --source pone`",
                                    exitcodes.MISSING_FEATURE)
        self.kernel: Kernel = kernel if kernel is not None else BccKernel()
        self.page_size = page_size_ or page_size()
        self.kernel.load(probe_text(), cflags(self.plan.have, self.plan.release_merge_page))
        self.attached: list[str] = []
        for program, hook, event, offset in self.plan.attach:
            where = f"{event}+{offset:#x}" if offset else event
            try:
                self.kernel.attach(program, hook, event, offset)
                self.attached.append(f"{program} at {where}")
            except OSError as e:
                self.plan.skipped.append(f"{program} at {where}: attach failed: {e}")
        for line in self.plan.skipped:
            self.warn(f"probe point {line}")
        if self.plan.unavailable:
            self.warn(f"unavailable on this kernel: {', '.join(self.plan.unavailable)}")
        self._anchor = self.kernel.anchor()
        self._who_cache: dict[int, dict[str, Any]] = {}
        self._workers_seen = False  # spthrd_*/spdeamon threads were listed once
        self._held: list[dict[str, Any]] = []

    def header(self) -> dict[str, Any]:
        return make_header(SRC, clock=self.kernel.clock, page_size=self.page_size,
                           anchor_ts=self._anchor[0], anchor_unix_ns=self._anchor[1],
                           dialect=self.dialect, sides=list(self.sides),
                           probes=self.attached, skipped=self.plan.skipped,
                           unavailable=self.plan.unavailable)

    def _who(self, pid: int) -> dict[str, Any]:
        if not pid:
            return {}
        who = self._who_cache.get(pid)
        if who is None:
            who = {"pid": pid}
            comm = read_comm(self.roots, pid)
            if comm:
                who["comm"] = comm
                try:
                    who["vm"] = vm_name(self.roots.procfs(str(pid), "cmdline").read_bytes(), pid)
                except OSError:
                    pass
                self._who_cache[pid] = who  # a process that is gone is looked up again
        return who

    def _counters(self, ts: int, counts: list[int]) -> list[dict[str, Any]]:
        snap = pone_sysfs.read_pone(self.roots)
        for reason in snap.reasons:
            self.warn(f"pone sysfs: {reason}")
        recs = []
        if snap.info:
            recs.append({"kind": "counters", "ts": ts, "src": SRC, "group": "pone_info",
                         "values": snap.info})
        if snap.abstract:
            recs.append({"kind": "counters", "ts": ts, "src": SRC, "group": "pone_abstract",
                         "values": snap.abstract})
        recs.append({"kind": "counters", "ts": ts, "src": SRC, "group": "pone_probes",
                     "values": dict(zip(COUNTERS, counts))})
        threads = list_pone_threads(self.roots.proc)
        if threads or self._workers_seen:  # the alerts see a worker that is gone
            self._workers_seen = True
            recs.insert(0, workers_record(ts, SRC, threads))
        return recs

    def _snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        """Events up to the snapshot time, `lost`, then the counters of that time.

        A probe fires after (kretprobe) or around the kernel's own counter update, so an event
        stamped just after the snapshot may already be in the counters: the snapshot is
        retaken while an event lies within SNAPSHOT_GUARD_NS after it."""
        lost = 0
        for _ in range(SNAPSHOT_RETRIES):
            ts = self.kernel.now()
            counters = self._counters(ts, self.kernel.counts())
            raw, dropped = self.kernel.take()
            lost += dropped
            self._held += decode_events(raw, self._who)
            if not any(ts < r["ts"] <= ts + SNAPSHOT_GUARD_NS for r in self._held):
                break
            self.kernel.wait_until(ts + SNAPSHOT_GUARD_NS)
        self._held.sort(key=lambda r: r["ts"])
        n = next((i for i, r in enumerate(self._held) if r["ts"] > ts), len(self._held))
        events, self._held = self._held[:n], self._held[n:]
        if lost:
            events.append({"kind": "lost", "ts": ts, "src": SRC, "count": lost,
                           "where": "pone perf buffer",
                           "why": "perf buffer full (reader too slow); pone_probes counts all"})
        return ts, events + counters

    def batches(self, interval_ns: int, duration_ns: int | None = None) -> Iterator[Batch]:
        if interval_ns <= 0:
            raise ValueError("interval_ns must be > 0")
        start, records = self._snapshot()
        yield Batch(start, records)
        end = None if duration_ns is None else start + duration_ns
        due = start
        more = True
        while more and not self.stopped:
            due += interval_ns
            if end is not None:
                due = min(due, end)
            more = self.kernel.wait_until(due)
            ts, records = self._snapshot()
            yield Batch(ts, records)
            if end is not None and ts >= end:
                break
        if self._held:  # events after the last snapshot: still part of the log
            held, self._held = self._held, []
            yield Batch(held[-1]["ts"], held)

    def stop(self) -> None:
        super().stop()
        self.kernel.stop()

    def close(self) -> None:
        self.kernel.close()
