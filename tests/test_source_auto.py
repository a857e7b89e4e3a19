"""`--source auto` picks ksm only when the host has VMs or mergeable memory to watch, and the
emulated host otherwise, saying why on screen; `doctor` says which applies. Fixture proc/sys
trees, in-process CLI; the kernel side (BPF, bcc) is stood in for by a passing ksm check."""

from __future__ import annotations

import json

import pytest

from cli_helpers import proc_entry, run
from dynvm_trace import capabilities
from dynvm_trace.capabilities import Check, auto_source, has_ksm_memory, ksm_workload
from dynvm_trace.paths import Roots

KSM = "sys/kernel/mm/ksm/"
IDLE_KSM = {KSM + "run": "1\n", KSM + "pages_shared": "0\n", KSM + "pages_sharing": "0\n"}
NOTHING = ("ksm_rmap_items 0\nksm_zero_pages 0\nksm_merging_pages 0\nksm_process_profit 0\n"
           "ksm_merge_any: no\nksm_mergeable: no\n")


@pytest.fixture
def host(make_tree, tmp_path):
    """A fixture host: make({path: content}) -> Roots; an idle KSM and two plain processes."""
    def make(extra: dict | None = None) -> Roots:
        make_tree({**IDLE_KSM, **proc_entry(1, "systemd", NOTHING), **proc_entry(77, "bash"),
                   **(extra or {})})
        return Roots(tmp_path / "sys", tmp_path / "proc")
    return make


@pytest.fixture
def ksm_traceable(monkeypatch):
    """As if BPF, bcc and the ksm tracepoints were all there (fixture roots never are live)."""
    monkeypatch.setattr(capabilities, "ksm_source",
                        lambda roots: Check("ksm", True, "stand-in: live tracing works"))


@pytest.mark.parametrize("stat, expected", [
    (None, False), ({}, False),
    ({"ksm_rmap_items": 0, "ksm_merging_pages": 0, "ksm_mergeable": False}, False),
    ({"ksm_rmap_items": 3, "ksm_merging_pages": 0}, True),
    ({"ksm_rmap_items": 0, "ksm_merging_pages": 2}, True),
    ({"ksm_mergeable": True}, True),
    ({"ksm_merge_any": True}, False),  # asked for, nothing scanned or marked yet
])
def test_has_ksm_memory(stat, expected):
    assert has_ksm_memory(stat) is expected


def test_idle_host_has_nothing_to_watch(host):
    check = ksm_workload(host())
    assert not check.ok
    assert "no qemu process" in check.detail and "pages_shared + pages_sharing = 0" in check.detail
    assert "--source ksm" in check.fix


@pytest.mark.parametrize("extra, found", [
    (proc_entry(4242, "qemu-system-x86", None, b"qemu-system-x86_64\0-name\0guest1\0"), "qemu"),
    (proc_entry(4243, "python3", NOTHING.replace("ksm_merging_pages 0", "ksm_merging_pages 9")),
     "KSM memory: pid 4243"),
    (proc_entry(4244, "python3", NOTHING.replace("ksm_rmap_items 0", "ksm_rmap_items 12")),
     "KSM memory: pid 4244"),
    (proc_entry(4245, "java", NOTHING.replace("ksm_mergeable: no", "ksm_mergeable: yes")),
     "KSM memory: pid 4245"),
    ({KSM + "pages_sharing": "510\n", KSM + "pages_shared": "2\n"}, "= 512"),
])
def test_something_to_watch(host, extra, found):
    check = ksm_workload(host(extra))
    assert check.ok and found in check.detail, check


@pytest.mark.parametrize("extra", [
    proc_entry(5000, "python3", "ksm_merging_pages lots\nksm_rmap_items\n"),  # garbled
    proc_entry(5001, "python3", ""),                                          # empty
    {KSM + "pages_sharing": "many\n", KSM + "pages_shared": ""},              # garbled sysfs
])
def test_garbled_files_are_not_something_to_watch(host, extra):
    assert not ksm_workload(host(extra)).ok


def test_no_ksm_dir_and_no_proc_entries(tmp_path):
    (tmp_path / "proc").mkdir()
    assert not ksm_workload(Roots(tmp_path / "sys", tmp_path / "proc")).ok


def test_auto_passes_over_ksm_with_nothing_to_watch(host, ksm_traceable):
    pick, passed_over = auto_source(host())
    assert pick == "emulate"
    assert any(p.startswith("ksm: live tracing works, but there is nothing to watch")
               for p in passed_over), passed_over


def test_auto_picks_ksm_with_a_vm(host, ksm_traceable):
    roots = host(proc_entry(4242, "qemu-system-x86", None, b"qemu-system-x86_64\0"))
    pick, passed_over = auto_source(roots)
    assert pick == "ksm"
    assert not any(p.startswith("ksm") for p in passed_over)


def test_auto_without_ksm_tracing_is_emulate_with_its_reason(host):
    pick, passed_over = auto_source(host())  # fixture roots: not the running kernel
    assert pick == "emulate"
    assert any(p.startswith("ksm: ") and "not the running kernel" in p for p in passed_over)


def test_doctor_says_nothing_to_watch(host, ksm_traceable):
    roots = host()
    res = run(["doctor"], roots=roots)
    assert res.code == 0, res.err
    assert "to watch: nothing (no qemu process" in res.out
    last = res.out.strip().splitlines()[-1]
    assert last.startswith("--source auto picks: emulate (passed over: ")
    assert "there is nothing to watch" in last

    data = json.loads(run(["doctor", "--json"], roots=roots).out)
    assert data["auto"] == "emulate"
    assert data["ksm_workload"]["ok"] is False


def test_doctor_says_what_there_is_to_watch(host, ksm_traceable):
    roots = host(proc_entry(4243, "python3", NOTHING.replace("ksm_merging_pages 0",
                                                             "ksm_merging_pages 9")))
    res = run(["doctor"], roots=roots)
    assert "to watch: 1 process(es) with KSM memory: pid 4243" in res.out
    assert res.out.strip().splitlines()[-1].startswith("--source auto picks: ksm")
    data = json.loads(run(["doctor", "--json"], roots=roots).out)
    assert data["auto"] == "ksm" and data["ksm_workload"]["ok"] is True


def test_trace_auto_says_it_runs_the_emulated_host_and_why(host, ksm_traceable):
    res = run(["trace", "--source", "auto", "--speed", "max", "--duration", "2",
                  "--kind", "scan_start"], roots=host())
    assert res.code == 0, res.err
    first = res.err.splitlines()[0]
    assert first.startswith("dynvm-trace: source: emulate, the emulated host (")
    assert "there is nothing to watch" in first and "--source ksm" in first
