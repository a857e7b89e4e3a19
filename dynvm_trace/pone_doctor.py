"""`doctor --source pone`: the user guide's installation checks, host and guest, and the probe
points of the running (or a given) kernel.

Every check is a function of a `Roots` (and the symbol table, and /dev for KVM) returning
`Check`s; every failing check says what to do. Only passive files are read (pone_run,
pone_reclaim_run, THP's enabled, ksm/run): never the side-effect files of pone.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import pone_probes as pp
from . import pone_sysfs
from .capabilities import Check
from .paths import Roots
from .pone_threads import list_pone_threads
from .symbols import SymbolsUnavailable, SymbolTable, load_symbols

THP_ENABLED = ("kernel", "mm", "transparent_hugepage", "enabled")


def parse_thp_mode(text: str) -> str:
    """The selected mode of a `[always] madvise never`-style file: the bracketed word.

    Raises ValueError when there is not exactly one bracketed word.
    """
    picked = [w[1:-1] for w in text.split() if len(w) > 2 and w[0] == "[" and w[-1] == "]"]
    if len(picked) != 1:
        raise ValueError(f"no single [selected] mode in {text.strip()[:60]!r}")
    return picked[0]


def _read_value(path: Path) -> tuple[int | None, str]:
    """(value, "") or (None, why)."""
    try:
        return pone_sysfs.parse_value(path.read_text(encoding="utf-8", errors="replace")), ""
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, str(e.strerror or e)
    except ValueError as e:
        return None, str(e)


# --- host ---------------------------------------------------------------------------------

def check_pone_kernel(roots: Roots) -> Check:
    """The patched host kernel is running and merging: /sys/kernel/mm/pone exists (dialect
    found) and pone_run reads 1."""
    name = "pone kernel"
    dialect = pone_sysfs.detect_dialect(roots)
    if dialect is None:
        return Check(name, False, f"{roots.pone_dir} not found: not the Dynamic VM host kernel",
                     "boot the patched Linux 4.4.1 host kernel built with CONFIG_PONE_MODULE=y "
                     "(Processor type and features -> page dynamic support)")
    path = roots.pone_dir / "pone_run"
    if dialect == pone_sysfs.EARLY:
        return Check(name, True, f"{roots.pone_dir} found (early dialect: no pone_run switch, "
                     "merging always on)")
    value, why = _read_value(path)
    if value is None:
        return Check(name, False, f"{dialect} dialect, but pone_run: {why}",
                     "run doctor as root on the patched host; the file should exist")
    if value != 1:
        return Check(name, False, f"{dialect} dialect, pone_run reads {value}: no page enters "
                     "pone or ppr", f"echo 1 > {path}")
    return Check(name, True, f"{dialect} dialect, pone_run 1")


def check_thp(roots: Roots) -> Check:
    """Transparent huge pages off: pone tracks only pages that are not THP-backed."""
    name = "transparent huge pages"
    path = roots.sys(*THP_ENABLED)
    fix = (f"echo never > {path} (and boot with transparent_hugepage=never to keep it off)")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return Check(name, True, f"{path} not found: the kernel has no THP")
    except OSError as e:
        return Check(name, False, f"{path}: {e.strerror or e}", "run doctor as root")
    try:
        mode = parse_thp_mode(text)
    except ValueError as e:
        return Check(name, False, f"{path}: {e}", fix)
    if mode == "never":
        return Check(name, True, "never")
    why = ("qemu asks for huge pages of guest RAM with madvise"
           if mode == "madvise" else "anonymous memory is THP-backed")
    return Check(name, False, f"{mode}: {why}, and pone does not merge THP-backed pages", fix)


def check_kvm(dev: Path = Path("/dev")) -> Check:
    name = "kvm"
    path = dev / "kvm"
    if path.exists():
        return Check(name, True, f"{path} present")
    return Check(name, False, f"{path} not found: KVM is not loaded or the CPU has no "
                 "virtualization support", "modprobe kvm_intel (or kvm_amd); enable VT-x/AMD-V "
                 "in the firmware")


def check_ksm(roots: Roots) -> Check:
    """KSM must not run alongside pone: both would merge the same guest pages."""
    name = "ksm off"
    path = roots.ksm_dir / "run"
    value, why = _read_value(path)
    if value is None:
        if why == "missing":
            return Check(name, True, f"{path} not found: no KSM in this kernel")
        return Check(name, False, f"{path}: {why}", "run doctor as root")
    if value == 1:
        return Check(name, False, "KSM is running (run = 1) alongside pone: both merge the same "
                     "anonymous guest pages, and KSM's merges are not in pone's counters",
                     f"echo 0 > {path}")
    meaning = {0: "stopped", 2: "stopped, unmerging its pages"}.get(value, f"run = {value}")
    return Check(name, True, f"KSM {meaning}")


def info_leak_note(roots: Roots, symbols: SymbolTable | None) -> Check | None:
    """On a patched host: the ppr pool header in guest memory receives host kernel pointers
    at registration. One informational line (ok), None elsewhere."""
    patched = pone_sysfs.detect_dialect(roots) is not None or (
        symbols is not None and pp.HOST in pp.detect_sides(symbols))
    if not patched:
        return None
    return Check("ppr info leak", True, "note: at ppr pool registration (mem_pool_reg) the "
                 "kernel writes host kernel pointers into the pool header in guest memory: a "
                 "guest can read host kernel addresses (defeats KASLR)")


# --- guest --------------------------------------------------------------------------------

def check_guest_reclaim(roots: Roots, symbols: SymbolTable | None) -> Check:
    """The guest's free page reclaim is on: pone_reclaim_run reads 1, or (no such file) the
    guest kernel has the ppr symbols."""
    name = "guest reclaim"
    path = roots.pone_dir / "pone_reclaim_run"
    value, why = _read_value(path)
    if value == 1:
        return Check(name, True, "pone_reclaim_run 1")
    if value is not None:
        return Check(name, False, f"pone_reclaim_run reads {value}: free pages are not "
                     "reported to the host", f"echo 1 > {path}")
    if why != "missing":
        return Check(name, False, f"{path}: {why}", "run doctor as root in the guest")
    if symbols is not None:
        have = [n for n in pp.GUEST_MARKERS if n in symbols]
        if have:
            return Check(name, True, f"the guest kernel has free page reclaim ({', '.join(have)}); "
                         "no pone_reclaim_run switch")
        return Check(name, False, "no pone_reclaim_run and no ppr symbols (virt_mark_page_release):"
                     " the guest kernel has no free page reclaim",
                     "boot a guest kernel built with CONFIG_PPR_MODULE=y")
    return Check(name, False, "no pone_reclaim_run, and no symbol table to look for the ppr "
                 "symbols", "run doctor as root in the guest (for /proc/kallsyms), or give "
                 "--system-map / --vmlinux of the guest kernel")


# --- symbols ------------------------------------------------------------------------------

_FIX = {
    pp.MISSING: "this kernel lacks it (not the patched kernel, or another build of the patch); "
                "the events are skipped",
    pp.INLINED: "nothing to do: it cannot be probed; the events are skipped",
    pp.ADDRESS_HIDDEN: "run as root (or sysctl kernel.kptr_restrict=0) so kallsyms shows "
                       "addresses",
}


def symbol_table_check(symbols: SymbolTable | None, reason: str = "") -> Check:
    name = "kernel symbols"
    if symbols is None:
        return Check(name, False, f"no symbol table: {reason or 'not read'}",
                     "run as root to read /proc/kallsyms, or give --system-map FILE or "
                     "--vmlinux FILE")
    detail = symbols.describe()
    if symbols.problems:
        detail += f"; {len(symbols.problems)} unusable lines (first: {symbols.problems[0]})"
    if symbols.addresses_hidden:
        return Check(name, False, detail + ": kallsyms was read without privilege; names "
                     "are right, addresses are not", _FIX[pp.ADDRESS_HIDDEN])
    return Check(name, True, detail)


def symbol_checks(symbols: SymbolTable, sides: tuple[str, ...] | None = None) -> list[Check]:
    """One Check per probe point of the sides (detected unless given), one per known trap
    seen, and a summary line first."""
    detected = pp.detect_sides(symbols)
    sides, resolutions = pp.resolve_for_kernel(symbols, sides)
    summary = pp.summarize(resolutions)
    which = "/".join(sides)
    head = summary.line()
    if not detected:
        head = ("neither the pone host nor the ppr guest symbols: not a patched kernel; "
                + head)
        # No line per point: on a stock kernel they would all say the same thing.
        return [Check("probe points", False, head,
                      "boot the patched kernel (host: CONFIG_PONE_MODULE, guest: "
                      "CONFIG_PPR_MODULE), or check it offline with --system-map/--vmlinux")]
    missing = pp.unavailable_events(resolutions)
    if missing:
        head += f"; unavailable: {', '.join(missing)}"
    checks = [Check(f"probe points ({which})", not summary.missing, head,
                    "" if not summary.missing else "see the lines below")]
    for r in resolutions:
        label = f"probe {r.symbol}" if r.point is not None else f"trap {r.symbol}"
        if r.point is None or r.usable:
            checks.append(Check(label, True, f"{r.status}: {r.detail}"))
        else:
            checks.append(Check(label, False, f"{r.status}: {r.detail}",
                                _FIX.get(r.status, "")))
    return checks


# --- all of it ----------------------------------------------------------------------------

def detect_side(roots: Roots, symbols: SymbolTable | None) -> str:
    """HOST or GUEST: guest when the symbols are a ppr guest's and not a pone host's, or (no
    symbols) the pone directory holds pone_reclaim_run but no pone_run; host otherwise."""
    if symbols is not None:
        sides = pp.detect_sides(symbols)
        if pp.HOST in sides:
            return pp.HOST
        if pp.GUEST in sides:
            return pp.GUEST
    d = roots.pone_dir
    if (d / "pone_reclaim_run").exists() and not (d / "pone_run").exists():
        return pp.GUEST
    return pp.HOST


def check_threads(roots: Roots) -> Check:
    """The scan daemon and at least one worker alive (pone.md "Threads"; a worker killed by an
    Oops is gone for good and its queue is never served again)."""
    threads = list_pone_threads(roots.proc)
    names = [t.name for t in threads]
    missing = [n for n, ok in (("spdeamon", "spdeamon" in names),
                               ("a spthrd_<cpu> worker", any(t.is_worker for t in threads))) if not ok]
    listed = ", ".join(f"{t.name} (pid {t.pid}, {t.state})" for t in threads) or "none"
    if missing:
        return Check("pone threads", False, f"{' and '.join(missing)} not running (found: {listed}): "
                     "pages queued to a dead worker are never merged or released",
                     "look for an Oops in dmesg (a worker killed by guest page content); only a "
                     "reboot brings a worker back")
    return Check("pone threads", True, listed)


def pone_checks(roots: Roots, symbols: SymbolTable | None, *, symbols_reason: str = "",
                dev: Path = Path("/dev"), side: str | None = None) -> list[Check]:
    """The installation checks of the side (detected unless given), then the symbol table
    and the probe points."""
    side = side or detect_side(roots, symbols)
    checks: list[Check] = []
    if side == pp.HOST:
        checks.append(check_pone_kernel(roots))
        if pone_sysfs.detect_dialect(roots) is not None:
            checks.append(check_threads(roots))
        checks += [check_thp(roots), check_kvm(dev), check_ksm(roots)]
        note = info_leak_note(roots, symbols)
        if note is not None:
            checks.append(note)
    else:
        checks.append(check_guest_reclaim(roots, symbols))
    checks.append(symbol_table_check(symbols, symbols_reason))
    if symbols is not None:
        checks += symbol_checks(symbols, (side,) if pp.detect_sides(symbols) else None)
    return checks


def doctor(roots: Roots, *, system_map: str | os.PathLike | None = None,
           vmlinux: str | os.PathLike | None = None, dev: Path = Path("/dev"),
           side: str | None = None) -> list[Check]:
    """Load the symbols (vmlinux, System.map or kallsyms) and run `pone_checks`; a symbol
    source that cannot be read becomes a failing check, never an exception."""
    try:
        symbols: SymbolTable | None = load_symbols(roots, system_map, vmlinux)
        reason = ""
    except SymbolsUnavailable as e:
        symbols, reason = None, str(e)
    return pone_checks(roots, symbols, symbols_reason=reason, dev=dev, side=side)
