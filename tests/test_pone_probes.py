"""pone_probes: the probe table of kernel/pone.md resolved against the recorded kernel's
kallsyms, and against tables with missing, duplicated, hidden and inlined symbols."""

from __future__ import annotations

import pytest

from conftest import PONE_FIXTURES
from dynvm_trace import events
from dynvm_trace import pone_probes as pp
from dynvm_trace import symbols as S

KALLSYMS = PONE_FIXTURES / "kallsyms-subset.txt"

HOST_POINTS = [
    "change_reverse_ref", "change_reverse_ref_one", "insert_sd_tree", "make_slice_wprotect",
    "pone_slice_can_reuse", "pone_slice_dec_mapcount_process", "pone_slice_alloc_process",
    "delete_sd_tree", "pone_slice_free_check_process", "process_virt_page_release",
    "is_virt_page_release", "release_merge_page", "mem_pool_reg", "delete_mm_in_pool",
    "msleep", "handle_mm_fault",
]
GUEST_POINTS = ["virt_mark_page_release", "virt_mark_page_alloc"]


@pytest.fixture(scope="module")
def kallsyms() -> S.SymbolTable:
    return S.parse_kallsyms(KALLSYMS.read_text(), str(KALLSYMS))


def _without(table: S.SymbolTable, *names: str) -> S.SymbolTable:
    return S.SymbolTable(table.origin, table.source,
                         [s for s in table.symbols if s.name not in names])


def test_table_is_pone_md():
    assert [p.symbol for p in pp.PROBE_POINTS if p.side == pp.HOST] == HOST_POINTS
    assert [p.symbol for p in pp.PROBE_POINTS if p.side == pp.GUEST] == GUEST_POINTS
    for p in pp.PROBE_POINTS:
        assert set(p.kinds) <= set(events.KINDS), p.symbol
        assert p.gives and p.how
        assert p.data == (p.hooks == ())
    by = {p.symbol: p for p in pp.PROBE_POINTS}
    assert by["change_reverse_ref"].hooks == (pp.ENTRY, pp.RETURN)
    assert by["change_reverse_ref"].gives == ("merge", "merge_fail(change_ref)")
    assert by["insert_sd_tree"].gives == ("unique insert", "duplicate found",
                                          "merge_fail(tree_insert)")
    assert by["make_slice_wprotect"].gives == ("merge_fail(write_protect)",)
    assert by["release_merge_page"].data and by["release_merge_page"].needs_address
    assert by["process_virt_page_release"].hooks == (pp.RETURN,)
    assert "spdeamon" in by["msleep"].needs
    assert [(t.symbol, t.status, t.side) for t in pp.TRAPS] == [
        ("process_slice_check", pp.NEVER_CALLED, pp.HOST),
        ("rmap_walk_pone_anon", pp.INLINED, pp.HOST)]


def test_fixture_is_a_host(kallsyms):
    assert pp.detect_sides(kallsyms) == (pp.HOST,)


def test_every_host_point_found_in_fixture(kallsyms):
    res = pp.resolve(pp.points_for([pp.HOST]), kallsyms)
    assert [(r.symbol, r.status) for r in res] == (
        [(n, pp.FOUND) for n in HOST_POINTS]
        + [("process_slice_check", pp.NEVER_CALLED), ("rmap_walk_pone_anon", pp.INLINED)])
    by = {r.symbol: r for r in res}
    assert by["change_reverse_ref"].addresses == (0xffffffff811e14f0,)
    assert by["change_reverse_ref"].detail == "T 0xffffffff811e14f0 (kprobe by name)"
    assert by["release_merge_page"].addresses == (0xffffffff83a99580,)
    assert by["release_merge_page"].detail == "B 0xffffffff83a99580 (read by address)"
    assert by["insert_sd_tree"].variants == ("insert_sd_tree.cold",)
    assert by["insert_sd_tree"].detail == (
        "T 0xffffffff811ed2c0 (kprobe by name); insert_sd_tree.cold: its cold part, covered "
        "by probes on the name")
    assert all(r.usable and not r.attach_by_address and r.unavailable == ()
               for r in res if r.point is not None)
    assert pp.unavailable_events(res) == []


def test_process_slice_check_flagged_never_called(kallsyms):
    res = pp.resolve(pp.points_for([pp.HOST]), kallsyms)
    (psc,) = [r for r in res if r.symbol == "process_slice_check"]
    assert psc.status == pp.NEVER_CALLED and psc.point is None
    assert psc.addresses == (0xffffffff811e3400,)
    assert psc.detail == ("has a symbol but every call is inlined: a kprobe attaches and never "
                          "fires (not used as a probe point)")
    # As a probe point of its own (some table that lists it), it is not usable.
    point = pp.ProbePoint("process_slice_check", pp.HOST, (pp.ENTRY,), ("slice check",), (),
                          "x")
    (r,) = pp.resolve([point], kallsyms, pp.TRAPS[:1])
    assert (r.status, r.usable, r.unavailable) == (pp.NEVER_CALLED, False, ("slice check",))


