"""knobs: listing, validation, writing and read-back on writable tmp trees."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from conftest import FIXTURES
from dynvm_trace import exitcodes, knobs
from dynvm_trace.knobs import Knob, KnobError, list_knobs, set_knob
from dynvm_trace.paths import Roots

PONE = "kernel/mm/pone/"
KSM = "kernel/mm/ksm/"

GUIDE_TREE = {
    PONE + "pone_abstract": "page merge count: 0\r\npage reclaim count: 0\r\n",
    PONE + "pone_nice": "0\n", PONE + "pone_daemon_scan_period": "20000\n",
    PONE + "pone_daemon_run": "1\n", PONE + "pone_reclaim_run": "1\n", PONE + "pone_run": "1\n",
    PONE + "pone_divide_thread_enable": "1\n", PONE + "pone_info": "slice merge cnt: 0\r\n",
    PONE + "pone_sd_tree": "check dmesg buffer11111", PONE + "pone_debug": "-1\n",
    PONE + "pone_stat_begin": "begin stat\r\n", PONE + "pone_stat_end": "slice merge cnt: 0\r\n",
}
KSM_TREE = {
    KSM + "run": "0\n", KSM + "pages_to_scan": "100\n", KSM + "sleep_millisecs": "20\n",
    KSM + "max_page_sharing": "256\n", KSM + "merge_across_nodes": "1\n",
    KSM + "use_zero_pages": "0\n", KSM + "smart_scan": "1\n", KSM + "pages_sharing": "0\n",
    KSM + "general_profit": "0\n",
}


@pytest.fixture
def virt(tmp_path):
    """A writable copy of the tree recorded from the real virt_release kernel."""
    shutil.copytree(FIXTURES / "pone-virt_release" / "sysfs-idle", tmp_path / "sys")
    return Roots(tmp_path / "sys", tmp_path / "proc")


def content(roots: Roots, rel: str) -> bytes:
    return (roots.sysfs / rel).read_bytes()


# --- list_knobs --------------------------------------------------------------------------------

def test_list_knobs_virt_release(virt):
    assert list_knobs(virt) == [
        Knob("pone", "pone_run", 1, 1, "0|1"),
        Knob("pone", "pone_recycle_run", 1, 1, "0|1"),
        Knob("pone", "pone_deamon_scan_period", 20000, 20000, ">= 5000"),
        Knob("pone", "pone_divide_thread_enable", 1, 1, "0|1"),
    ]


def test_list_knobs_guide_and_ksm(make_tree):
    roots = Roots(make_tree({**GUIDE_TREE, **KSM_TREE,
                             PONE + "pone_daemon_reclaim_period": "3000\n"}))
    ks = list_knobs(roots)
    assert [(k.interface, k.name, k.value, k.default_text, k.range) for k in ks] == [
        ("pone", "pone_nice", 0, "0", "-20..19"),
        ("pone", "pone_daemon_scan_period", 20000, "20000", ">= 5001"),
        ("pone", "pone_daemon_run", 1, "1", "0|1"),
        ("pone", "pone_reclaim_run", 1, "1", "0|1"),
        ("pone", "pone_run", 1, "1", "0|1"),
        ("pone", "pone_divide_thread_enable", 1, "1", "0|1"),
        ("pone", "pone_daemon_reclaim_period", 3000, "?", ">= 1"),
        ("ksm", "run", 0, "0", "0|1|2"),
        ("ksm", "pages_to_scan", 100, "100", ">= 0"),
        ("ksm", "sleep_millisecs", 20, "20", ">= 0"),
        ("ksm", "max_page_sharing", 256, "256", ">= 2"),
        ("ksm", "merge_across_nodes", 1, "1", "0|1"),
        ("ksm", "use_zero_pages", 0, "0", "0|1"),
        ("ksm", "smart_scan", 1, "1", "0|1"),
    ]
    assert all(k.reason is None for k in ks)


def test_list_knobs_only_existing_ksm_files_and_no_reclaim_period(make_tree):
    roots = Roots(make_tree({**GUIDE_TREE, KSM + "run": "1\n", KSM + "pages_to_scan": "100\n"}))
    names = [k.name for k in list_knobs(roots)]
    assert "pone_daemon_reclaim_period" not in names
    assert names[-2:] == ["run", "pages_to_scan"]
    assert len(names) == 8


def test_list_knobs_unreadable_values_have_reasons(make_tree):
    tree = {k: v for k, v in GUIDE_TREE.items() if not k.endswith("pone_nice")}
    tree[PONE + "pone_run"] = "yes\n"
    ks = {k.name: k for k in list_knobs(Roots(make_tree(tree)))}
    assert ks["pone_nice"].value is None and ks["pone_nice"].reason == "missing"
    assert ks["pone_run"].value is None
    assert ks["pone_run"].reason == "not an integer: 'yes'"
    assert ks["pone_daemon_run"].value == 1 and ks["pone_daemon_run"].reason is None


def test_list_knobs_early_and_none(make_tree, tmp_path):
    assert list_knobs(Roots(tmp_path / "empty")) == []
    early = make_tree({PONE + "pone_info": "slice alloc cnt: 0\r\n", PONE + "pone_debug": "-1",
                       PONE + "pone_sd_tree": "check dmesg buffer11111"})
    assert list_knobs(Roots(early)) == []


# --- set_knob: success and read-back -----------------------------------------------------------

def test_set_valid_and_read_back(virt):
    r = set_knob(virt, "pone_deamon_scan_period", "5000")
    assert content(virt, PONE + "pone_deamon_scan_period") == b"5000"
    assert (r.interface, r.name, r.requested, r.before, r.after) == (
        "pone", "pone_deamon_scan_period", 5000, 20000, 5000)
    assert r.path == virt.pone_dir / "pone_deamon_scan_period"
    assert r.taken
    assert r.message == "pone_deamon_scan_period: 20000 -> 5000"
    assert r.exit_code == exitcodes.OK


def test_set_tolerates_whitespace(virt):
    assert set_knob(virt, "pone_run", " 0\n").after == 0
    assert content(virt, PONE + "pone_run") == b"0"


def test_set_ksm(make_tree):
    roots = Roots(make_tree(KSM_TREE))
    r = set_knob(roots, "run", "2")
    assert r.taken and (r.interface, r.before, r.after) == ("ksm", 0, 2)
    assert content(roots, KSM + "run") == b"2"
    assert set_knob(roots, "max_page_sharing", "2").after == 2


def test_guide_scan_period_minimum(make_tree):
    roots = Roots(make_tree(GUIDE_TREE))
    with pytest.raises(KnobError) as e:
        set_knob(roots, "pone_daemon_scan_period", "5000")
    assert str(e.value) == "pone_daemon_scan_period: 5000 is out of range (>= 5001)"
    assert e.value.exit_code == exitcodes.USAGE
    assert content(roots, PONE + "pone_daemon_scan_period") == b"20000\n"
    r = set_knob(roots, "pone_daemon_scan_period", "5001")
    assert r.taken and r.after == 5001
    assert content(roots, PONE + "pone_daemon_scan_period") == b"5001"


@pytest.mark.parametrize("value, ok", [("-21", False), ("-20", True), ("19", True),
                                       ("20", False)])
def test_guide_nice_range(make_tree, value, ok):
    roots = Roots(make_tree(GUIDE_TREE))
    if ok:
        assert set_knob(roots, "pone_nice", value).after == int(value)
    else:
        with pytest.raises(KnobError, match=r"out of range \(-20\.\.19\)"):
            set_knob(roots, "pone_nice", value)
        assert content(roots, PONE + "pone_nice") == b"0\n"


# --- set_knob: refusals ------------------------------------------------------------------------

@pytest.mark.parametrize("name, value, message", [
    ("pone_deamon_scan_period", "4999", "pone_deamon_scan_period: 4999 is out of range (>= 5000)"),
    ("pone_run", "2", "pone_run: 2 is out of range (0|1)"),
    ("pone_run", "-1", "pone_run: -1 is out of range (0|1)"),
    ("pone_run", "on", "pone_run: not an integer: 'on'"),
    ("pone_run", "1.0", "pone_run: not an integer: '1.0'"),
    ("pone_recycle_run", "", "pone_recycle_run: empty value"),
])
def test_invalid_values_refused_nothing_written(virt, name, value, message):
    before = content(virt, PONE + name)
    with pytest.raises(KnobError) as e:
        set_knob(virt, name, value)
    assert str(e.value) == message
    assert e.value.exit_code == exitcodes.USAGE
    assert content(virt, PONE + name) == before


@pytest.mark.parametrize("name", ["pone_info", "pone_debug", "pone_sd_tree", "pone_stat_begin",
                                  "pone_stat_end", "pone_abstract", "pages_sharing",
                                  "general_profit"])
def test_read_only_and_debug_files_refused(make_tree, name):
    tree = {**GUIDE_TREE, **KSM_TREE}
    roots = Roots(make_tree(tree))
    with pytest.raises(KnobError) as e:
        set_knob(roots, name, "1")
    assert str(e.value).startswith(f"{name} is a read-only counter or debug file, not a knob")
    assert e.value.exit_code == exitcodes.USAGE
    assert ("changes kernel state" in str(e.value)) == (
        name in {"pone_debug", "pone_sd_tree", "pone_stat_begin"})
    assert {rel: content(roots, rel) for rel in tree} == {k: v.encode() for k, v in tree.items()}


def test_unknown_name_lists_valid_names(virt):
    with pytest.raises(KnobError) as e:
        set_knob(virt, "pone_nice", "0")  # a guide knob, not on virt_release
    assert str(e.value) == ("unknown knob 'pone_nice'; knobs on this host: pone_run, "
                            "pone_recycle_run, pone_deamon_scan_period, "
                            "pone_divide_thread_enable")
    assert e.value.exit_code == exitcodes.USAGE


def test_unknown_name_on_a_host_without_knobs(tmp_path):
    with pytest.raises(KnobError, match="unknown knob 'run'; knobs on this host: none$"):
        set_knob(Roots(tmp_path), "run", "1")


# --- set_knob: what the kernel does ------------------------------------------------------------

def test_kernel_clamps_not_taken(virt, monkeypatch):
    # pone accepts every write; emulate a kernel that keeps 5000 whatever is written
    monkeypatch.setattr(knobs, "_write_text", lambda path, text: path.write_text("5000"))
    r = set_knob(virt, "pone_deamon_scan_period", "6000")
    assert not r.taken
    assert (r.requested, r.before, r.after) == (6000, 20000, 5000)
    assert r.message == "pone_deamon_scan_period: not taken: the kernel kept 5000"
    assert r.exit_code == exitcodes.FAILURE


def test_kernel_ignores_write_not_taken(virt, monkeypatch):
    monkeypatch.setattr(knobs, "_write_text", lambda path, text: None)
    r = set_knob(virt, "pone_recycle_run", "0")
    assert r.message == "pone_recycle_run: not taken: the kernel kept 1"
    assert r.exit_code == exitcodes.FAILURE


def test_read_back_fails(virt, monkeypatch):
    monkeypatch.setattr(knobs, "_write_text", lambda path, text: path.write_text("garbage"))
    r = set_knob(virt, "pone_run", "0")
    assert r.after is None and not r.taken
    assert r.message == ("pone_run: wrote 0 but could not read it back: "
                         "not an integer: 'garbage'")


def test_permission_denied(virt, monkeypatch):
    def deny(path, mode="r", *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(knobs, "open", deny, raising=False)
    with pytest.raises(KnobError) as e:
        set_knob(virt, "pone_run", "0")
    path = virt.pone_dir / "pone_run"
    assert str(e.value) == f"writing {path}: permission denied: run as root"
    assert e.value.exit_code == exitcodes.NOT_PERMITTED
    assert content(virt, PONE + "pone_run") == b"1"


@pytest.mark.parametrize("err, text", [
    (errno.EINVAL, "the kernel refused 300: Invalid argument"),
    (errno.EBUSY, "the kernel refused 300: Device or resource busy: the kernel allows this "
                  "change only while nothing is merged (set run=2 first)"),
])
def test_ksm_kernel_refusal_is_one_line(make_tree, monkeypatch, err, text):
    roots = Roots(make_tree(KSM_TREE))

    def refuse(path, text):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(knobs, "_write_text", refuse)
    with pytest.raises(KnobError) as e:
        set_knob(roots, "max_page_sharing", "300")
    assert str(e.value) == f"writing {roots.ksm_dir / 'max_page_sharing'}: {text}"
    assert "\n" not in str(e.value)
    assert e.value.exit_code == exitcodes.FAILURE


def test_pone_knob_tables_match_the_dialects():
    from dynvm_trace.pone_sysfs import KNOB_DEFAULTS
    for dialect, specs in knobs.PONE_KNOBS.items():
        assert [s.name for s in specs] == list(KNOB_DEFAULTS[dialect])
    assert {s.name for s in knobs.KSM_KNOBS}.isdisjoint(knobs.READ_ONLY)
