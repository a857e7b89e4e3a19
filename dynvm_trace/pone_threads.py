"""The pone kernel threads alive on a host: a poll of /proc (pure: give it a proc root).

kernel/pone.md, "Threads": `spdeamon` (the scan daemon), `spthrd_<cpu>` workers on odd CPUs (they
do the write-protect, tree insert, merge and release work) and `spthrd_divide`; seen at boot with
2 vCPUs: `spthrd_1`, `spthrd_divide`, `spdeamon`. A worker killed by an Oops (pone.md, "Failure
modes") leaves this list, and its queue is never served again.

`list_pone_threads(proc_root)` reads `/proc/<pid>/stat` of every process: the name (comm), the
state letter and the flags. Only kernel threads count (PF_KTHREAD in the flags): a user process
can rename itself `spthrd_1` with prctl, as the tests of pone do with `qemu-system-x86`. A process
that exits while it is read is skipped.

`workers_values(threads)` is the `values` of the `workers` counters group the pone source (and
the emulator) emit: thread name -> pid (docs/event-log.md).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKERS_GROUP = "workers"
PF_KTHREAD = 0x00200000  # include/linux/sched.h, the same value on 4.4 and today
NAME = re.compile(r"spthrd_(?:[0-9]+|divide)|spdeamon")
WORKER = re.compile(r"spthrd_[0-9]+")  # the threads that serve the queues


@dataclass(frozen=True)
class PoneThread:
    name: str   # comm: spthrd_<n>, spthrd_divide or spdeamon
    pid: int
    state: str  # the state letter of /proc/PID/stat: R, S, D, Z, ...

    @property
    def is_worker(self) -> bool:
        return WORKER.fullmatch(self.name) is not None


def parse_stat(text: str) -> tuple[str, str, int] | None:
    """(comm, state, flags) of a /proc/PID/stat line; None when it is not one. The comm is what
    lies between the first '(' and the last ')' (it may hold spaces and parentheses)."""
    lo, hi = text.find("("), text.rfind(")")
    if lo < 0 or hi < lo:
        return None
    rest = text[hi + 1:].split()
    # after the comm: state(3) ppid(4) pgrp(5) session(6) tty_nr(7) tpgid(8) flags(9)
    if len(rest) < 7:
        return None
    try:
        flags = int(rest[6])
    except ValueError:
        return None
    return text[lo + 1:hi], rest[0], flags


def list_pone_threads(proc_root: str | os.PathLike = "/proc") -> list[PoneThread]:
    """The pone kernel threads under `proc_root`, sorted by name then pid."""
    root = Path(proc_root)
    try:
        entries = [e for e in os.listdir(root) if e.isdigit()]
    except OSError:
        return []
    out = []
    for entry in entries:
        try:
            text = (root / entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:  # gone meanwhile, or not readable
            continue
        parsed = parse_stat(text)
        if parsed is None:
            continue
        comm, state, flags = parsed
        if NAME.fullmatch(comm) and flags & PF_KTHREAD:
            out.append(PoneThread(comm, int(entry), state))
    out.sort(key=lambda t: (_order(t.name), t.pid))
    return out


def _order(name: str) -> tuple[int, int, str]:
    """spthrd_<n> by n, then spthrd_divide, then spdeamon."""
    if WORKER.fullmatch(name):
        return (0, int(name[7:]), name)
    return (1 if name == "spthrd_divide" else 2, 0, name)


def workers_values(threads: list[PoneThread]) -> dict[str, int]:
    """The `workers` counters group's values: name -> pid (the lowest pid if a name repeats)."""
    out: dict[str, int] = {}
    for t in threads:
        out.setdefault(t.name, t.pid)
    return out


def workers_record(ts: int, src: str, threads: list[PoneThread]) -> dict[str, Any]:
    """A `counters` record of group `workers`, as a source emits it at each poll."""
    return {"kind": "counters", "ts": ts, "src": src, "group": WORKERS_GROUP,
            "values": workers_values(threads)}
