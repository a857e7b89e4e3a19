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
    return Check("ksm", False, "KSM is present, but live tracing of stock kernels is not in this "
                 "version of dynvm-trace", "dynvm-trace status shows the KSM counters meanwhile")


def emulate_source() -> Check:
    return Check("emulate", True, "an emulated pone host: needs nothing from the kernel")


def replay_source() -> Check:
    return Check("replay", True, "a recorded log: give it with --log FILE")


def source_checks(roots: Roots) -> list[Check]:
    """Every source, in the order `--source auto` prefers them."""
    return [pone_source(roots), ksm_source(roots), emulate_source(), replay_source()]
