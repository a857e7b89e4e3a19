"""The probe points of the patched (pone/ppr) kernel, as data, and their resolution against a
symbol table.

`PROBE_POINTS` is the probe table of kernel/pone.md: for each kernel symbol, which side it is
on (host: page one merge + the host half of free page reclaim; guest: the guest half), where it
is hooked (entry, return; nothing for a data symbol read by address), what it gives (the
event kinds of `events.KINDS`, or a part of one, that are lost without it) and what it needs.
`TRAPS` are the symbols pone.md warns about (present but never called out of line, or inlined).

`resolve(table, symbols)` says for each point: found (one address), found more than once (a
probe must attach by address: all of them listed), missing (what it would give is
unavailable), known never-called, or only inlined (DWARF). Nothing here touches the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .symbols import SymbolTable

HOST = "host"
GUEST = "guest"

ENTRY = "entry"
RETURN = "return"

# Resolution statuses.
FOUND = "found"
DUPLICATE = "duplicate"  # found more than once: attach by address
MISSING = "missing"
NEVER_CALLED = "never_called"  # a symbol, but every call is inlined: a kprobe never fires
INLINED = "inlined"  # no symbol: exists only inlined
ADDRESS_HIDDEN = "address_hidden"  # found, but needs an address and kallsyms shows zeros

USABLE = frozenset({FOUND, DUPLICATE})


@dataclass(frozen=True)
class ProbePoint:
    symbol: str
    side: str  # HOST or GUEST
    hooks: tuple[str, ...]  # ENTRY and/or RETURN; () for a data symbol read by address
    gives: tuple[str, ...]  # what is unavailable without it ("kind" or "kind(detail)")
    kinds: tuple[str, ...]  # the event kinds (events.KINDS) it contributes to
    how: str  # what the probe reads, one line
    needs: str = ""  # what it takes beyond the symbol (filter, address, a partner probe)
    data: bool = False  # a data symbol: needs its address, read with bpf_probe_read

    @property
    def needs_address(self) -> bool:
        return self.data


@dataclass(frozen=True)
class Trap:
    symbol: str
    status: str  # NEVER_CALLED or INLINED
    reason: str  # from pone.md
    side: str = HOST


PROBE_POINTS: tuple[ProbePoint, ...] = (
    ProbePoint("change_reverse_ref", HOST, (ENTRY, RETURN),
               ("merge", "merge_fail(change_ref)"), ("merge", "merge_fail"),
               "old_pfn, new_pfn at entry; return 0 merged, 1 walk/status error, 2 page lock",
               "entry and return matched per thread (runs in spthrd_* workers)"),
    ProbePoint("change_reverse_ref_one", HOST, (ENTRY,),
               ("merge attribution (VM via vma->vm_mm, host virtual address)",), ("merge",),
               "vma->vm_mm (the qemu process) and addr, per mapping of the merged page",
               "struct vm_area_struct offsets from the running kernel's headers"),
    ProbePoint("insert_sd_tree", HOST, (RETURN,),
               ("unique insert", "duplicate found", "merge_fail(tree_insert)"),
               ("merge_fail",),
               "return NULL = error, the page itself = new unique content, "
               "another page = duplicate"),
    ProbePoint("make_slice_wprotect", HOST, (RETURN,),
               ("merge_fail(write_protect)",), ("merge_fail",),
               "return != 0 = write-protect failed"),
    ProbePoint("pone_slice_can_reuse", HOST, (RETURN,),
               ("cow_break",), ("cow_break",),
               "return 1 in a qemu task starts a COW break of a merged page",
               "comm filter qemu-system-x86; then dec_mapcount and alloc on the same tid"),
    ProbePoint("pone_slice_dec_mapcount_process", HOST, (ENTRY,),
               ("cow_break", "reclaim_refault"), ("cow_break", "reclaim_refault"),
               "the old page unmapped (COW break); page == *release_merge_page is a refault",
               "release_merge_page's address for the refault test"),
    ProbePoint("pone_slice_alloc_process", HOST, (ENTRY, RETURN),
               ("cow_break", "page tracked"), ("cow_break",),
               "the new page of a COW break; return 0 = page tracked",
               "fires before the comm filter: filter in BPF"),
    ProbePoint("delete_sd_tree", HOST, (RETURN,),
               ("unmerge", "cow_break(sharers left)"), ("unmerge", "cow_break"),
               "return = sharers left (> 0) after a merged mapping is removed"),
    ProbePoint("pone_slice_free_check_process", HOST, (ENTRY,),
               ("page freed",), ("unmerge",),
               "the page freed",
               "fires for every page freed on the host: filter in BPF"),
    ProbePoint("process_virt_page_release", HOST, (RETURN,),
               ("reclaim_release",), ("reclaim_release",),
               "return 0 released, 1 retry, 2 failed; the mark at page_mem "
               "(u64 indicator, int pool id @8, u64 slot @16)"),
    ProbePoint("is_virt_page_release", HOST, (RETURN,),
               ("reclaim_release(marked pages seen)",), ("reclaim_release",),
               "return 0 when the page IS marked (called twice per marked page)"),
    ProbePoint("release_merge_page", HOST, (),
               ("reclaim_refault",), ("reclaim_refault",),
               "exported pointer to the page released pages map: compared with the page of "
               "pone_slice_dec_mapcount_process",
               "its kallsyms address, read with bpf_probe_read", data=True),
    ProbePoint("mem_pool_reg", HOST, (ENTRY, RETURN),
               ("ppr pool registration (vm_start)",), ("vm_start",),
               "gfn, kvm, mm, task of the VM ioctl 0xAE49; return 0 = registered"),
    ProbePoint("delete_mm_in_pool", HOST, (ENTRY,),
               ("VM exit (vm_exit)",), ("vm_exit",),
               "mm of the VM that went away"),
    ProbePoint("msleep", HOST, (ENTRY, RETURN),
               ("scan_start", "scan_end"), ("scan_start", "scan_end"),
               "entry arg = 5000 - scan cost ms; one sleep per daemon cycle",
               "comm filter spdeamon in BPF (msleep is called everywhere)"),
    ProbePoint("handle_mm_fault", HOST, (ENTRY,),
               ("VM attribution (mm of each qemu process)",), ("merge", "cow_break"),
               "handle_mm_fault(mm, vma, address, flags): mm -> pid of the faulting qemu task",
               "comm filter qemu-system-x86 in BPF (fires on every page fault)"),
    ProbePoint("virt_mark_page_release", GUEST, (ENTRY, RETURN),
               ("reclaim_report",), ("reclaim_report",),
               "the guest page freed; return 0 marked, -1 not (no pool)"),
    ProbePoint("virt_mark_page_alloc", GUEST, (ENTRY,),
               ("reclaim_report(page reused)",), ("reclaim_report",),
               "the guest page allocated again"),
)

TRAPS: tuple[Trap, ...] = (
    Trap("process_slice_check", NEVER_CALLED,
         "has a symbol but every call is inlined: a kprobe attaches and never fires"),
    Trap("rmap_walk_pone_anon", INLINED, "every call inlined, no symbol (\"not traceable\")"),
)

# Symbols that say which kernel this is.
HOST_MARKERS = ("change_reverse_ref", "insert_sd_tree", "pone_slice_alloc_process")
GUEST_MARKERS = ("virt_mark_page_release", "virt_mark_page_alloc")


def detect_sides(symbols: SymbolTable) -> tuple[str, ...]:
    """(HOST,), (GUEST,), (HOST, GUEST) or (): which probe sets this kernel has symbols for."""
    sides = []
    if any(name in symbols for name in HOST_MARKERS):
        sides.append(HOST)
    if any(name in symbols for name in GUEST_MARKERS):
        sides.append(GUEST)
    return tuple(sides)


def points_for(sides: Iterable[str], table: Sequence[ProbePoint] = PROBE_POINTS
               ) -> tuple[ProbePoint, ...]:
    wanted = set(sides)
    return tuple(p for p in table if p.side in wanted)


@dataclass(frozen=True)
class Resolution:
    symbol: str
    status: str
    point: ProbePoint | None = None  # None for a trap that is no probe point
    addresses: tuple[int, ...] = ()
    variants: tuple[str, ...] = ()  # compiler clones found: name.cold, name.isra.0, ...
    unavailable: tuple[str, ...] = ()  # what it would give, when it cannot be used
    detail: str = ""  # one line

    @property
    def usable(self) -> bool:
        return self.status in USABLE

    @property
    def attach_by_address(self) -> bool:
        return self.status == DUPLICATE


def _hexes(addresses: Iterable[int]) -> str:
    return ", ".join(f"{a:#x}" for a in addresses)


def _clone_note(variants: Sequence[str]) -> str:
    """A .cold part belongs to the function (its unlikely paths, entered by a jump): entry and
    return probes on the name see it. Other clones (.constprop, .isra, .part) are called
    directly by some callers: those calls bypass a probe on the name."""
    if not variants:
        return ""
    cold = [v for v in variants if v.endswith(".cold") and v.count(".") == 1]
    clones = [v for v in variants if v not in cold]
    notes = []
    if cold:
        notes.append(f"{', '.join(cold)}: its cold part, covered by probes on the name")
    if clones:
        notes.append(f"compiler clones {', '.join(clones)}: calls to them are not seen by a "
                     "probe on the name")
    return "; " + "; ".join(notes)


def _resolve_point(p: ProbePoint, symbols: SymbolTable, traps: dict[str, Trap]
                   ) -> Resolution:
    found = symbols.lookup(p.symbol)
    variants = tuple(s.name for s in symbols.variants(p.symbol))
    addrs = tuple(s.address for s in found)
    trap = traps.get(p.symbol)
    if trap is not None and (found or trap.status == INLINED):
        return Resolution(p.symbol, trap.status, p, addrs, variants, p.gives,
                          f"{trap.reason}: {', '.join(p.gives)} unavailable")
    if not found:
        if symbols.is_inlined_only(p.symbol):
            unit = (symbols.inlined or {}).get(p.symbol, "?")
            why = f"exists only inlined (DWARF, {unit}): no address to probe"
            status = INLINED
        else:
            why = f"no symbol {p.symbol} in {symbols.origin}"
            status = MISSING
        if variants:
            why += f" (only compiler copies: {', '.join(variants)})"
        return Resolution(p.symbol, status, p, (), variants, p.gives,
                          f"{why}: {', '.join(p.gives)} unavailable")
    kind = "data" if p.data else "text"
    wrong_kind = [s for s in found if (s.is_text if p.data else not s.is_text)]
    if len(wrong_kind) == len(found):
        return Resolution(p.symbol, MISSING, p, addrs, variants, p.gives,
                          f"{p.symbol} is not a {kind} symbol here (type "
                          f"{found[0].type}): {', '.join(p.gives)} unavailable")
    by_address = len(found) > 1
    if symbols.addresses_hidden and (p.data or by_address):
        need = "its address" if p.data else f"the address of each of its {len(found)} copies"
        return Resolution(p.symbol, ADDRESS_HIDDEN, p, addrs, variants, p.gives,
                          f"needs {need}, but {symbols.origin} shows zeros (not privileged): "
                          f"{', '.join(p.gives)} unavailable")
    if by_address:
        return Resolution(p.symbol, DUPLICATE, p, addrs, variants, (),
                          f"{len(found)} symbols of this name: attach by address "
                          f"({_hexes(addrs)}){_clone_note(variants)}")
    where = "address hidden" if symbols.addresses_hidden else f"{addrs[0]:#x}"
    how = "read by address" if p.data else "kprobe by name"
    return Resolution(p.symbol, FOUND, p, addrs, variants, (),
                      f"{found[0].type} {where} ({how}){_clone_note(variants)}")


def _resolve_trap(t: Trap, symbols: SymbolTable) -> Resolution | None:
    found = symbols.lookup(t.symbol)
    if t.status == NEVER_CALLED and found:
        return Resolution(t.symbol, NEVER_CALLED, None, tuple(s.address for s in found),
                          detail=f"{t.reason} (not used as a probe point)")
    if t.status == INLINED and not found:
        return Resolution(t.symbol, INLINED, None, detail=f"{t.reason} (not used as a probe "
                          "point)")
    if found:  # a known trap that has a symbol after all (another build of the patch)
        return Resolution(t.symbol, FOUND, None, tuple(s.address for s in found),
                          detail=f"pone.md says: {t.reason}; this kernel has a symbol for it: "
                          "calls may still be inlined")
    return None


def resolve(table: Sequence[ProbePoint], symbols: SymbolTable,
            traps: Sequence[Trap] = TRAPS) -> list[Resolution]:
    """One Resolution per probe point of `table`, in order, then one per known trap of the
    table's sides that this symbol table says something about (present, or absent as expected
    for an inlined one). A probe point that is itself a known trap takes the trap's status."""
    by_name = {t.symbol: t for t in traps}
    out = [_resolve_point(p, symbols, by_name) for p in table]
    points = {p.symbol for p in table}
    sides = {p.side for p in table}
    for t in traps:
        if t.symbol in points or t.side not in sides:
            continue
        r = _resolve_trap(t, symbols)
        if r is not None:
            out.append(r)
    return out


