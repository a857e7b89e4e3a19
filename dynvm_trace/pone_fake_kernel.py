"""A fake patched kernel for CI: the emulated pone host behind the `Kernel` interface of the
pone source, so everything of `PoneSource` but the kprobe attach runs without the patched
kernel (issue 4, section 5).

What it stands in for, and how:
- the perf buffer: the emulated host's events (`EmulateSource`) turned into the binary
  `struct event` records probes/pone.c submits (sources.pone.RAW_EVENT), one per page as the
  probes fire, only for the events whose probe points were compiled in (the -DHAVE_* flags the
  source passed), and dropped past `capacity` records between two reads, counted as lost, the
  way a full perf buffer drops;
- the `counts` array: counted from the same records before any is dropped, as the programs do;
- /sys/kernel/mm/pone: the emulated tree the EmulateSource writes (a sysfs root under `workdir`);
- /proc: `kallsyms` (the recorded kernel's, fixtures/pone-virt_release/kallsyms-subset.txt, or
  another given) and, for each emulated VM, `PID/comm` and `PID/cmdline` with `-name VM`.

Time is the emulated clock: `wait_until` runs the emulated host up to the deadline.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .emulator.scenario import Scenario
from .paths import Roots
from .pone_threads import PF_KTHREAD, WORKERS_GROUP
from .sources import pone as ps
from .sources.base import Batch
from .sources.emulate import EmulateSource

STEP_NS = 100_000_000  # the emulated host runs in steps of this much emulated time

# Which probe points (-DHAVE_<SYMBOL>) an event kind needs to be produced at all.
NEEDS: dict[str, tuple[str, ...]] = {
    "merge": ("change_reverse_ref",),
    "cow_break": ("handle_mm_fault", "pone_slice_can_reuse", "pone_slice_dec_mapcount_process",
                  "pone_slice_alloc_process", "delete_sd_tree"),
    "unmerge": ("delete_sd_tree",),
    "reclaim_release": ("process_virt_page_release",),
    "reclaim_refault": ("handle_mm_fault", "pone_slice_can_reuse",
                        "pone_slice_dec_mapcount_process"),
    "scan_start": ("msleep",),
    "scan_end": ("msleep",),
    "vm_start": ("mem_pool_reg",),
    "vm_exit": ("delete_mm_in_pool",),
    "reclaim_report": ("virt_mark_page_release",),
}
_DEFINE = re.compile(r"-D(\w+)(?:=(.*))?")


class FakeKernel:
    """The `Kernel` of sources.pone, fed by an emulated host running `scenario`."""

    clock = "emulated"

    def __init__(self, scenario: Scenario, workdir: str | Path, kallsyms: str | Path,
                 seed: int = 1, capacity: int | None = None, dialect: str | None = None):
        workdir = Path(workdir)
        self.roots = Roots(sysfs=workdir / "sys", proc=workdir / "proc")
        self.emulate = EmulateSource(scenario, seed=seed, dialect=dialect,
                                     sysfs_root=self.roots.sysfs)
        self.page_size = scenario.page_size
        self.capacity = capacity
        proc = self.roots.proc
        proc.mkdir(parents=True, exist_ok=True)
        (proc / "kallsyms").write_bytes(Path(kallsyms).read_bytes())
        for vm in scenario.vms:
            d = proc / str(vm.pid)
            d.mkdir(exist_ok=True)
            (d / "comm").write_text(vm.comm + "\n")
            (d / "cmdline").write_bytes(b"\0".join([b"qemu-system-x86_64", b"-name",
                                                    vm.name.encode(), b""]))
        self.have: set[str] = set()
        self.release_merge_page = 0
        self.attached: list[tuple[str, str, str, int]] = []
        self._batches: Iterator[Batch] | None = None
        self._now = 0  # the latest time seen: a batch's `now` or an event after it
        self._batch_now = 0
        self._done = False
        self._raw: list[np.ndarray] = []
        self._pending = 0
        self._lost = 0
        self._counts = [0] * len(ps.COUNTERS)

    # --- Kernel -----------------------------------------------------------------------------

    def load(self, text: str, flags: list[str]) -> None:
        if "BPF_PERF_OUTPUT(events)" not in text:
            raise ValueError("not probes/pone.c")
        for flag in flags:
            m = _DEFINE.fullmatch(flag)
            if m is None:
                continue
            if m[1].startswith("HAVE_"):
                self.have.add(m[1][5:].lower())
            elif m[1] == "RELEASE_MERGE_PAGE":
                self.release_merge_page = int(m[2].removesuffix("ULL"), 0)
        self._batches = self.emulate.batches(STEP_NS, None)

    def attach(self, program: str, hook: str, event: str, offset: int) -> None:
        self.attached.append((program, hook, event, offset))

    def wait_until(self, deadline_ns: int) -> bool:
        while not self._done and self._batch_now + STEP_NS <= deadline_ns:
            batch = next(self._batches, None)
            if batch is None:
                self._done = True
                break
            self._feed(batch.records)
            self._batch_now = batch.now
            self._now = max(self._now, batch.now)
        return not self._done

    def stop(self) -> None:
        self._done = True

    def take(self) -> tuple[bytes, int]:
        raw = b"".join(a.tobytes() for a in self._raw)
        lost = self._lost
        self._raw, self._pending, self._lost = [], 0, 0
        return raw, lost

    def counts(self) -> list[int]:
        return list(self._counts)

    def now(self) -> int:
        return self._now

    def anchor(self) -> tuple[int, int | None]:
        return 0, None

    def close(self) -> None:
        if self._batches is not None:
            self._batches.close()

    # --- the emulated host's records as the probes would submit them ----------------------------

    def _feed(self, records: list[dict[str, Any]]) -> None:
        rows: list[tuple[int, ...]] = []
        for rec in records:
            kind = rec["kind"]
            self._now = max(self._now, rec["ts"])
            if kind == "counters" and rec["group"] == WORKERS_GROUP:
                self._threads(rec["values"])
            if kind == "vm_exit":  # the released pages it still had: unmapped at exit
                self._count("released_unmapped", rec.get("released", 0))
            needs = NEEDS.get(kind)
            if needs is None or not all(n in self.have for n in needs):
                continue
            if kind == "reclaim_refault" and not self.release_merge_page:
                continue
            rows += self._rows(rec)
        if not rows:
            return
        arr = np.array(rows, dtype=ps.RAW_EVENT)
        for kind, name in ((ps.E_MERGE, "merge"), (ps.E_COW, "cow_break"),
                           (ps.E_UNMERGE, "unmerge"), (ps.E_REFAULT, "refault"),
                           (ps.E_SCAN_START, "scan_cycles"), (ps.E_POOL_REG, "pool_registered"),
                           (ps.E_VM_EXIT, "vm_exit")):
            self._count(name, int(np.count_nonzero(arr["kind"] == kind)))
        release = arr[arr["kind"] == ps.E_RELEASE]
        for code, name in ((0, "released"), (1, "release_retry"), (2, "release_failed")):
            self._count(name, int(np.count_nonzero(release["code"] == code)))
        guest = arr[arr["kind"] == ps.E_GUEST_MARK]
        self._count("guest_marked", int(np.count_nonzero(guest["code"] == 0)))
        self._count("guest_mark_failed", int(np.count_nonzero(guest["code"] != 0)))
        if self.capacity is not None:
            room = max(0, self.capacity - self._pending)
            self._lost += max(0, len(arr) - room)
            arr = arr[:room]
        self._pending += len(arr)
        self._raw.append(arr)

    def _threads(self, workers: dict[str, int]) -> None:
        """The emulated pone kernel threads as /proc/PID/stat files of kernel threads, so the
        source lists them the way it does on a host (a crashed worker's directory goes)."""
        for name, pid in workers.items():
            d = self.roots.proc / str(pid)
            d.mkdir(exist_ok=True)
            (d / "stat").write_text(f"{pid} ({name}) S 2 0 0 0 -1 {PF_KTHREAD} 0 0 0 0\n")
        alive = {str(pid) for pid in workers.values()}
        for d in self.roots.proc.iterdir():
            if d.name.isdigit() and (d / "stat").exists() and d.name not in alive:
                (d / "stat").unlink()
                if not any(d.iterdir()):
                    d.rmdir()

    def _count(self, name: str, n: int) -> None:
        self._counts[ps.C[name]] += n

    def _rows(self, rec: dict[str, Any]) -> list[tuple[int, ...]]:
        """(ts, pfn, pfn2, addr, code, kind, pid, tid, aux) rows of one emulator record."""
        kind, ts = rec["kind"], rec["ts"]
        pid = rec.get("pid", 0)
        attributed = "change_reverse_ref_one" in self.have and "handle_mm_fault" in self.have
        if kind == "merge":
            return [(ts, rec["pfn"], rec["old_pfn"], rec["addr"] if attributed else 0, 0,
                     ps.E_MERGE, pid if attributed else 0, 0, 0)]
        if kind == "cow_break":
            return [(ts, rec["pfn"], rec["new_pfn"], rec["addr"], 0, ps.E_COW, pid, 0, 0)]
        if kind == "unmerge":
            return [(ts, rec["pfn"], 0, 0, 0, ps.E_UNMERGE, pid, 0, 0)]
        if kind == "reclaim_release":  # one probe return per page of the run
            code = ps.RELEASE_CODE[rec.get("status", "released")]
            return [(ts, rec.get("pfn", 0) + i, 0, 0, code, ps.E_RELEASE, 0, 0, 0)
                    for i in range(rec["pages"])]
        if kind == "reclaim_refault":
            return [(ts, 0, 0, rec["addr"] + i * self.page_size, 0, ps.E_REFAULT, pid, 0, 0)
                    for i in range(rec["pages"])]
        if kind in ("scan_start", "scan_end"):
            return [(ts, 0, 0, 0, 0, ps.E_SCAN_START if kind == "scan_start" else ps.E_SCAN_END,
                     0, 0, rec["seq"])]
        if kind == "vm_start":
            return [(ts, 0, 0, 0, 0, ps.E_POOL_REG, pid, 0, 0)]
        if kind == "vm_exit":
            return [(ts, 0, 0, 0, 0, ps.E_VM_EXIT, pid, 0, 0)]
        # reclaim_report: the guest's pages, one probe return per page (no frame numbers
        # in the emulated record)
        return [(ts, 0, 0, 0, 0 if rec.get("ok", True) else -1, ps.E_GUEST_MARK, 0, 0, 0)
                for _ in range(rec["pages"])]
