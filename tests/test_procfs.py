"""procfs: vmstat, ksm_stat, comm and the pid list, on literal file contents."""

from __future__ import annotations

import pytest

from dynvm_trace import procfs
from dynvm_trace.paths import Roots

VMSTAT = ("nr_free_pages 903526\n"
          "nr_zone_inactive_anon 1236\n"
          "pgfree 4096123\n"
          "cow_ksm 2048\n"
          "ksm_swpin_copy 0\n")

KSM_STAT_NEW = ("ksm_rmap_items 4096\n"
                "ksm_zero_pages 0\n"
                "ksm_merging_pages 4080\n"
                "ksm_process_profit -12\n"
                "ksm_merge_any: no\n"
                "ksm_mergeable: yes\n")


def test_parse_vmstat():
    v = procfs.parse_vmstat(VMSTAT)
    assert v == {"nr_free_pages": 903526, "nr_zone_inactive_anon": 1236, "pgfree": 4096123,
                 "cow_ksm": 2048, "ksm_swpin_copy": 0}


def test_parse_vmstat_truncated_and_garbled():
    problems = []
    v = procfs.parse_vmstat("cow_ksm 5\nbogus\npgfree 1\nnr_fr", problems)
    assert v == {"cow_ksm": 5, "pgfree": 1}
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 4"]


def test_parse_ksm_stat_new_kernel():
    s = procfs.parse_ksm_stat(KSM_STAT_NEW)
    assert s == {"ksm_rmap_items": 4096, "ksm_zero_pages": 0, "ksm_merging_pages": 4080,
                 "ksm_process_profit": -12, "ksm_merge_any": False, "ksm_mergeable": True}
    assert s["ksm_merge_any"] is False and s["ksm_mergeable"] is True


def test_parse_ksm_stat_old_kernel_crlf_and_garbage():
    s = procfs.parse_ksm_stat("ksm_rmap_items 3\r\n\r\nksm_merging_pages: 2\r\nweird maybe\r\n"
                              "ksm_zero")
    assert s == {"ksm_rmap_items": 3, "ksm_merging_pages": 2}


@pytest.fixture
def proc(make_tree):
    return make_tree({
        "proc/vmstat": VMSTAT,
        "proc/1/comm": "systemd\n",
        "proc/1/ksm_stat": "ksm_rmap_items 0\nksm_merging_pages 0\n",
        "proc/1046/comm": "qemu-system-x86\n",
        "proc/1046/ksm_stat": KSM_STAT_NEW,
        "proc/77/comm": "kworker/0:1 x\n",
        "proc/self/comm": "pytest\n",
        "proc/sys/kernel/ostype": "Linux\n",
    }) / "proc"


def test_readers(proc, tmp_path):
    roots = Roots(tmp_path / "sys", proc)
    assert procfs.read_vmstat(roots)["cow_ksm"] == 2048
    assert procfs.read_ksm_stat(roots, 1046)["ksm_merging_pages"] == 4080
    assert procfs.read_ksm_stat(roots, 1) == {"ksm_rmap_items": 0, "ksm_merging_pages": 0}
    assert procfs.read_comm(roots, 1046) == "qemu-system-x86"
    assert procfs.read_comm(roots, 77) == "kworker/0:1 x"
    assert procfs.list_pids(roots) == [1, 77, 1046]


def test_gone_process_and_old_kernel(proc, tmp_path):
    roots = Roots(tmp_path / "sys", proc)
    assert procfs.read_ksm_stat(roots, 4242) is None
    assert procfs.read_comm(roots, 4242) is None
    assert procfs.read_ksm_stat(roots, 77) is None  # kernel without ksm_stat


def test_read_vmstat_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        procfs.read_vmstat(Roots(tmp_path, tmp_path))
