"""What this host can do: which event sources it offers, and for each one that it does not,
one line saying what is missing and how to fix it (kvm_stat's model: fall back, and say why)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import pone_sysfs
from .paths import Roots
from .procfs import list_pids, read_ksm_stat


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, or what is missing
    fix: str = ""  # how to fix it when not ok

    def as_dict(self) -> dict:
        return asdict(self)


def pone_source(roots: Roots) -> Check:
    from .sources.pone import why_unavailable
    from .symbols import SymbolsUnavailable, read_kallsyms
    try:
        symbols = read_kallsyms(roots)
    except SymbolsUnavailable:
        symbols = None
    reason = why_unavailable(roots, symbols)
    if reason is not None:
        what, fix, _ = reason
        return Check("pone", False, what, fix)
    dialect = pone_sysfs.detect_dialect(roots)
    return Check("pone", True, f"{roots.pone_dir} ({dialect} dialect), kprobes, bcc and headers "
                 "present" if dialect else "a ppr guest kernel: reclaim reports traced")


def ksm_source(roots: Roots) -> Check:
    if not roots.ksm_dir.is_dir():
        return Check("ksm", False, f"{roots.ksm_dir} not found: this kernel has no KSM",
                     "use a kernel built with CONFIG_KSM")
    if not roots.is_live:
        return Check("ksm", False, f"{roots.sysfs} is not the running kernel's /sys: live "
                     "tracing needs the real one", "drop --sysfs-root/--proc-root")
    from .bpf_host import ksm_blockers
    blockers = ksm_blockers(roots)
    if blockers:
        return Check("ksm", False, "; ".join(f"{c.name}: {c.detail}" for c in blockers),
                     next((c.fix for c in blockers if c.fix), ""))
    return Check("ksm", True, "KSM with ksm:* tracepoints, BPF and bcc: live tracing")


def has_ksm_memory(stat: dict | None) -> bool:
    """Whether a /proc/PID/ksm_stat shows mergeable memory: pages merged or scanned by KSM
    (rmap items), or memory marked mergeable (`ksm_mergeable: yes`, newer kernels)."""
    if not stat:
        return False
    return bool(stat.get("ksm_merging_pages") or stat.get("ksm_rmap_items")
                or stat.get("ksm_mergeable") is True)


def ksm_workload(roots: Roots) -> Check:
    """Whether the host has something for the ksm source to watch: qemu processes (VMs),
    processes with KSM memory, or KSM pages in use (pages_shared + pages_sharing > 0).
    `--source auto` only picks ksm when it has."""
    from . import vms
    qemu = [vm.pid for vm in vms.discover(roots)]
    if qemu:
        return Check("ksm workload", True, f"{len(qemu)} qemu process(es): pid "
                     + ", ".join(map(str, qemu[:5])) + (" ..." if len(qemu) > 5 else ""))
    merging = []
    for pid in list_pids(roots):
        try:
            if has_ksm_memory(read_ksm_stat(roots, pid)):
                merging.append(pid)
        except OSError:
            continue
    if merging:
        return Check("ksm workload", True, f"{len(merging)} process(es) with KSM memory: pid "
                     + ", ".join(map(str, merging[:5])) + (" ..." if len(merging) > 5 else ""))
    in_use = 0
    for name in ("pages_shared", "pages_sharing"):
        try:
            in_use += int((roots.ksm_dir / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    if in_use:
        return Check("ksm workload", True, f"pages_shared + pages_sharing = {in_use}")
    return Check("ksm workload", False, "no qemu process, no process with KSM memory "
                 "(/proc/PID/ksm_stat), pages_shared + pages_sharing = 0",
                 "start a VM or mark memory MADV_MERGEABLE, or trace anyway with --source ksm")


def auto_source(roots: Roots, checks: list[Check] | None = None) -> tuple[str, list[str]]:
    """What `--source auto` picks (pone, then ksm if the host has something for it to watch,
    then the emulated host), and why each source before it was passed over."""
    passed_over = []
    for check in checks if checks is not None else source_checks(roots):
        if check.name == "replay":
            continue
        if not check.ok:
            passed_over.append(f"{check.name}: {check.detail}")
            continue
        if check.name == "ksm":
            work = ksm_workload(roots)
            if not work.ok:
                passed_over.append(f"ksm: live tracing works, but there is nothing to watch "
                                   f"({work.detail}); {work.fix}")
                continue
        return check.name, passed_over
    return "emulate", passed_over


def emulate_source() -> Check:
    return Check("emulate", True, "an emulated pone host: needs nothing from the kernel")


def replay_source() -> Check:
    return Check("replay", True, "a recorded log: give it with --log FILE")


def source_checks(roots: Roots) -> list[Check]:
    """Every source, in the order `--source auto` prefers them."""
    return [pone_source(roots), ksm_source(roots), emulate_source(), replay_source()]
