"""Where tracked processes map files shared, for the ksm probe's punch holes.

A punch hole (fallocate PUNCH_HOLE: how qemu discards file-, memfd- and hugetlbfs-backed guest
RAM) frees a file range, not an address range. The probe turns it into addresses with its
`fd_maps` map: (tgid, fd) -> up to FD_MAPS ranges (file offset, length, address) where the file
that fd opens is mapped shared in that process (probes/ksm.c). This module builds those ranges
from /proc/PID/maps and /proc/PID/fd and keeps the map up to date, writing only what changed.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any, NamedTuple

from .paths import Roots, page_size
from .procfs import Mapping, read_fd_block_size, read_fd_files, read_maps

MAX_FDS = 4096  # (process, fd) pairs whose shared file mappings the kernel knows
FD_MAPS = 4  # shared mappings kept per (process, fd), the first ones in file offset order


class FileRange(NamedTuple):
    """Part of a file mapped into memory: `length` bytes from `offset` in the file are at
    address `start`."""
    offset: int
    length: int
    start: int


def shared_file_ranges(maps: list[Mapping]) -> dict[tuple[int, int], list[FileRange]]:
    """(st_dev, st_ino) of each file a process maps shared -> where, in file offset order.
    Mappings that continue each other both in the file and in memory (one mmap that madvise or
    mprotect split) are one range."""
    by_file: dict[tuple[int, int], list[FileRange]] = {}
    for m in sorted(maps, key=attrgetter("start")):
        if not (m.shared and m.inode):
            continue
        ranges = by_file.setdefault((m.dev, m.inode), [])
        if ranges and (last := ranges[-1]).start + last.length == m.start \
                and last.offset + last.length == m.offset:
            ranges[-1] = last._replace(length=last.length + m.end - m.start)
        else:
            ranges.append(FileRange(m.offset, m.end - m.start, m.start))
    return {file: sorted(ranges) for file, ranges in by_file.items()}


def fd_ranges(roots: Roots, pid: int) -> dict[int, tuple[FileRange, ...]]:
    """fd -> where the file it opens is mapped shared in process pid (its first FD_MAPS
    ranges). Files on a file system with blocks larger than a page (hugetlbfs: a huge page
    refaults in one fault) are left out: probes/ksm.c counts one page per fault."""
    maps = read_maps(roots, pid)
    shared = shared_file_ranges(maps) if maps else {}
    if not shared:
        return {}
    out = {}
    for fd, file in (read_fd_files(roots, pid) or {}).items():
        if file not in shared:
            continue
        block = read_fd_block_size(roots, pid, fd)
        if block is not None and block <= page_size():
            out[fd] = tuple(shared[file][:FD_MAPS])
    return out


class FdMaps:
    """The probe's fd_maps (a bcc table), kept equal to what the tracked processes map."""

    def __init__(self, table: Any, roots: Roots, warn_once: Callable[[str], None]):
        self.table, self.roots, self.warn_once = table, roots, warn_once
        self.written: dict[tuple[int, int], tuple[FileRange, ...]] = {}  # as in the kernel

    def refresh(self, pids: set[int]) -> None:
        """Write where each of `pids` maps its fds' files; only what changed is written.
        Entries of other processes and of fds closed or unmapped go."""
        now: dict[tuple[int, int], tuple[FileRange, ...]] = {}
        for pid in sorted(pids):
            try:
                now.update(((pid, fd), r) for fd, r in fd_ranges(self.roots, pid).items())
            except OSError as e:
                self.warn_once(f"cannot read the file mappings of pid {pid} ({e.strerror}): "
                               "its punch holes are counted in punch_untracked_pages")
        if len(now) > MAX_FDS:
            self.warn_once(f"more than {MAX_FDS} fds with shared file mappings: punch holes "
                           "in the others are counted in punch_untracked_pages")
            now = dict(sorted(now.items())[:MAX_FDS])
        for pid, fd in self.written.keys() - now.keys():
            try:
                del self.table[self.table.Key(pid, fd)]
            except KeyError:
                pass
        for (pid, fd), ranges in now.items():
            if self.written.get((pid, fd)) != ranges:
                leaf = self.table.Leaf()
                for slot, r in zip(leaf.m, ranges):
                    slot.offset, slot.len, slot.start = r
                self.table[self.table.Key(pid, fd)] = leaf
        self.written = now
