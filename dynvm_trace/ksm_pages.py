"""Which pages of a process are KSM pages right now: /proc/PID/smaps (the VMAs KSM may merge
in), /proc/PID/pagemap (the PFN behind each page) and /proc/kpageflags (KPF_KSM of each PFN).

The ksm source seeds its merged page sets with these at attach time (sources/ksm.py), so the
COW breaks of pages merged before tracing started are recognised too. The parsers are pure
functions of the files' text or bytes; `KsmPageFinder` reads the files through `Roots`.

What is read here needs root with CAP_SYS_ADMIN: /proc/kpageflags is readable by root only,
and pagemap shows every PFN as 0 to a reader without CAP_SYS_ADMIN (since Linux 4.2; checked
here: root without it still opens kpageflags, but sees no PFNs). A kernel without
CONFIG_PROC_PAGE_MONITOR has neither file. `KsmPageFinder` raises `PagesUnreadable` with a
one-line reason for each of these.
"""

from __future__ import annotations

import os

import numpy as np

from .paths import Roots
from .procfs import Mapping, parse_maps

PAGEMAP_PRESENT = np.uint64(1 << 63)
PAGEMAP_PFN = np.uint64((1 << 55) - 1)  # bits 0-54 of a present page's entry
KPF_KSM = np.uint64(1 << 21)
ENTRY = 8  # bytes per pagemap or kpageflags entry (little-endian u64)
# pagemap is read this many pages at a time (8 MiB reads: a VM has millions of pages), and
# kpageflags in aligned windows of this many PFNs (128 KiB reads), each read at most once.
PAGEMAP_SLICE = 1 << 20
KPF_WINDOW = 1 << 14


class PagesUnreadable(Exception):
    """The KSM pages of processes cannot be found on this host; str() says why, in a line."""


def parse_mergeable_ranges(text: str, merge_any: bool = False) -> list[tuple[int, int]]:
    """The [start, end) address ranges of the VMAs in a /proc/PID/smaps that KSM may merge
    in: VmFlags has `mg` (MADV_MERGEABLE, or set by the kernel under PR_SET_MEMORY_MERGE).
    With `merge_any` (ksm_stat's `ksm_merge_any: yes`) every anonymous private VMA as well,
    flag or not. A VMA cut off before its VmFlags line counts only by that second rule;
    lines that are neither a VMA nor its VmFlags are skipped."""
    ranges: list[tuple[int, int]] = []
    vma: Mapping | None = None  # the VMA whose VmFlags line is still to come
    for line in text.splitlines():
        if line.startswith("VmFlags:"):
            if vma and "mg" in line.split()[1:]:
                ranges.append((vma.start, vma.end))
            vma = None
            continue
        # a VMA's first line is a /proc/PID/maps line; its fields ("Rss:   8 kB", ...) follow
        header = parse_maps(line)
        if header:
            vma = header[0]
            if merge_any and not vma.shared and not vma.inode:
                ranges.append((vma.start, vma.end))
                vma = None
    return ranges


def present_pfns(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The entries of pagemap bytes whose page is present: their indices (pages from where
    the read started) and PFNs (0 when the reader lacks CAP_SYS_ADMIN). A trailing partial
    entry is ignored."""
    entries = np.frombuffer(data, dtype="<u8", count=len(data) // ENTRY)
    index = np.flatnonzero(entries & PAGEMAP_PRESENT)
    return index, entries[index] & PAGEMAP_PFN


def ksm_flags(data: bytes) -> np.ndarray:
    """Which entries of /proc/kpageflags bytes have KPF_KSM (a bool per PFN); a trailing
    partial entry is ignored."""
    flags = np.frombuffer(data, dtype="<u8", count=len(data) // ENTRY)
    return (flags & KPF_KSM) != 0


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Up to `size` bytes at `offset`: fewer only where the file ends (pagemap ends at the
    top of the user address space, kpageflags at the highest PFN)."""
    parts = []
    while size > 0:
        data = os.pread(fd, size, offset)
        if not data:
            break
        parts.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(parts)


class KsmPageFinder:
    """Finds the KSM pages of processes. Opens /proc/kpageflags once and reads each window
    of it at most once: KSM pages are shared between processes, and a VM's PFNs are
    scattered over the host's memory."""

    def __init__(self, roots: Roots, page_size: int):
        self.roots = roots
        self.page_shift = page_size.bit_length() - 1
        path = roots.procfs("kpageflags")
        try:
            self._kpf = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise PagesUnreadable(f"no {path} (a kernel without CONFIG_PROC_PAGE_MONITOR)") \
                from None
        except PermissionError:
            raise PagesUnreadable(f"{path}: permission denied (needs root)") from None
        self._windows_read: set[int] = set()
        self._ksm_pfns = np.zeros(0, dtype=np.uint64)  # the KSM PFNs in the windows read

    def close(self) -> None:
        os.close(self._kpf)

    def __enter__(self) -> KsmPageFinder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _is_ksm(self, pfns: np.ndarray) -> np.ndarray:
        """Which of these PFNs are KSM pages (a bool each)."""
        windows = np.unique(pfns // KPF_WINDOW).tolist()
        found = [self._ksm_pfns]
        for w in windows:
            if w not in self._windows_read:
                data = _pread(self._kpf, KPF_WINDOW * ENTRY, w * KPF_WINDOW * ENTRY)
                found.append(np.flatnonzero(ksm_flags(data)).astype(np.uint64) + w * KPF_WINDOW)
                self._windows_read.add(w)
        if len(found) > 1:
            self._ksm_pfns = np.concatenate(found)
        return np.isin(pfns, self._ksm_pfns)

    def ksm_pages(self, pid: int, merge_any: bool = False) -> np.ndarray:
        """The virtual page numbers (address >> page shift, ascending) of `pid`'s pages that
        are KSM pages now. A process that is gone raises FileNotFoundError or
        ProcessLookupError; PagesUnreadable when its PFNs cannot be seen."""
        smaps = self.roots.procfs(str(pid), "smaps").read_text(errors="replace")
        ranges = parse_mergeable_ranges(smaps, merge_any)
        if not ranges:
            return np.zeros(0, dtype=np.uint64)
        path = self.roots.procfs(str(pid), "pagemap")
        try:
            fd = os.open(path, os.O_RDONLY)
        except PermissionError:
            raise PagesUnreadable(f"{path}: permission denied") from None
        found = []
        try:
            for start, end in ranges:
                last = (end - 1) >> self.page_shift
                for first in range(start >> self.page_shift, last + 1, PAGEMAP_SLICE):
                    n = min(PAGEMAP_SLICE, last + 1 - first)
                    index, pfns = present_pfns(_pread(fd, n * ENTRY, first * ENTRY))
                    if len(pfns) and not pfns.any():
                        raise PagesUnreadable(f"{path} shows no PFNs (needs CAP_SYS_ADMIN)")
                    found.append(index[self._is_ksm(pfns)].astype(np.uint64) + first)
        finally:
            os.close(fd)
        return np.concatenate(found)
