"""What live eBPF tracing needs from this host, checked one requirement at a time: privilege,
the bpf() syscall, tracefs, each tracepoint (and the fields the probes read from it, from its
format file, or its arguments, from BTF), bcc, kernel headers, kprobes. Each check is one line
with the fix."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from .btf import BTFError, kernel_btf, kernel_member_offset
from .capabilities import Check
from .paths import Roots

CAP_PERFMON, CAP_BPF = 38, 39
BCC_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE, _BPF_MAP_TYPE_ARRAY = 0, 2


@dataclass(frozen=True)
class Tracepoint:
    system: str
    name: str
    fields: tuple[str, ...]
    needed_for: str
    required: bool = False  # without it the ksm source does not run at all
    # The C types of its arguments (TP_PROTO) that probes/ksm.c reads by position when it
    # attaches the program raw; () : always attached with its fields read by name.
    raw_args: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"{self.system}:{self.name}"


_ULONG, _PTR = "long unsigned int", "void *"
# What probes/ksm.c attaches to, and the fields (or raw arguments) it reads.
TRACEPOINTS: tuple[Tracepoint, ...] = (
    Tracepoint("ksm", "ksm_merge_with_ksm_page", ("ksm_page", "pfn", "rmap_item", "mm", "err"),
               "merges", required=True, raw_args=(_PTR, _ULONG, _PTR, _PTR, "int")),
    Tracepoint("ksm", "ksm_merge_one_page", ("pfn", "rmap_item", "mm", "err"),
               "merges into the zero page (use_zero_pages)", raw_args=(_ULONG, _PTR, _PTR, "int")),
    Tracepoint("ksm", "ksm_remove_rmap_item", ("pfn", "rmap_item", "mm"), "unmerges",
               raw_args=(_ULONG, _PTR, _PTR)),
    Tracepoint("ksm", "ksm_start_scan", ("seq", "rmap_entries"), "scan cycles",
               raw_args=("int", "u32")),
    Tracepoint("ksm", "ksm_stop_scan", ("seq", "rmap_entries"), "scan cycles",
               raw_args=("int", "u32")),
    Tracepoint("ksm", "ksm_enter", ("mm",), "which process an mm is", raw_args=(_PTR,)),
    Tracepoint("ksm", "ksm_exit", ("mm",), "which process an mm is", raw_args=(_PTR,)),
    Tracepoint("sched", "sched_process_fork", ("child_pid",),
               "which process a KSM process's forked child is (else: its parent)"),
    Tracepoint("exceptions", "page_fault_user", ("address", "error_code"),
               "COW breaks and refaults", raw_args=(_ULONG, "struct pt_regs *", _ULONG)),
    Tracepoint("syscalls", "sys_enter_madvise", ("start", "len_in", "behavior"),
               "reclaim (MADV_DONTNEED/MADV_REMOVE)"),
    Tracepoint("syscalls", "sys_exit_madvise", ("ret",), "reclaim (MADV_DONTNEED/MADV_REMOVE)"),
    Tracepoint("syscalls", "sys_enter_fallocate", ("fd", "mode", "offset", "len"),
               "reclaim (fallocate PUNCH_HOLE)"),
    Tracepoint("syscalls", "sys_exit_fallocate", ("ret",), "reclaim (fallocate PUNCH_HOLE)"),
)
# How a program attaches: RAW, its arguments by position (the kernel builds no trace record
# for it: ~80 ns less per event here); FIELDS, as a tracepoint whose format file names them.
RAW, FIELDS = "raw", "fields"

_FIELD = re.compile(r"^\s*field:(?P<decl>[^;]+);")


def parse_format_fields(text: str) -> list[str]:
    """Field names of a tracefs event `format` file, common_* fields left out."""
    names = []
    for line in text.splitlines():
        m = _FIELD.match(line)
        if m is None or not m.group("decl").split():
            continue
        name = re.sub(r"\[.*\]$", "", m.group("decl").split()[-1]).lstrip("*")
        if name and not name.startswith("common_"):
            names.append(name)
    return names


def tracefs_dir(roots: Roots) -> Path | None:
    """The mounted tracefs (events/ present), or None."""
    for d in (roots.sys("kernel", "tracing"), roots.sys("kernel", "debug", "tracing")):
        if (d / "events").is_dir():
            return d
    return None


def tracepoint_fields(roots: Roots, tp: Tracepoint) -> list[str] | None:
    """The fields of a tracepoint from its format file, or None when it does not exist."""
    base = tracefs_dir(roots)
    if base is None:
        return None
    try:
        return parse_format_fields((base / "events" / tp.system / tp.name / "format").read_text())
    except OSError:
        return None


def _tracepoint_state(roots: Roots, tp: Tracepoint, raw: bool = True) -> tuple[str | None, Check]:
    """How tp can attach here (RAW, FIELDS, or None: not at all), and the doctor line saying
    so; raw=False: not raw, even where it could."""
    label = f"tracepoint {tp.path}"
    btf = kernel_btf(roots) if tp.raw_args and raw else None
    try:
        args = btf.tracepoint_args(tp.name) if btf else None
    except BTFError:  # garbled: as if not described
        args = None
    if args is not None and args == tp.raw_args:
        return RAW, Check(label, True, f"present, raw: BTF gives ({', '.join(args)}) "
                          f"({tp.needed_for})")
    not_raw = f"; not raw: BTF gives ({', '.join(args)})" if args is not None else ""
    fields = tracepoint_fields(roots, tp)
    if fields is None:
        return None, Check(label, False, f"not in this kernel (or tracefs not mounted): no "
                           f"{tp.needed_for}{not_raw}",
                           "a kernel with it (ksm:* since Linux 6.4)" if tp.system == "ksm" else
                           "mount tracefs; else this kernel lacks it")
    missing = [f for f in tp.fields if f not in fields]
    if missing:
        return None, Check(label, False, f"present, but lacks field(s) {', '.join(missing)}: "
                           f"no {tp.needed_for}{not_raw}", "a kernel whose tracepoint has them")
    return FIELDS, Check(label, True, f"present with {', '.join(tp.fields)} ({tp.needed_for})"
                         f"{not_raw}")


def check_tracepoint(roots: Roots, tp: Tracepoint) -> Check:
    return _tracepoint_state(roots, tp)[1]


def available_tracepoints(roots: Roots, raw: bool = True) -> dict[str, str]:
    """system:name -> how it attaches (RAW or FIELDS), for every TRACEPOINTS entry the probes
    can use here; raw=False: FIELDS only."""
    states = {tp.path: _tracepoint_state(roots, tp, raw)[0] for tp in TRACEPOINTS}
    return {path: mode for path, mode in states.items() if mode is not None}


def _effective_caps(roots: Roots) -> int:
    try:
        for line in roots.procfs("self", "status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def check_privilege(roots: Roots) -> Check:
    if os.geteuid() == 0:
        return Check("privilege", True, "running as root")
    caps = _effective_caps(roots)
    if caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1:
        return Check("privilege", True, "CAP_BPF and CAP_PERFMON")
    return Check("privilege", False, "not root and no CAP_BPF + CAP_PERFMON",
                 "run as root (sudo), or grant CAP_BPF,CAP_PERFMON")


def check_bpf_syscall() -> Check:
    """Create (and close) a one-entry array map: the smallest thing bpf() does."""
    nr = _BPF_SYSCALL.get(platform.machine())
    if nr is None:
        return Check("bpf syscall", False, f"unknown syscall number on {platform.machine()}", "")
    attr = (ctypes.c_uint32 * 32)(_BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, _BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return Check("bpf syscall", True, "bpf() creates maps")
    err = ctypes.get_errno()
    if err in (errno.EPERM, errno.EACCES):
        return Check("bpf syscall", False, "bpf() refused (EPERM): not privileged",
                     "run as root, or set kernel.unprivileged_bpf_disabled=0 with CAP_BPF")
    return Check("bpf syscall", False, f"bpf() fails: {os.strerror(err)}",
                 "a kernel built with CONFIG_BPF_SYSCALL")


def check_tracefs(roots: Roots) -> Check:
    found = tracefs_dir(roots)
    if found is None:
        return Check("tracefs", False, f"not mounted at {roots.sys('kernel', 'tracing')}",
                     "mount -t tracefs nodev /sys/kernel/tracing (scripts/setup.sh does it as root)")
    return Check("tracefs", True, f"mounted at {found}")


def import_bcc():
    """The bcc module (Debian's python3-bpfcc), from this Python or the Debian dist-packages."""
    try:
        import bcc  # noqa: PLC0415 - optional, only for live tracing
    except ImportError:
        import sys
        if BCC_DIST_PACKAGES in sys.path or not os.path.isdir(BCC_DIST_PACKAGES):
            raise
        sys.path.append(BCC_DIST_PACKAGES)
        import bcc  # noqa: PLC0415
    if not hasattr(bcc, "BPF"):
        raise ImportError(f"the bcc module at {bcc.__file__} is not the BPF Compiler Collection "
                          "(PyPI's 'bcc' is another package)")
    return bcc


def check_bcc() -> Check:
    try:
        bcc = import_bcc()
    except (ImportError, OSError) as e:
        return Check("bcc", False, f"cannot import bcc: {e}",
                     "apt-get install python3-bpfcc (scripts/setup.sh does it as root)")
    return Check("bcc", True, f"importable from {os.path.dirname(bcc.__file__)}")


def check_headers(roots: Roots) -> Check:
    build = Path("/lib/modules") / platform.release() / "build"
    if not (build / "include").is_dir():
        return Check("kernel headers", False, f"{build} missing: bcc cannot compile probes",
                     "apt-get install linux-headers-$(uname -r), or the nearest linux-headers-amd64 "
                     "linked there (scripts/setup.sh does it as root)")
    target = os.path.realpath(build)
    return Check("kernel headers", True, f"{build} -> {target}" + (
        "" if platform.release() in target else " (another kernel's headers: the probes take "
        "tracepoint arguments and structure offsets from BTF or tracefs, so this is enough)"))


def check_kprobes(roots: Roots) -> Check:
    base = tracefs_dir(roots)
    if base is not None and (base / "kprobe_events").exists():
        return Check("kprobes", True, "kprobe_events present (not needed by the ksm source)")
    return Check("kprobes", False, "no kprobe_events: CONFIG_KPROBES is off or tracefs unmounted "
                 "(the ksm source needs only tracepoints)", "")


# Members of kernel structures the ksm probes read, at the offsets the kernel's BTF gives
# (another kernel's headers would give wrong ones): (struct, member, what it is needed for)
BTF_MEMBERS = (
    ("ksm_rmap_item", "address", "COW breaks"),
    ("task_struct", "mm", "pids for processes in KSM before tracing began"),
)


def check_btf_member(roots: Roots, struct_name: str, member: str, needed_for: str) -> Check:
    label = f"BTF {struct_name}.{member}"
    off = kernel_member_offset(roots, struct_name, member)
    if off is None:
        return Check(label, False, f"not found in {roots.sys('kernel', 'btf', 'vmlinux')}: "
                     f"no {needed_for}", "a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    return Check(label, True, f"offset {off} ({needed_for})")


def requirement_checks(roots: Roots) -> list[Check]:
    """Every requirement of live tracing, in the order doctor lists them."""
    checks = [check_privilege(roots), check_bpf_syscall(), check_tracefs(roots)]
    checks += [check_tracepoint(roots, tp) for tp in TRACEPOINTS]
    checks += [check_btf_member(roots, *m) for m in BTF_MEMBERS]
    checks += [check_bcc(), check_headers(roots), check_kprobes(roots)]
    return checks


def ksm_blockers(roots: Roots) -> list[Check]:
    """The failed requirements without which the ksm source cannot run at all (tracefs is
    not one where BTF lets the required tracepoints attach raw)."""
    needed = [check_privilege(roots)]
    needed += [check_tracepoint(roots, tp) for tp in TRACEPOINTS if tp.required]
    needed += [check_bcc(), check_headers(roots)]
    return [c for c in needed if not c.ok]