def test_missing_change_reverse_ref_marks_merge_unavailable(kallsyms):
    table = _without(kallsyms, "change_reverse_ref")
    res = pp.resolve(pp.points_for([pp.HOST]), table)
    (r,) = [r for r in res if r.symbol == "change_reverse_ref"]
    assert r.status == pp.MISSING and not r.usable
    assert r.unavailable == ("merge", "merge_fail(change_ref)")
    assert r.detail == ("no symbol change_reverse_ref in kallsyms: merge, "
                        "merge_fail(change_ref) unavailable")
    assert pp.unavailable_events(res) == ["merge", "merge_fail(change_ref)"]
    assert [x.symbol for x in res if x.status != pp.FOUND and x.point is not None] == [
        "change_reverse_ref"]
    s = pp.summarize(res)
    assert s.line() == ("15 of 16 probe points found; unusable: change_reverse_ref; known "
                        "traps: process_slice_check (never_called), rmap_walk_pone_anon "
                        "(inlined)")


def test_missing_with_only_clones(kallsyms):
    table = _without(kallsyms, "insert_sd_tree")
    (r,) = pp.resolve([p for p in pp.PROBE_POINTS if p.symbol == "insert_sd_tree"], table, ())
    assert r.status == pp.MISSING
    assert r.detail == ("no symbol insert_sd_tree in kallsyms (only compiler copies: "
                        "insert_sd_tree.cold): unique insert, duplicate found, "
                        "merge_fail(tree_insert) unavailable")


def test_duplicates_attach_by_address(kallsyms):
    table = S.SymbolTable("kallsyms", "", list(kallsyms.symbols) + [
        S.Symbol("delete_sd_tree", 0xffffffff81ffff00, "t"),
        S.Symbol("delete_sd_tree.isra.0", 0xffffffff81ffff80, "t")])
    (r,) = pp.resolve([p for p in pp.PROBE_POINTS if p.symbol == "delete_sd_tree"], table, ())
    assert r.status == pp.DUPLICATE and r.usable and r.attach_by_address
    assert r.addresses == (0xffffffff811ed3b0, 0xffffffff81ffff00)
    assert r.detail == (
        "2 symbols of this name: attach by address (0xffffffff811ed3b0, 0xffffffff81ffff00); "
        "delete_sd_tree.cold: its cold part, covered by probes on the name; compiler clones "
        "delete_sd_tree.isra.0: calls to them are not seen by a probe on the name")
    assert pp.summarize([r]).by_address == ["delete_sd_tree"]


def test_hidden_addresses(kallsyms):
    zero = S.SymbolTable("kallsyms", "", [S.Symbol(s.name, 0, s.type) for s in kallsyms.symbols])
    res = {r.symbol: r for r in pp.resolve(pp.points_for([pp.HOST]), zero)}
    assert res["change_reverse_ref"].status == pp.FOUND  # a kprobe by name needs no address
    assert res["change_reverse_ref"].detail == "T address hidden (kprobe by name)"
    r = res["release_merge_page"]
    assert r.status == pp.ADDRESS_HIDDEN and not r.usable
    assert r.unavailable == ("reclaim_refault",)
    assert [n for n, x in res.items() if x.status != pp.FOUND and x.point is not None] == [
        "release_merge_page"]


def test_wrong_kind_of_symbol():
    table = S.parse_kallsyms("ffffffff81000000 T release_merge_page\n"
                             "ffffffff81000010 D msleep\n")
    res = {r.symbol: r for r in pp.resolve(pp.PROBE_POINTS, table, ())}
    assert res["release_merge_page"].status == pp.MISSING
    assert res["release_merge_page"].detail == (
        "release_merge_page is not a data symbol here (type T): reclaim_refault unavailable")
    assert res["msleep"].status == pp.MISSING


def test_inlined_only_from_dwarf():
    table = S.SymbolTable("vmlinux", "vmlinux", [S.Symbol("change_reverse_ref", 0x1000, "T")],
                          inlined={"make_slice_wprotect": "mm/pone/slice_state.c"})
    res = {r.symbol: r for r in pp.resolve(pp.points_for([pp.HOST]), table, ())}
    r = res["make_slice_wprotect"]
    assert r.status == pp.INLINED and not r.usable
    assert r.detail == ("exists only inlined (DWARF, mm/pone/slice_state.c): no address to "
                        "probe: merge_fail(write_protect) unavailable")
    assert res["insert_sd_tree"].status == pp.MISSING


def test_guest_kernel_detected_and_resolved():
    table = S.parse_kallsyms("ffffffff81180000 T virt_mark_page_release\n"
                             "ffffffff81180100 T virt_mark_page_alloc\n"
                             "ffffffff81100000 T msleep\n")
    assert pp.detect_sides(table) == (pp.GUEST,)
    sides, res = pp.resolve_for_kernel(table)
    assert sides == (pp.GUEST,)
    assert [(r.symbol, r.status) for r in res] == [
        ("virt_mark_page_release", pp.FOUND), ("virt_mark_page_alloc", pp.FOUND)]


def test_stock_kernel_resolves_both_sides():
    table = S.parse_kallsyms("ffffffff81100000 T msleep\nffffffff81100100 T handle_mm_fault\n")
    assert pp.detect_sides(table) == ()
    sides, res = pp.resolve_for_kernel(table)
    assert sides == (pp.HOST, pp.GUEST)
    found = [r.symbol for r in res if r.status == pp.FOUND]
    assert found == ["msleep", "handle_mm_fault"]
    assert len([r for r in res if r.status == pp.MISSING]) == 16
