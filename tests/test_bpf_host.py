"""bpf_host's pure parts: tracefs format files (real, truncated, garbled), tracepoint checks
against fixture tracefs trees, capabilities from /proc/self/status."""

from __future__ import annotations

import pytest

from dynvm_trace import bpf_host
from dynvm_trace.bpf_host import (FIELDS, RAW, TRACEPOINTS, available_tracepoints,
                                  check_tracepoint, parse_format_fields)
from dynvm_trace.paths import Roots

from test_btf import tracepoint_blob

MERGE_FORMAT = """name: ksm_merge_with_ksm_page
ID: 744
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * ksm_page;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long pfn;\toffset:16;\tsize:8;\tsigned:0;
\tfield:void * rmap_item;\toffset:24;\tsize:8;\tsigned:0;
\tfield:void * mm;\toffset:32;\tsize:8;\tsigned:0;
\tfield:int err;\toffset:40;\tsize:4;\tsigned:1;

print fmt: "%spfn %lu rmap_item %p mm %p error %d", (REC->ksm_page ? "ksm " : ""), REC->pfn
"""


def test_real_format_file():
    assert parse_format_fields(MERGE_FORMAT) == ["ksm_page", "pfn", "rmap_item", "mm", "err"]


@pytest.mark.parametrize("line, name", [
    ("\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;", "comm"),
    ("\tfield:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;", "name"),
    ("\tfield:const char *filename;\toffset:8;\tsize:8;\tsigned:0;", "filename"),
    ("\tfield:unsigned long address;\toffset:8;\tsize:8;\tsigned:0;", "address"),
    ("field:int behavior;", "behavior"),
])
def test_field_declarations(line, name):
    assert parse_format_fields(line) == [name]


@pytest.mark.parametrize("text", [
    "", "name: x\nID: 1\nformat:\n",
    "\tfield:int err",                      # truncated before the ';'
    "\tfield:;\toffset:0;",                 # no declaration
    "\tfield:   ;\toffset:0;",
    "\x00\xff garbage \n field int x;",
    "print fmt: \"field:int x;\"",          # not at the start of a line
])
def test_truncated_or_garbled_gives_no_fields(text):
    assert parse_format_fields(text) == []


def test_truncated_file_keeps_the_complete_fields():
    cut = MERGE_FORMAT[:MERGE_FORMAT.index("rmap_item;") + 3]
    assert parse_format_fields(cut) == ["ksm_page", "pfn"]


def tracefs(make_tree, formats: dict[str, str]) -> Roots:
    files = {f"sys/kernel/tracing/events/{path.replace(':', '/')}/format": text
             for path, text in formats.items()}
    root = make_tree(files or {"sys/kernel/tracing/events/.keep": ""})
    return Roots(root / "sys", root / "proc")


def test_tracepoint_present_with_fields(make_tree):
    roots = tracefs(make_tree, {"ksm:ksm_merge_with_ksm_page": MERGE_FORMAT})
    check = check_tracepoint(roots, TRACEPOINTS[0])
    assert check.ok and "present with ksm_page" in check.detail


def test_tracepoint_lacking_a_field_names_it(make_tree):
    roots = tracefs(make_tree, {"ksm:ksm_merge_with_ksm_page":
                                MERGE_FORMAT.replace("rmap_item;", "rmap;")})
    check = check_tracepoint(roots, TRACEPOINTS[0])
    assert not check.ok and "lacks field(s) rmap_item" in check.detail


def test_missing_tracepoint_and_missing_tracefs(make_tree, tmp_path):
    check = check_tracepoint(tracefs(make_tree, {}), TRACEPOINTS[0])
    assert not check.ok and "not in this kernel" in check.detail
    bare = Roots(tmp_path / "nothing", tmp_path / "nothing")
    assert not check_tracepoint(bare, TRACEPOINTS[0]).ok
    assert available_tracepoints(bare) == {}


def test_available_tracepoints_is_what_has_its_fields(make_tree):
    roots = tracefs(make_tree, {
        "ksm:ksm_merge_with_ksm_page": MERGE_FORMAT,
        "ksm:ksm_enter": "\tfield:void * mm;\toffset:8;\tsize:8;\tsigned:0;\n",
        "ksm:ksm_exit": "\tfield:void * m",  # truncated: no mm field
    })
    assert available_tracepoints(roots) == {"ksm:ksm_merge_with_ksm_page": FIELDS,
                                            "ksm:ksm_enter": FIELDS}


def with_btf(roots: Roots, blob: bytes) -> Roots:
    path = roots.sys("kernel", "btf", "vmlinux")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return roots


MERGE_ARGS = [2, 2, 1, 2, 2, 13]  # (data, ksm_page, pfn, rmap_item, mm, err): see tracepoint_blob


def test_raw_where_btf_gives_the_expected_arguments(make_tree, tmp_path):
    """Raw needs no tracefs: BTF alone says the tracepoint is there with these arguments."""
    roots = with_btf(Roots(tmp_path / "sys", tmp_path / "proc"),
                     tracepoint_blob(MERGE_ARGS, "ksm_merge_with_ksm_page").bytes())
    check = check_tracepoint(roots, TRACEPOINTS[0])
    assert check.ok and check.detail == ("present, raw: BTF gives "
                                         "(void *, long unsigned int, void *, void *, int) (merges)")
    assert available_tracepoints(roots) == {"ksm:ksm_merge_with_ksm_page": RAW}
    assert available_tracepoints(roots, raw=False) == {}
    blockers = {c.name for c in bpf_host.ksm_blockers(roots)}
    assert not {"tracefs", "tracepoint ksm:ksm_merge_with_ksm_page"} & blockers, blockers


@pytest.mark.parametrize("params, gives", [
    (MERGE_ARGS[:-1], "void *, long unsigned int, void *, void *"),   # one argument fewer
    ([2, 2, 1, 2, 4, 13], "void *, long unsigned int, void *, struct pt_regs *, int"),
])
def test_other_arguments_fall_back_to_fields(make_tree, params, gives):
    roots = with_btf(tracefs(make_tree, {"ksm:ksm_merge_with_ksm_page": MERGE_FORMAT}),
                     tracepoint_blob(params, "ksm_merge_with_ksm_page").bytes())
    check = check_tracepoint(roots, TRACEPOINTS[0])
    assert check.ok and check.detail.endswith(f"(merges); not raw: BTF gives ({gives})")
    assert available_tracepoints(roots) == {"ksm:ksm_merge_with_ksm_page": FIELDS}


@pytest.mark.parametrize("blob", [b"garbage", tracepoint_blob([2, 99], "ksm_merge_with_ksm_page").bytes()])
def test_garbled_btf_falls_back_to_fields(make_tree, blob):
    roots = with_btf(tracefs(make_tree, {"ksm:ksm_merge_with_ksm_page": MERGE_FORMAT}), blob)
    assert available_tracepoints(roots) == {"ksm:ksm_merge_with_ksm_page": FIELDS}


@pytest.mark.parametrize("status, caps", [
    ("Name:\tx\nCapEff:\t000001ffffffffff\n", 0x1FFFFFFFFFF),
    ("CapEff:\t0000000000000000\n", 0),
    ("CapEff:\tzz\n", 0), ("CapEff:\n", 0), ("", 0), ("CapEff 12\n", 0),
])
def test_effective_caps(make_tree, tmp_path, status, caps):
    make_tree({"proc/self/status": status})
    assert bpf_host._effective_caps(Roots(tmp_path / "sys", tmp_path / "proc")) == caps
