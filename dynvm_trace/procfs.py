"""The /proc files the ksm source and VM discovery read: parsers and readers."""

from __future__ import annotations

from .paths import Roots
from .pone_sysfs import parse_counters, parse_value, split_line

_YES_NO = {"yes": True, "no": False}


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


def list_pids(roots: Roots) -> list[int]:
    """The pids under the proc root, ascending; none when there is no such directory."""
    if not roots.proc.is_dir():
        return []
    return sorted(int(p.name) for p in roots.proc.iterdir() if p.name.isdigit())
