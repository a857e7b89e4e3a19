"""What this host can do: which event sources it offers, and for each one that it does not,
one line saying what is missing and how to fix it (kvm_stat's model: fall back, and say why)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import pone_sysfs
from .paths import Roots


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, or what is missing
    fix: str = ""  # how to fix it when not ok

    def as_dict(self) -> dict:
        return asdict(self)


def pone_source(roots: Roots) -> Check:
    dialect = pone_sysfs.detect_dialect(roots)
    if dialect is None:
        return Check("pone", False, f"{roots.pone_dir} not found: this kernel does not have the "
                     "Dynamic VM page merge patch", "boot the patched host kernel (CONFIG_PONE_MODULE)")
    return Check("pone", False, f"{roots.pone_dir} found ({dialect} dialect), but live tracing of the "
                 "pone kernel is not in this version of dynvm-trace",
                 f"watch its counters with: dynvm-trace status --sysfs-root {roots.sysfs}")


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


def emulate_source() -> Check:
    return Check("emulate", True, "an emulated pone host: needs nothing from the kernel")


def replay_source() -> Check:
    return Check("replay", True, "a recorded log: give it with --log FILE")


def source_checks(roots: Roots) -> list[Check]:
    """Every source, in the order `--source auto` prefers them."""
    return [pone_source(roots), ksm_source(roots), emulate_source(), replay_source()]
