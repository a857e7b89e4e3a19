"""ksm_sysfs: parsers per file type and the reader, on literal file contents."""

from __future__ import annotations

import pytest

from dynvm_trace import ksm_sysfs as ks
from dynvm_trace.paths import Roots

KSM = "kernel/mm/ksm/"

# As Linux 6.18 prints them (each ends with "\n").
KSM_6_18 = {
    "advisor_max_cpu": "70\n", "advisor_max_pages_to_scan": "30000\n",
    "advisor_min_pages_to_scan": "500\n", "advisor_mode": "[none] scan-time\n",
    "advisor_target_scan_time": "200\n", "full_scans": "3\n", "general_profit": "-8192\n",
    "ksm_zero_pages": "0\n", "max_page_sharing": "256\n", "merge_across_nodes": "1\n",
    "pages_scanned": "12288\n", "pages_shared": "16\n", "pages_sharing": "4080\n",
    "pages_skipped": "0\n", "pages_to_scan": "100\n", "pages_unshared": "2\n",
    "pages_volatile": "0\n", "run": "1\n", "sleep_millisecs": "20\n", "smart_scan": "1\n",
    "stable_node_chains": "0\n", "stable_node_chains_prune_millisecs": "2000\n",
    "stable_node_dups": "0\n", "use_zero_pages": "0\n",
}


def test_file_lists():
    assert len(ks.KSM_FILES) == len(set(ks.KSM_FILES)) == 24
    assert set(ks.KSM_FILES) == set(KSM_6_18)
    assert not set(ks.KSM_TUNABLE_FILES) & set(ks.KSM_COUNTER_FILES)


@pytest.mark.parametrize("name, text, value", [
    ("pages_sharing", "4080\n", 4080),
    ("general_profit", "-8192\n", -8192),
    ("run", "2", 2),
    ("advisor_mode", "[none] scan-time\n", "[none] scan-time"),
    ("advisor_mode", "none [scan-time]", "none [scan-time]"),
])
def test_parse_ksm_file(name, text, value):
    assert ks.parse_ksm_file(name, text) == value


@pytest.mark.parametrize("name, text", [("pages_sharing", ""), ("run", "on\n"),
                                        ("advisor_mode", "\n")])
def test_parse_ksm_file_garbage(name, text):
    with pytest.raises(ValueError):
        ks.parse_ksm_file(name, text)


def test_read_ksm_full(make_tree):
    root = make_tree({KSM + k: v for k, v in KSM_6_18.items()})
    problems = []
    values = ks.read_ksm(Roots(root), problems)
    assert problems == []
    assert len(values) == 24
    assert values["pages_sharing"] == 4080
    assert values["pages_shared"] == 16
    assert values["general_profit"] == -8192
    assert values["advisor_mode"] == "[none] scan-time"
    assert values["stable_node_chains_prune_millisecs"] == 2000


def test_read_ksm_old_kernel_skips_missing(make_tree):
    # a 4.x kernel: no general_profit, smart_scan, advisor_*, ksm_zero_pages, pages_skipped
    old = ("run", "pages_to_scan", "sleep_millisecs", "pages_shared", "pages_sharing",
           "pages_unshared", "pages_volatile", "full_scans", "max_page_sharing",
           "merge_across_nodes", "use_zero_pages", "stable_node_chains", "stable_node_dups")
    root = make_tree({KSM + k: KSM_6_18[k] for k in old})
    problems = []
    values = ks.read_ksm(Roots(root), problems)
    assert set(values) == set(old)
    assert problems == []


def test_read_ksm_garbled_file_is_a_problem(make_tree):
    root = make_tree({KSM + "run": "1\n", KSM + "pages_sharing": "lots\n"})
    problems = []
    assert ks.read_ksm(Roots(root), problems) == {"run": 1}
    assert problems == [f"{root}/kernel/mm/ksm/pages_sharing: not an integer: 'lots'"]
    assert ks.read_ksm(Roots(root)) == {"run": 1}


def test_read_ksm_without_ksm(tmp_path):
    assert ks.read_ksm(Roots(tmp_path)) == {}
