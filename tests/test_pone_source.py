"""The pone source: probes/pone.c within Linux 4.4 BPF (text, bcc's rewrite, the bytecode),
compiled and loaded through this machine's verifier, the whole source against the fake
kernel fed by the emulated host, and its unavailability messages."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dynvm_trace import exitcodes
from dynvm_trace.emulator.scenario import load_scenario
from dynvm_trace.paths import Roots
from dynvm_trace.pone_fake_kernel import FakeKernel
from dynvm_trace.report import summarize
from dynvm_trace.sources import pone as ps
from dynvm_trace.sources.base import SourceUnavailable

from conftest import PONE_FIXTURES
from emulator_helpers import SEC, run

KALLSYMS = PONE_FIXTURES / "kallsyms-subset.txt"


# --- Linux 4.4 BPF: what the program may use --------------------------------------------------

# Helpers a 4.4 kprobe program may call (include/uapi/linux/bpf.h of 4.4), by id and name.
HELPERS_4_4 = {1: "map_lookup_elem", 2: "map_update_elem", 3: "map_delete_elem",
               4: "probe_read", 5: "ktime_get_ns", 6: "trace_printk", 7: "get_prandom_u32",
               8: "get_smp_processor_id", 14: "get_current_pid_tgid", 15: "get_current_uid_gid",
               16: "get_current_comm", 25: "perf_event_output"}
# What probes/pone.c may name itself; bcc turns the map methods into the map helpers.
SOURCE_HELPERS = {"bpf_probe_read", "bpf_ktime_get_ns", "bpf_get_current_pid_tgid",
                  "bpf_get_current_comm"}
REWRITTEN_HELPERS = SOURCE_HELPERS | {f"bpf_{n}" for n in HELPERS_4_4.values()} | {"bpf_pseudo_fd"}
MAP_MACROS = {"BPF_HASH", "BPF_ARRAY", "BPF_PERF_OUTPUT"}
MAP_METHODS = {"lookup", "update", "delete", "perf_submit"}
MAX_INSNS_4_4 = 4096


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def problems_4_4(text: str) -> list[str]:
    """What in a bcc C program Linux 4.4 would not run: an allowlist of helpers, map macros and
    map methods; no program types but kprobes; no loops; atomics only as statements (XADD)."""
    code = _strip_comments(text)
    out = []
    for name in sorted(set(re.findall(r"\b(bpf_\w+)\s*\(", code)) - SOURCE_HELPERS):
        out.append(f"helper {name}")
    for name in sorted(set(re.findall(r"\b(BPF_[A-Z_0-9]+)\s*\(", code)) - MAP_MACROS):
        out.append(f"map or macro {name}")
    for name in sorted(set(re.findall(r"\.\s*(\w+)\s*\(", code)) - MAP_METHODS):
        out.append(f"map method .{name}()")
    for name in sorted(set(re.findall(r"\b([A-Z_]*(?:TRACEPOINT|KFUNC|KRETFUNC|LSM|RAW_TRACEPOINT)"
                                      r"_PROBE)\b", code))):
        out.append(f"program type {name}")
    for m in re.finditer(r"\b(for|while|do)\b", code):
        before = code[:m.start()].rstrip().splitlines()
        if m[1] != "while" or not before or not before[-1].endswith("}"):  # not do {...} while
            if not (before and before[-1].strip().startswith("#pragma unroll")):
                out.append(f"loop '{m[1]}' without #pragma unroll")
    for m in re.finditer(r"__sync_\w+|__atomic_\w+", code):
        line = code[code.rfind("\n", 0, m.start()) + 1:code.find("\n", m.end())]
        if m[0] != "__sync_fetch_and_add" or not line.strip().startswith(m[0]):
            out.append(f"atomic {m[0]} (4.4 has only XADD, its result unused)")
    return out


def test_probe_text_uses_only_linux_4_4_bpf():
    assert problems_4_4(ps.probe_text()) == []


def test_the_4_4_check_catches_what_4_4_lacks():
    bad = """
