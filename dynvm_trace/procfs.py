"""The /proc files the ksm source and VM discovery read: parsers and readers."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .paths import Roots
from .pone_sysfs import parse_counters, parse_value, split_line

_YES_NO = {"yes": True, "no": False}


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""
    start: int
    end: int
    perms: str   # e.g. "rw-s": the last letter is s (shared) or p (private)
    offset: int  # bytes into the file
    dev: int     # as os.makedev(major, minor): compares with os.stat()'s st_dev
    inode: int   # 0: not backed by a file
    path: str    # "" when none; e.g. "[heap]", "/memfd:ram (deleted)"

    @property
    def shared(self) -> bool:
        return self.perms.endswith("s")


def parse_vmstat(text: str, problems: list[str] | None = None) -> dict[str, int]:
    """/proc/vmstat: `name N` lines (same rules as pone_sysfs.parse_counters)."""
    return parse_counters(text, problems)


def parse_ksm_stat(text: str) -> dict[str, int | bool]:
    """/proc/PID/ksm_stat: `ksm_rmap_items N` lines and, on newer kernels,
    `ksm_merge_any: yes|no` lines (yes/no become bools). Unusable lines are skipped."""
    stats: dict[str, int | bool] = {}
    for line in text.splitlines():
        pair = split_line(line)
        if pair is None:
            continue
        key, value = pair
        if value in _YES_NO:
            stats[key] = _YES_NO[value]
            continue
        try:
            stats[key] = parse_value(value)
        except ValueError:
            continue
    return stats


def parse_maps(text: str) -> list[Mapping]:
    """/proc/PID/maps: `start-end perms offset major:minor inode [path]`, hex but for the
    inode (decimal); the path may hold blanks. Unusable lines (garbage, or a last line cut
    short by a read) are skipped."""
    out: list[Mapping] = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        span, perms, offset, dev, inode = fields[:5]
        lo, _, hi = span.partition("-")
        major, _, minor = dev.partition(":")
        try:
            start, end = int(lo, 16), int(hi, 16)
            mapping = Mapping(start, end, perms, int(offset, 16),
                              os.makedev(int(major, 16), int(minor, 16)), int(inode),
                              fields[5] if len(fields) == 6 else "")
        except (ValueError, OverflowError):  # OverflowError: a device number out of range
            continue
        if end > start and len(perms) == 4:
            out.append(mapping)
    return out


def read_vmstat(roots: Roots, problems: list[str] | None = None) -> dict[str, int]:
    """/proc/vmstat; raises OSError when it cannot be read."""
    return parse_vmstat(roots.procfs("vmstat").read_text(), problems)


def read_ksm_stat(roots: Roots, pid: int) -> dict[str, int | bool] | None:
    """/proc/PID/ksm_stat, or None when the process is gone or the kernel has no such file
    (before 6.1). Other errors (e.g. permission) raise OSError."""
    try:
        return parse_ksm_stat(roots.procfs(str(pid), "ksm_stat").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return None


def read_comm(roots: Roots, pid: int) -> str | None:
    """The command name of `pid` (may contain spaces), or None when the process is gone."""
    try:
        return roots.procfs(str(pid), "comm").read_text(errors="replace").removesuffix("\n")
    except (FileNotFoundError, ProcessLookupError):
        return None


def read_maps(roots: Roots, pid: int) -> list[Mapping] | None:
    """/proc/PID/maps, or None when the process is gone."""
    try:
        return parse_maps(roots.procfs(str(pid), "maps").read_text(errors="replace"))
    except (FileNotFoundError, ProcessLookupError):
        return None


def read_fd_files(roots: Roots, pid: int) -> dict[int, tuple[int, int]] | None:
    """fd -> (st_dev, st_ino) of what each of /proc/PID/fd/N opens, or None when the process is
    gone. An fd closed while the directory is read is left out."""
    fd_dir = roots.procfs(str(pid), "fd")
    try:
        names = [p.name for p in fd_dir.iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return None
    out: dict[int, tuple[int, int]] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            st = os.stat(fd_dir / name)
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(name)] = (st.st_dev, st.st_ino)
    return out


def read_fd_block_size(roots: Roots, pid: int, fd: int) -> int | None:
    """The block size (statvfs f_bsize) of the file system of what /proc/PID/fd/N opens: on
    hugetlbfs its huge page size. None when the fd or the process is gone."""
    try:
        return os.statvfs(roots.procfs(str(pid), "fd", str(fd))).f_bsize
    except (FileNotFoundError, ProcessLookupError):
        return None


def list_pids(roots: Roots) -> list[int]:
    """The pids under the proc root, ascending; none when there is no such directory."""
    if not roots.proc.is_dir():
        return []
    return sorted(int(p.name) for p in roots.proc.iterdir() if p.name.isdigit())
