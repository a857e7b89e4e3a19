"""The ksm source's pure parts, without a kernel: compile flags from what the kernel has,
who counts as in KSM, and the decoding of ring buffer records into the event model."""

from __future__ import annotations

import errno

import numpy as np

from dynvm_trace.paths import Roots
from dynvm_trace.sources import ksm
from dynvm_trace.sources.ksm import EVENT, KsmSource, _defines, in_ksm


def test_defines_follow_the_tracepoints_present():
    flags = _defines({"ksm:ksm_merge_with_ksm_page", "ksm:ksm_start_scan", "ksm:ksm_stop_scan",
                      "ksm:ksm_enter", "syscalls:sys_enter_madvise"}, 24, True, 8)
    assert "-DHAVE_SCAN" in flags and "-DSTREAM" in flags and "-DRMAP_ADDR_OFF=24" in flags
    assert "-DHAVE_ENTER" not in flags  # ksm_exit missing: the pair is not usable
    assert "-DHAVE_MADVISE" not in flags  # sys_exit_madvise missing
    assert "-DRINGBUF_PAGES=8" in flags
    assert not any(f.startswith("-DHAVE_FAULT") for f in flags)


def test_defines_without_btf_or_stream():
    flags = _defines(set(), None, False, 8)
    assert "-DRMAP_ADDR_OFF=-1" in flags and "-DSTREAM" not in flags
    assert not any(f.startswith("-DHAVE_") for f in flags)


def test_in_ksm():
    assert not in_ksm(None) and not in_ksm({})
    assert not in_ksm({"ksm_rmap_items": 0, "ksm_merging_pages": 0, "ksm_mergeable": False})
    assert in_ksm({"ksm_rmap_items": 1})
    assert in_ksm({"ksm_merge_any": True})


def source(tmp_path, make_tree) -> KsmSource:
    """A KsmSource with no kernel behind it: just what _decode uses."""
    make_tree({"proc/42/comm": "qemu-kvm\n", "proc/7/comm": "python3\n"})
    src = object.__new__(KsmSource)
    src.roots = Roots(tmp_path / "sys", tmp_path / "proc")
    src._chunks, src._comms, src._vm_names = [], {}, {42: "guest1"}
    return src


def raw(*events: tuple) -> np.ndarray:
    arr = np.zeros(len(events), dtype=EVENT)
    for i, (ts, kind, pid, pfn, addr, arg, arg2) in enumerate(events):
        arr[i] = (ts, 0xFFFF0000, pfn, addr, arg, arg2, kind, pid)
    return arr


def test_decode_every_kind(tmp_path, make_tree):
    src = source(tmp_path, make_tree)
    neg = lambda e: (-e) & (2**64 - 1)  # noqa: E731 - err as the kernel's s64 in a u64
    src._chunks = [raw(
        (50, ksm.E_MERGE_EXISTING, 42, 0x100, 0x7F0000001000, 0, 0),
        (10, ksm.E_MERGE_NEW, 42, 0x101, 0x7F0000000000, 0, 0),  # out of order: sorted by ts
        (60, ksm.E_MERGE_FAIL, 0, 0x102, 0, neg(errno.EBUSY), 0),
        (70, ksm.E_SCAN_START, 0, 0, 0, 9, 1234),
        (80, ksm.E_COW, 7, 0, 0x5000, 0, 0),
        (90, ksm.E_RELEASE, 7, 0, 0x8000, 4, 1 << 1 | 0),  # madvise, unmapped 1 merged page
        (95, ksm.E_RELEASE, 7, 0, 0x200000, 16, 1),         # punch hole at file offset
        (99, ksm.E_REFAULT, 7, 0, 0x8000, 1, 0),
    ), raw(
        (100, ksm.E_ENTER, 7, 0, 0, 0, 0),                   # kept in the kernel: no record
        (110, ksm.E_UNMERGE, 0, 0x103, 0, 0, 0),
    )]
    recs = src._decode()
    assert [r["kind"] for r in recs] == ["merge", "merge", "merge_fail", "scan_start",
                                         "cow_break", "unmerge", "reclaim_release",
                                         "reclaim_release", "reclaim_refault", "unmerge"]
    assert src._chunks == []
    new, existing = recs[0], recs[1]
    assert new == {"kind": "merge", "ts": 10, "src": "ksm", "pid": 42, "comm": "qemu-kvm",
                   "vm": "guest1", "pfn": 0x101, "into": "new", "addr": 0x7F0000000000}
    assert existing["into"] == "existing"
    assert recs[2]["reason"] == "EBUSY" and recs[2]["code"] == errno.EBUSY
    assert recs[2]["stage"] == "ksm page" and "pid" not in recs[2]
    assert recs[3]["seq"] == 9 and recs[3]["rmap_entries"] == 1234
    assert recs[4] == {"kind": "cow_break", "ts": 80, "src": "ksm", "pid": 7, "comm": "python3",
                       "addr": 0x5000}
    assert recs[5]["reason"] == "released" and recs[5]["addr"] == 0x8000
    assert recs[6]["pages"] == 4 and recs[6]["discard"] == "madvise"
    assert recs[7]["discard"] == "punch_hole" and recs[7]["offset"] == 0x200000
    assert "addr" not in recs[7]
    assert recs[8] == {"kind": "reclaim_refault", "ts": 99, "src": "ksm", "pid": 7,
                       "comm": "python3", "pages": 1, "addr": 0x8000}
    assert recs[9] == {"kind": "unmerge", "ts": 110, "src": "ksm", "reason": "ksm page removed",
                       "pfn": 0x103}


def test_decode_merges_only_in_order_with_field_order(tmp_path, make_tree):
    src = source(tmp_path, make_tree)
    src._chunks = [raw((5, ksm.E_MERGE_ZERO, 0, 0x1, 0, 0, 0)),
                   raw((3, ksm.E_MERGE_NEW, 42, 0x2, 0x3000, 0, 0))]
    recs = src._decode()
    assert [list(r) for r in recs] == [
        ["kind", "ts", "src", "pid", "comm", "vm", "pfn", "into", "addr"],
        ["kind", "ts", "src", "pfn", "into"]]
    assert [r["into"] for r in recs] == ["new", "zero"]


def test_decode_nothing_and_unknown_errno(tmp_path, make_tree):
    src = source(tmp_path, make_tree)
    assert src._decode() == []
    src._chunks = [raw((1, ksm.E_MERGE_FAIL, 0, 0, 0, (-4000) & (2**64 - 1), 1))]
    rec = src._decode()[0]
    assert rec["code"] == 4000 and rec["reason"] == "4000" and rec["stage"] == "zero page"


def test_decode_gone_process_has_pid_but_no_comm(tmp_path, make_tree):
    src = source(tmp_path, make_tree)
    src._chunks = [raw((1, ksm.E_COW, 999, 0, 0x1000, 0, 0))]
    assert src._decode()[0] == {"kind": "cow_break", "ts": 1, "src": "ksm", "pid": 999,
                                "addr": 0x1000}