BPF_PERCPU_ARRAY(x, u64, 1);
BPF_RINGBUF_OUTPUT(rb, 8);
BPF_STACK_TRACE(st, 8);
TRACEPOINT_PROBE(sched, sched_switch) { return 0; }
int f(struct pt_regs *ctx) {
    struct task_struct *t = (void *)bpf_get_current_task();
    u64 v = 0;
    bpf_probe_read_kernel(&v, 8, t);
    for (int i = 0; i < 4; i++) v++;
    u64 old = __sync_fetch_and_add(&v, 1);
    rb.ringbuf_output(&v, 8, 0);
    return bpf_loop(4, 0, 0, 0);
}
"""
    found = problems_4_4(bad)
    for what in ("BPF_PERCPU_ARRAY", "BPF_RINGBUF_OUTPUT", "BPF_STACK_TRACE", "TRACEPOINT_PROBE",
                 "bpf_get_current_task", "bpf_probe_read_kernel", "bpf_loop", "loop 'for'",
                 "atomic __sync_fetch_and_add", ".ringbuf_output"):
        assert any(what in p for p in found), (what, found)
    assert problems_4_4("#pragma unroll\nfor (int i = 0; i < 4; i++) x++;") == []


def test_raw_event_matches_struct_event():
    body = re.search(r"struct event \{(.*?)\};", ps.probe_text(), re.S)[1]
    fields = re.findall(r"^\s*(u64|s64|u32)\s+(\w+);", _strip_comments(body), re.M)
    numpy_type = {"u64": "<u8", "s64": "<i8", "u32": "<u4"}
    assert [(n, numpy_type[t]) for t, n in fields] == \
        [(n, ps.RAW_EVENT.fields[n][0].str) for n in ps.RAW_EVENT.names]
    assert ps.RAW_EVENT.itemsize == 56


def test_program_table_matches_probe_text():
    programs = set(re.findall(r"^int (on_\w+)\(struct pt_regs \*ctx\)", ps.probe_text(), re.M))
    assert programs == {ps.program_name(s, h) for s, hooks in ps.ATTACH.items() for h in hooks}
    guards = set(re.findall(r"^#ifdef HAVE_(\w+)", ps.probe_text(), re.M))
    assert guards == {s.upper() for s in ps.ATTACH}
    counters = re.search(r"enum \{\s*(C_MERGE.*?)N_COUNTERS", ps.probe_text(), re.S)[1]
    assert [c.strip() for c in counters.split(",") if c.strip()] == \
        [f"C_{x}" for x in ("MERGE", "MERGE_FAIL_REF", "MERGE_FAIL_TREE", "MERGE_FAIL_WP",
                            "TREE_NEW", "TREE_DUP", "COW", "UNMERGE", "RELEASE",
                            "RELEASE_RETRY", "RELEASE_FAIL", "REFAULT", "RELEASED_UNMAPPED",
                            "SCAN", "POOL_REG", "POOL_REG_FAIL", "VM_EXIT", "GUEST_MARK",
                            "GUEST_MARK_FAIL", "GUEST_ALLOC", "UNRESOLVED_MM", "STASH_FULL")]
    assert len(ps.COUNTERS) == len(ps.C) == 22


# --- compiled by bcc, loaded through this kernel's verifier -------------------------------------

ALL_POINTS = set(ps.ATTACH)
# A kernel without the attribution and COW probes, and no release_merge_page address.
SOME_POINTS = {"change_reverse_ref", "insert_sd_tree", "msleep", "process_virt_page_release"}
GUEST_ONLY = {"virt_mark_page_release", "virt_mark_page_alloc"}


def _bcc_or_skip():
    if os.geteuid() != 0:
        pytest.skip("not root: loading BPF programs needs root")
    try:
        bcc = ps.import_bcc()
    except (ImportError, OSError) as e:
        pytest.skip(f"bcc missing ({e}): apt-get install python3-bpfcc")
    if not (ps.headers_dir() / "include").is_dir():
        pytest.skip(f"no kernel headers at {ps.headers_dir()}")
    return bcc


def _insns(raw: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("<BBhi", raw[i:i + 8]) for i in range(0, len(raw), 8)]


def bytecode_problems(insns: list[tuple[int, int, int, int]]) -> list[str]:
    """What in compiled BPF Linux 4.4's verifier lacks: helpers beyond 4.4, bpf-to-bpf calls,
    32-bit jumps (JMP32, 5.1), atomics other than XADD, loops (a cycle in the control flow),
    more than 4096 instructions."""
    out = []
    if len(insns) > MAX_INSNS_4_4:
        out.append(f"{len(insns)} instructions")
    succ: dict[int, list[int]] = {}
    i = 0
    while i < len(insns):
        code, regs, off, imm = insns[i]
        cls, op = code & 0x07, code & 0xF0
        if code == 0x85:
            if regs >> 4:
                out.append(f"insn {i}: bpf-to-bpf call")
            elif imm not in HELPERS_4_4:
                out.append(f"insn {i}: helper #{imm}")
        if cls == 0x06:
            out.append(f"insn {i}: JMP32")
        if code in (0xDB, 0xC3) and imm != 0:
            out.append(f"insn {i}: atomic op {imm:#x}")
        width = 2 if code == 0x18 else 1  # ld_imm64 takes two slots
        if code == 0x95:
            succ[i] = []
        elif cls == 0x05 and code != 0x85:
            succ[i] = [i + 1 + off] if op == 0x00 else [i + 1, i + 1 + off]
        else:
            succ[i] = [i + width]
        i += width
    state: dict[int, int] = {}  # 1 on the DFS path, 2 done
    stack = [(0, iter(succ.get(0, [])))]
    state[0] = 1
    while stack:
        node, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            state[node] = 2
            stack.pop()
        elif state.get(nxt) == 1:
            out.append(f"loop: insn {node} jumps back to {nxt}")
        elif nxt not in state:
            state[nxt] = 1
            stack.append((nxt, iter(succ.get(nxt, []))))
    return out


def test_bytecode_check_finds_loops_and_new_helpers():
    loop = [(0xB7, 0, 0, 0), (0x07, 0, 0, 1), (0x55, 0, -2, 10), (0x95, 0, 0, 0)]
    assert any("loop" in p for p in bytecode_problems(loop))
    new_helper = [(0x85, 0, 0, 35), (0x95, 0, 0, 0)]  # bpf_get_current_task
    assert bytecode_problems(new_helper) == ["insn 0: helper #35"]
    fetch_add = [(0xDB, 0x10, 0, 0x01), (0x95, 0, 0, 0)]
    assert bytecode_problems(fetch_add) == ["insn 0: atomic op 0x1"]
    shared_tail = [(0x15, 0, 1, 0), (0x05, 0, 1, 0), (0xB7, 0, 0, 1), (0x95, 0, 0, 0)]
    assert bytecode_problems(shared_tail) == []


@pytest.mark.live
@pytest.mark.parametrize("have,release_page", [(ALL_POINTS, 0xFFFFFFFF83A99580),
                                               (SOME_POINTS, None), (GUEST_ONLY, None)],
                         ids=["every-point", "some-missing", "guest"])
def test_programs_compile_and_load_through_the_verifier(have, release_page, capfd):
    bcc = _bcc_or_skip()
    b = bcc.BPF(text=ps.probe_text().encode(), cflags=ps.cflags(have, release_page),
                debug=bcc.DEBUG_PREPROCESSOR)
    try:
        rewritten = capfd.readouterr().err
        names = {bcc.lib.bpf_function_name(b.module, i).decode()
                 for i in range(bcc.lib.bpf_num_functions(b.module))}
        assert names == {ps.program_name(s, h) for s in have for h in ps.ATTACH[s]}
        for name in sorted(names):
            b.load_func(name.encode(), bcc.BPF.KPROBE)  # through this kernel's verifier, not attached
            start = bcc.lib.bpf_function_start(b.module, name.encode())
            size = bcc.lib.bpf_function_size(b.module, name.encode())
            assert bytecode_problems(_insns(ctypes.string_at(start, size))) == [], name
        # bcc's rewrite adds calls of its own (map helpers, the perf output): all of 4.4
        assert "on_" in rewritten, "bcc printed no rewritten source"
        called = set(re.findall(r"\b(bpf_\w+)\s*\(", _strip_comments(rewritten)))
        assert called - REWRITTEN_HELPERS == set()
        assert "CUR_CPU_IDENTIFIER" not in rewritten or \
            "bpf_get_smp_processor_id" in " ".join(ps.cflags(have, release_page))
    finally:
        b.cleanup()


# --- the whole source against the fake kernel ---------------------------------------------------

def _pone_run(tmp_path: Path, scenario: str = "run1", kallsyms: Path = KALLSYMS,
              interval_s: float = 1.0, **kw: Any):
    sc = load_scenario(scenario)
    kernel = FakeKernel(sc, tmp_path, kallsyms, **kw)
    warnings: list[str] = []
    src = ps.PoneSource(kernel.roots, kernel=kernel, warn=warnings.append,
                        page_size_=sc.page_size)
    batches = [b.records for b in src.batches(int(interval_s * SEC))]
    src.close()
    return src, kernel, batches, warnings


def _events(batches) -> list[dict[str, Any]]:
    return [r for b in batches for r in b if r["kind"] != "counters"]


def test_run1_through_the_fake_kernel_matches_the_emulator(tmp_path):
    src, kernel, batches, warnings = _pone_run(tmp_path)
    emulated = run("run1")
    mine = _events(batches)
    assert Counter(r["kind"] for r in mine) == Counter(
        r["kind"] for r in emulated.records if r["kind"] != "counters")
    # merges carry the same pages, VM and address as the emulator said
    def key(r):
        return (r["ts"], r["pfn"], r["old_pfn"], r.get("addr", 0), r["pid"], r["comm"], r["vm"])
    assert [key(r) for r in mine if r["kind"] == "merge"] == \
        [key(r) for r in emulated.of("merge")]
    assert {r["src"] for r in mine} == {"pone"}
    # the report: correlation agrees, as for the emulator's own log
    mine_summary = summarize((src.header(), batches))
    theirs = summarize((emulated.source.header(), [emulated.records]))
    assert mine_summary["correlation"]["verdict"] == theirs["correlation"]["verdict"] == "agrees"
    assert {r["rule"]: r["verdict"] for r in mine_summary["correlation"]["rules"]}[
        "pone stream: cow breaks"] == "agrees"
    assert {r["rule"] for r in mine_summary["correlation"]["rules"]} >= {"merges",
                                                                         "sharing removed"}
    assert mine_summary["totals"]["events"] == theirs["totals"]["events"]
    # the in-kernel counters and the sysfs counters came with every snapshot
    probes = [r for b in batches for r in b if r["kind"] == "counters" and r["group"] == "pone_probes"]
    assert probes[-1]["values"]["merge"] == len(emulated.of("merge")) == 67534
    assert probes[-1]["values"]["cow_break"] == 2000
    info = [r for b in batches for r in b if r["kind"] == "counters" and r["group"] == "pone_info"]
    assert info[-1]["values"] == emulated.last
    # every probe point of the recorded kernel is attached by name; the rest is said
    assert {event for _, _, event, _ in kernel.attached} == set(ps.ATTACH) - {
        "virt_mark_page_release", "virt_mark_page_alloc"}
    assert src.plan.release_merge_page == 0xFFFFFFFF83A99580
    assert any(w.startswith("probe point process_slice_check:") for w in warnings)
    assert any(w.startswith("probe point pone_slice_free_check_process: not attached")
               for w in warnings)
    header = src.header()
    assert header["source"] == "pone" and header["clock"] == "emulated"
    assert header["dialect"] == "virt_release" and header["sides"] == ["host"]


def test_perf_buffer_losses_become_lost_records(tmp_path):
    src, kernel, batches, _ = _pone_run(tmp_path, capacity=1000)
    events = _events(batches)
    lost = sum(r["count"] for r in events if r["kind"] == "lost")
    merges = sum(1 for r in events if r["kind"] == "merge")
    probes = [r for b in batches for r in b if r["kind"] == "counters" and r["group"] == "pone_probes"]
    assert lost > 0 and merges < 67534
    assert probes[-1]["values"]["merge"] == 67534  # the in-kernel totals lose nothing
    verdicts = {r["rule"]: r["verdict"] for r in summarize((src.header(), batches))
                ["correlation"]["rules"]}
    assert verdicts["merges"] == "explained"
    assert verdicts["pone stream: merges"] == "explained"  # the stream against its own counters


def test_guide_dialect_adds_pone_abstract(tmp_path):
    src, _, batches, _ = _pone_run(tmp_path, dialect="guide")
    groups = Counter(r["group"] for b in batches for r in b if r["kind"] == "counters")
    assert groups["pone_abstract"] == groups["pone_info"] > 0
    assert summarize((src.header(), batches))["correlation"]["verdict"] == "agrees"


def _kallsyms_variant(tmp_path: Path, drop: tuple[str, ...] = (), add: str = "") -> Path:
    lines = [ln for ln in KALLSYMS.read_text().splitlines()
             if ln.split()[-1] not in drop]
    path = tmp_path / "kallsyms"
    path.write_text("\n".join(lines) + "\n" + add)
    return path


def test_missing_probe_points_are_skipped_with_the_events_they_give(tmp_path):
    ks = _kallsyms_variant(tmp_path, drop=("change_reverse_ref_one", "release_merge_page"))
    src, kernel, batches, warnings = _pone_run(tmp_path / "w", kallsyms=ks)
    assert "change_reverse_ref_one" not in {e for _, _, e, _ in kernel.attached}
    assert src.plan.release_merge_page is None
    assert any("change_reverse_ref_one" in w and "unavailable" in w for w in warnings)
    assert "reclaim_refault" in src.header()["unavailable"]
    merges = [r for r in _events(batches) if r["kind"] == "merge"]
    assert len(merges) == 67534 and not any("pid" in r or "addr" in r for r in merges)


def test_duplicate_names_attach_by_address(tmp_path):
    ks = _kallsyms_variant(tmp_path, add="ffffffff81000000 T _text\n"
                                         "ffffffff811f0000 t change_reverse_ref_one\n")
    src, kernel, _, _ = _pone_run(tmp_path / "w", kallsyms=ks)
    by_address = [(p, e, off) for p, _, e, off in kernel.attached if e == "_text"]
    assert by_address == [("on_change_reverse_ref_one", "_text", 0x1E1020),
                          ("on_change_reverse_ref_one", "_text", 0x1F0000)]


def test_decode_events_is_the_one_decoder():
    rows = [(30, 7, 0, 0x7F0000, 2, ps.E_MERGE_FAIL, 0, 55, 1),
            (10, 100, 200, 0x7F1000, 0, ps.E_MERGE, 1046, 55, 0),
            (20, 5, 0, 0, 1, ps.E_RELEASE, 0, 56, 0),
            (40, 9, 0, 0, -1, ps.E_GUEST_MARK, 0, 0, 0),
            (50, 0, 0, 0, 4990, ps.E_SCAN_END, 0, 0, 3),
            (60, 0, 0, 0, 0, 99, 0, 0, 0)]  # an unknown kind: skipped
    raw = np.array(rows, dtype=ps.RAW_EVENT).tobytes()
    recs = ps.decode_events(raw, lambda pid: {"pid": pid, "comm": "qemu-system-x86"} if pid else {})
    assert recs == [
        {"kind": "merge", "ts": 10, "src": "pone", "pid": 1046, "comm": "qemu-system-x86",
         "pfn": 100, "old_pfn": 200, "addr": 0x7F1000, "tid": 55},
        {"kind": "reclaim_release", "ts": 20, "src": "pone", "pages": 1, "status": "retry",
         "pfn": 5, "tid": 56},
        {"kind": "merge_fail", "ts": 30, "src": "pone", "reason": "page lock not taken",
         "stage": "change_ref", "code": 2, "pfn": 7, "addr": 0x7F0000, "tid": 55},
        {"kind": "reclaim_report", "ts": 40, "src": "pone", "pages": 1, "gfns": [9], "ok": False},
        {"kind": "scan_end", "ts": 50, "src": "pone", "seq": 3, "sleep_ms": 4990},
    ]


# --- unavailability -----------------------------------------------------------------------------

@pytest.fixture
def pone_host(tmp_path) -> Roots:
    """A fixture host: the recorded sysfs tree, its kallsyms, no tracefs."""
    shutil.copytree(PONE_FIXTURES / "sysfs-idle", tmp_path / "sys")
    (tmp_path / "proc").mkdir()
    shutil.copy(KALLSYMS, tmp_path / "proc" / "kallsyms")
    return Roots(sysfs=tmp_path / "sys", proc=tmp_path / "proc")


def _unavailable(roots: Roots) -> SourceUnavailable:
    with pytest.raises(SourceUnavailable) as e:
        ps.PoneSource(roots)
    assert "\n" not in str(e.value)
    return e.value


def test_unavailable_without_the_patched_kernel(tmp_path):
    (tmp_path / "proc").mkdir()
    e = _unavailable(Roots(sysfs=tmp_path / "sys", proc=tmp_path / "proc"))
    assert e.exit_code == exitcodes.MISSING_FEATURE
    assert str(e).startswith("pone source unavailable: ") and "kernel/mm/pone not found" in str(e)
    assert "fix: boot the patched kernel" in str(e)


def test_unavailable_when_not_root(pone_host, monkeypatch):
    monkeypatch.setattr(ps.os, "geteuid", lambda: 1000)
    e = _unavailable(pone_host)
    assert e.exit_code == exitcodes.NOT_PERMITTED
    assert "not root" in str(e) and "fix: run as root" in str(e)


def test_unavailable_without_bcc(pone_host, monkeypatch):
    monkeypatch.setattr(ps.os, "geteuid", lambda: 0)

    def no_bcc():
        raise ImportError("No module named 'bcc'")
    monkeypatch.setattr(ps, "import_bcc", no_bcc)
    e = _unavailable(pone_host)
    assert e.exit_code == exitcodes.MISSING_FEATURE and "apt-get install python3-bpfcc" in str(e)


def test_unavailable_without_kprobes(pone_host, monkeypatch):
    monkeypatch.setattr(ps.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ps, "import_bcc", lambda: None)
    e = _unavailable(pone_host)
    assert e.exit_code == exitcodes.MISSING_FEATURE and "no kprobe_events" in str(e)


def test_unavailable_without_headers(pone_host, monkeypatch, tmp_path):
    monkeypatch.setattr(ps.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ps, "import_bcc", lambda: None)
    (pone_host.sysfs / "kernel" / "debug" / "tracing").mkdir(parents=True)
    (pone_host.sysfs / "kernel" / "debug" / "tracing" / "kprobe_events").write_text("")
    monkeypatch.setattr(ps, "headers_dir", lambda: tmp_path / "no-headers")
    e = _unavailable(pone_host)
    assert e.exit_code == exitcodes.MISSING_FEATURE and "no-headers missing" in str(e)


def test_a_crashed_worker_is_seen_in_proc_and_raised_as_an_alert(tmp_path):
    from dynvm_trace.alerts import Alerts
    src, kernel, batches, _ = _pone_run(tmp_path, scenario="failures")
    workers = [r["values"] for b in batches for r in b
               if r["kind"] == "counters" and r["group"] == "workers"]
    assert set(workers[0]) == {"spdeamon", "spthrd_1", "spthrd_divide"}
    assert set(workers[-1]) == {"spdeamon", "spthrd_divide"}
    alerts = Alerts()
    for b in batches:
        alerts.feed(b)
    raised = {a["alert"]: a for a in alerts.snapshot()}
    assert raised["worker_gone"]["worker"] == "spthrd_1"
    assert "worker_stalled" in raised