def resolve_for_kernel(symbols: SymbolTable, sides: Sequence[str] | None = None,
                       table: Sequence[ProbePoint] = PROBE_POINTS,
                       traps: Sequence[Trap] = TRAPS) -> tuple[tuple[str, ...], list[Resolution]]:
    """The sides (detected unless given; both when none is detected) and the resolution of
    their probe points."""
    if sides is None:
        sides = detect_sides(symbols) or (HOST, GUEST)
    return tuple(sides), resolve(points_for(sides, table), symbols, traps)


def unavailable_events(resolutions: Iterable[Resolution]) -> list[str]:
    """What the tracer cannot give, in table order, without repeats."""
    out: list[str] = []
    for r in resolutions:
        for g in r.unavailable:
            if g not in out:
                out.append(g)
    return out


@dataclass
class ResolutionSummary:
    found: list[str] = field(default_factory=list)
    by_address: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # MISSING, INLINED, ADDRESS_HIDDEN points
    traps: list[str] = field(default_factory=list)  # trap rows (not probe points)

    def line(self) -> str:
        total = len(self.found) + len(self.by_address) + len(self.missing)
        parts = [f"{len(self.found) + len(self.by_address)} of {total} probe points found"]
        if self.by_address:
            parts.append(f"by address: {', '.join(self.by_address)}")
        if self.missing:
            parts.append(f"unusable: {', '.join(self.missing)}")
        if self.traps:
            parts.append(f"known traps: {', '.join(self.traps)}")
        return "; ".join(parts)


def summarize(resolutions: Iterable[Resolution]) -> ResolutionSummary:
    s = ResolutionSummary()
    for r in resolutions:
        if r.point is None:
            s.traps.append(f"{r.symbol} ({r.status})")
        elif r.status == FOUND:
            s.found.append(r.symbol)
        elif r.status == DUPLICATE:
            s.by_address.append(r.symbol)
        else:
            s.missing.append(r.symbol)
    return s
