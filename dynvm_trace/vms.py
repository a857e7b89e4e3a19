"""VM discovery: which processes on this host are VMs (qemu), and what they are called."""

from __future__ import annotations

from dataclasses import dataclass

from .paths import Roots
from .procfs import list_pids, read_comm, read_ksm_stat

# pone tracks only this comm: the 15-character truncation of qemu-system-x86_64
PONE_COMM = "qemu-system-x86"


@dataclass(frozen=True)
class VM:
    pid: int
    comm: str
    name: str  # from qemu's -name option, else "pid N"


def is_qemu(comm: str) -> bool:
    return comm.startswith("qemu-") or comm == "qemu"


def vm_name(cmdline: bytes, pid: int) -> str:
    """The VM's name from qemu's command line (`-name guest=NAME,...` or `-name NAME`)."""
    args = cmdline.split(b"\0")
    for i, arg in enumerate(args[:-1]):
        if arg in (b"-name", b"--name"):
            value = args[i + 1].decode(errors="replace")
            first = value.split(",")[0]
            return first.removeprefix("guest=") or f"pid {pid}"
    return f"pid {pid}"


def discover(roots: Roots) -> list[VM]:
    """qemu processes under the proc root, by pid."""
    found: list[VM] = []
    for pid in list_pids(roots):
        comm = read_comm(roots, pid)
        if comm is None or not is_qemu(comm):
            continue
        try:
            cmdline = roots.procfs(str(pid), "cmdline").read_bytes()
        except OSError:
            cmdline = b""
        found.append(VM(pid, comm, vm_name(cmdline, pid)))
    return found


def ksm_stats(roots: Roots, vms: list[VM]) -> dict[int, dict]:
    """/proc/PID/ksm_stat of each VM that has one."""
    return {vm.pid: stat for vm in vms if (stat := read_ksm_stat(roots, vm.pid)) is not None}
