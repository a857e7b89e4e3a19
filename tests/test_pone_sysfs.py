"""pone_sysfs: dialects, parsers, the passive poll and the renderers, on literal file contents
and on the trees recorded from the real patched kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FIXTURES, write_tree
from dynvm_trace import pone_sysfs as ps
from dynvm_trace.paths import Roots

REC = FIXTURES / "pone-virt_release"
IDLE = REC / "sysfs-idle"
MERGED = REC / "sysfs-merged"
PONE = "kernel/mm/pone/"

GUIDE_TREE = {
    PONE + "pone_abstract": "page merge count: 3\r\npage reclaim count: 9\r\n",
    PONE + "pone_nice": "-5\n",
    PONE + "pone_daemon_scan_period": "20000\n",
    PONE + "pone_daemon_run": "1\n",
    PONE + "pone_reclaim_run": "0\n",
    PONE + "pone_run": "1\n",
    PONE + "pone_divide_thread_enable": "1\n",
    PONE + "pone_info": "slice alloc cnt: 12\r\nslice merge cnt: 3\r\npage recycle count 9\r\n",
    PONE + "pone_sd_tree": "check dmesg buffer11111",
    PONE + "pone_debug": "-1\n",
    PONE + "pone_stat_begin": "begin stat\r\n",
    PONE + "pone_stat_end": "slice alloc cnt: 1\r\n",
}
EARLY_TREE = {
    PONE + "pone_info": "slice alloc cnt: 7\r\nslice in que ok cnt: 6\r\n"
                        "virt page count   err : 0\r\ntree index 0 page index 4242\r\n",
    PONE + "pone_debug": "-1",
    PONE + "pone_sd_tree": "check dmesg buffer11111",
}


def fixture_text(root: Path, name: str) -> str:
    return (root / PONE / name).read_bytes().decode()


def run1_sections() -> list[tuple[str, str]]:
    """(uptime, pone_info text) of every `--- pone_info @ uptime T` section of run1: the
    lines up to the MemFree line that follows each."""
    sections = []
    for chunk in (REC / "run1-merge-cow.txt").read_text().split("--- pone_info @ uptime ")[1:]:
        head, *lines = chunk.splitlines()
        body = lines[:[i for i, l in enumerate(lines) if l.startswith("MemFree:")][0]]
        sections.append((head, "\n".join(body) + "\n"))
    return sections


# --- labels and dialects -----------------------------------------------------------------------

@pytest.mark.parametrize("raw, key", [
    ("slice deamon find volatile  cnt", "slice deamon find volatile cnt"),
    ("virt page merge count ", "virt page merge count"),
    ("  slice copy pte  count  ", "slice copy pte count"),
    ("a\tb\r", "a b"),
    ("", ""),
])
def test_normalize_label(raw, key):
    assert ps.normalize_label(raw) == key


def test_pone_info_labels_are_the_kernels():
    assert len(ps.PONE_INFO_LABELS) == 34
    assert ps.PONE_INFO_LABELS[3] == "virt page merge count : "
    assert ps.PONE_INFO_LABELS[30] == "slice copy pte  count  : "
    assert ps.PONE_INFO_LABELS[-1] == "page recycle count "
    assert len(set(ps.PONE_INFO_KEYS)) == 34
    assert ps.PONE_INFO_KEYS[26] == "slice deamon find volatile cnt"
    assert ps.PONE_INFO_KEYS[27] == "slice deamon fine watch cnt"
    assert len(ps.STAT_END_LABELS) == 31
    assert "deamon task state: " not in ps.STAT_END_LABELS


def test_dialect_file_lists():
    assert len(ps.VIRT_RELEASE_FILES) == 9
    assert len(ps.GUIDE_FILES) == 12
    assert ps.EARLY_FILES == ("pone_info", "pone_debug", "pone_sd_tree")
    assert ps.SIDE_EFFECT_FILES == {"pone_stat_begin", "pone_debug", "pone_sd_tree"}
    for dialect, knobs in ps.KNOB_DEFAULTS.items():
        assert set(knobs) - ps.OPTIONAL_FILES <= set(ps.DIALECT_FILES[dialect])


def test_detect_dialect(make_tree, tmp_path):
    assert ps.detect_dialect(Roots(IDLE)) == "virt_release"
    assert ps.detect_dialect(Roots(tmp_path)) is None
    assert ps.detect_dialect(Roots(make_tree(EARLY_TREE))) == "early"
    assert ps.detect_dialect(Roots(make_tree(GUIDE_TREE))) == "guide"


def test_detect_dialect_empty_pone_dir(tmp_path):
    (tmp_path / PONE).mkdir(parents=True)
    assert ps.detect_dialect(Roots(tmp_path)) is None


# --- parse_counters --------------------------------------------------------------------------

def test_parse_merged_fixture_pone_info():
    problems = []
    c = ps.parse_counters(fixture_text(MERGED, "pone_info"), problems)
    assert problems == []
    assert tuple(c) == ps.PONE_INFO_KEYS
    assert c["slice merge cnt"] == 4091
    assert c["slice protect err cnt"] == 14
    assert c["page recycle count"] == 0
    assert c["slice alloc cnt"] == 4101
    assert c["slice out que cnt"] == 4108
    assert c["data map key cnt"] == 12279
    assert c["slice deamon find volatile cnt"] == 4108
    assert c["slice deamon fine watch cnt"] == 4094
    assert c["insert sd tree ok cnt"] == 4094
    assert c["slice new insert cnt"] == 3
    assert c["deamon task state"] == 2


def test_parse_idle_fixture_pone_info():
    c = ps.parse_counters(fixture_text(IDLE, "pone_info"))
    assert len(c) == 34
    assert c["deamon task state"] == 2
    assert sum(c.values()) == 2


def test_parse_fixture_stat_end():
    c = ps.parse_counters(fixture_text(MERGED, "pone_stat_end"))
    assert tuple(c) == ps.PONE_INFO_KEYS[:29] + ps.PONE_INFO_KEYS[30:32]
    assert len(c) == 31
    assert c["slice out que cnt"] == 0  # the kernel's bug: always 0
    assert c["slice merge cnt"] == 4091
    assert "deamon task state" not in c and "page recycle count" not in c


def test_parse_every_run1_section():
    sections = run1_sections()
    assert len(sections) == 19
    for uptime, text in sections:
        problems = []
        c = ps.parse_counters(text, problems)
        assert len(c) == 34, uptime
        assert problems == [], uptime
    by_time = {t: ps.parse_counters(text) for t, text in sections}
    assert by_time["13.47"]["slice alloc cnt"] == 73731
    assert by_time["13.47"]["slice merge cnt"] == 0
    assert by_time["33.84"]["slice merge cnt"] == 65535
    assert by_time["33.84"]["insert sd tree ok cnt"] == 73731
    assert by_time["33.84"]["slice new insert cnt"] == 8196
    # the COW break of 2000 pages, then 1999 merges of the broken pages with each other
    assert by_time["150.79"]["delete merge page cnt"] == 2000
    assert by_time["150.79"]["delete sd tree ok cnt"] == 2001
    assert by_time["150.79"]["slice merge cnt"] == 65535 + 1999
    # process exit deleted every tree entry
    assert by_time["210.08"]["delete sd tree ok cnt"] == by_time["210.08"]["insert sd tree ok cnt"]


def test_parse_run1_stat_end_section():
    text = (REC / "run1-merge-cow.txt").read_text()
    body = text.split("--- cat pone_stat_end\n")[1].split("--- pone_info")[0]
    c = ps.parse_counters(body)
    assert len(c) == 31
    assert c["slice alloc cnt"] == 75733
    assert c["slice deamon find volatile cnt"] == 75732


def test_crlf_and_lf_parse_alike():
    lf = "slice merge cnt: 5\nvirt page merge count : 7\npage recycle count 3\n"
    assert ps.parse_counters(lf) == ps.parse_counters(lf.replace("\n", "\r\n")) == {
        "slice merge cnt": 5, "virt page merge count": 7, "page recycle count": 3}


def test_no_trailing_newline():
    assert ps.parse_counters("slice merge cnt: 5\r\npage recycle count 3") == {
        "slice merge cnt": 5, "page recycle count": 3}


def test_negative_and_int64_bounds():
    problems = []
    c = ps.parse_counters("virt page merge count : -3\r\n"
                          "a: 9223372036854775807\r\n"
                          "b: -9223372036854775808\r\n"
                          "too big: 9223372036854775808\r\n"
                          "too small: -9223372036854775809\r\n", problems)
    assert c == {"virt page merge count": -3, "a": 2**63 - 1, "b": -2**63}
    assert len(problems) == 2
    assert problems[0].startswith("line 4: out of signed 64-bit range")
    assert problems[1].startswith("line 5: out of signed 64-bit range")


def test_truncated_mid_label():
    text = fixture_text(MERGED, "pone_info")
    cut = text[:text.index("slice merge cnt") + len("slice mer")]
    problems = []
    c = ps.parse_counters(cut, problems)
    assert len(c) == 10
    assert c["slice new insert cnt"] == 3
    assert "slice merge cnt" not in c
    assert problems == ["line 11: not an integer: 'mer': 'slice mer'"]


@pytest.mark.parametrize("cut", ["slice copy pte1", "page recycle count", "slice alloc cnt:",
                                 "s", ":", ": 5"])
def test_truncated_line_alone_is_reported(cut):
    problems = []
    assert ps.parse_counters(cut, problems) == {}
    assert len(problems) == 1 and problems[0].startswith("line 1: ")


def test_garbled_and_blank_lines_skipped_and_reported():
    problems = []
    c = ps.parse_counters("slice alloc cnt: 4\r\n\r\n@@@ garbage\r\nslice merge cnt: x1\r\n"
                          "new label from a newer kernel: 8\r\n", problems)
    assert c == {"slice alloc cnt": 4, "new label from a newer kernel": 8}
    assert problems == ["line 2: blank line: ''",
                        "line 3: not an integer: 'garbage': '@@@ garbage'",
                        "line 4: not an integer: 'x1': 'slice merge cnt: x1'"]


def test_problems_list_is_optional():
    assert ps.parse_counters("garbage\r\nx: 1") == {"x": 1}


def test_repeated_label_last_wins():
    problems = []
    assert ps.parse_counters("x: 1\nx  : 2\n", problems) == {"x": 2}
    assert problems == ["line 2: repeated label, the last value wins: 'x  : 2'"]


def test_guide_abstract_parses():
    assert ps.parse_counters(GUIDE_TREE[PONE + "pone_abstract"]) == {
        "page merge count": 3, "page reclaim count": 9}
    assert ps.parse_counters("page merge count 3\npage reclaim count 9") == {
        "page merge count": 3, "page reclaim count": 9}


# --- parse_value -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, n", [("20000", 20000), ("5000\n", 5000), ("1\r\n", 1),
                                     ("  7 ", 7), ("-1", -1), ("0", 0),
                                     ("9223372036854775807", 2**63 - 1)])
def test_parse_value(text, n):
    assert ps.parse_value(text) == n


@pytest.mark.parametrize("text, msg", [("", "empty value"), ("\r\n", "empty value"),
                                       ("abc", "not an integer: 'abc'"),
                                       ("12abc", "not an integer: '12abc'"),
                                       ("1 2", "not an integer: '1 2'"),
                                       ("0x10", "not an integer"),
                                       ("+5", "not an integer"),
                                       ("９", "not an integer"),
                                       ("9223372036854775808", "out of signed 64-bit range")])
def test_parse_value_garbage(text, msg):
    with pytest.raises(ValueError, match=msg.replace("+", r"\+")):
        ps.parse_value(text)


# --- read_pone / read_stat_end -----------------------------------------------------------------

def test_read_pone_idle_fixture():
    snap = ps.read_pone(Roots(IDLE))
    assert snap.dialect == "virt_release"
    assert snap.knobs == {"pone_run": 1, "pone_recycle_run": 1,
                          "pone_deamon_scan_period": 20000, "pone_divide_thread_enable": 1}
    assert snap.info["deamon task state"] == 2
    assert len(snap.info) == 34
    assert snap.abstract == {}
    assert snap.reasons == []


def test_read_pone_merged_fixture():
    snap = ps.read_pone(Roots(MERGED))
    assert snap.knobs["pone_deamon_scan_period"] == 5000
    assert snap.info["slice merge cnt"] == 4091
    assert snap.reasons == []


def test_read_pone_never_reads_side_effect_files(make_tree, monkeypatch):
    root = make_tree(GUIDE_TREE)
    opened = []
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text",
                        lambda self, *a, **k: (opened.append(self.name), real(self, *a, **k))[1])
    ps.read_pone(Roots(root))
    assert opened
    assert not set(opened) & (ps.SIDE_EFFECT_FILES | {"pone_stat_end"})


def test_read_pone_guide(make_tree):
    snap = ps.read_pone(Roots(make_tree(GUIDE_TREE)))
    assert snap.dialect == "guide"
    assert snap.knobs == {"pone_nice": -5, "pone_daemon_scan_period": 20000,
                          "pone_daemon_run": 1, "pone_reclaim_run": 0, "pone_run": 1,
                          "pone_divide_thread_enable": 1}
    assert snap.abstract == {"page merge count": 3, "page reclaim count": 9}
    assert snap.info == {"slice alloc cnt": 12, "slice merge cnt": 3, "page recycle count": 9}
    assert snap.reasons == []  # pone_daemon_reclaim_period is optional


def test_read_pone_guide_with_reclaim_period(make_tree):
    root = make_tree({**GUIDE_TREE, PONE + "pone_daemon_reclaim_period": "3000\n"})
    assert ps.read_pone(Roots(root)).knobs["pone_daemon_reclaim_period"] == 3000


def test_read_pone_early(make_tree):
    snap = ps.read_pone(Roots(make_tree(EARLY_TREE)))
    assert snap.dialect == "early"
    assert snap.knobs == {}
    assert snap.info == {"slice alloc cnt": 7, "slice in que ok cnt": 6,
                         "virt page count err": 0, "tree index 0 page index": 4242}
    assert snap.reasons == []


def test_read_pone_missing_tree(tmp_path):
    snap = ps.read_pone(Roots(tmp_path))
    assert snap.dialect is None
    assert snap.knobs == {} and snap.info == {}
    assert snap.reasons == [f"{tmp_path}/kernel/mm/pone: missing (not a pone kernel)"]


def test_read_pone_missing_and_garbled_files_are_reasons(make_tree):
    tree = {k: v for k, v in GUIDE_TREE.items() if not k.endswith(("pone_info", "pone_nice"))}
    tree[PONE + "pone_run"] = "on"
    tree[PONE + "pone_abstract"] = "page merge count: 3\r\npage rec"
    snap = ps.read_pone(Roots(make_tree(tree)))
    assert snap.dialect == "guide"
    assert snap.reasons == ["pone_nice: missing",
                            "pone_run: not an integer: 'on'",
                            "pone_info: missing",
                            "pone_abstract: line 2: not an integer: 'rec': 'page rec'"]
    assert snap.abstract == {"page merge count": 3}
    assert "pone_run" not in snap.knobs and snap.knobs["pone_daemon_run"] == 1


def test_read_pone_unreadable_file_is_a_reason(make_tree):
    root = make_tree(GUIDE_TREE)
    (root / PONE / "pone_info").unlink()
    (root / PONE / "pone_info").mkdir()
    snap = ps.read_pone(Roots(root))
    assert snap.reasons == ["pone_info: Is a directory"]


def test_read_stat_end():
    c = ps.read_stat_end(Roots(MERGED))
    assert len(c) == 31 and c["slice merge cnt"] == 4091


def test_read_stat_end_missing(make_tree):
    with pytest.raises(FileNotFoundError):
        ps.read_stat_end(Roots(make_tree(EARLY_TREE)))


# --- renderers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("root", [IDLE, MERGED])
def test_render_pone_info_reproduces_the_kernel(root):
    text = fixture_text(root, "pone_info")
    assert ps.render_pone_info(ps.parse_counters(text)) == text


@pytest.mark.parametrize("root", [IDLE, MERGED])
def test_render_stat_end_reproduces_the_kernel(root):
    text = fixture_text(root, "pone_stat_end")
    assert ps.render_stat_end(ps.parse_counters(text)) == text


def test_render_pone_info_defaults_and_extra_keys():
    text = ps.render_pone_info({"slice merge cnt": 9, "not a pone_info counter": 1})
    lines = text.split("\r\n")
    assert len(lines) == 35 and lines[-1] == ""
    assert lines[10] == "slice merge cnt: 9"
    assert lines[0] == "slice alloc cnt: 0"
    assert lines[33] == "page recycle count 0"
    assert "\n" not in text.replace("\r\n", "")


def test_render_stat_end_keeps_the_kernels_bug():
    text = ps.render_stat_end({"slice out que cnt": 77, "slice merge cnt": 5,
                               "deamon task state": 2})
    assert "slice out que cnt: 0\r\n" in text
    assert "slice merge cnt: 5\r\n" in text
    assert "deamon task state" not in text
    assert text.endswith("slice copy pte1  count  : 0\r\n")


def test_render_value():
    assert ps.render_value(20000, "virt_release") == "20000"
    assert ps.render_value(-1, "early") == "-1"
    assert ps.render_value(5001, "guide") == "5001\n"
    with pytest.raises(ValueError, match="unknown pone dialect"):
        ps.render_value(1, "nope")


def test_render_abstract():
    text = ps.render_abstract(4091, 17)
    assert text == "page merge count: 4091\r\npage reclaim count: 17\r\n"
    assert ps.parse_counters(text) == {"page merge count": 4091, "page reclaim count": 17}
    # what the authors' scripts do with it
    line = [l for l in text.splitlines() if l.startswith("page reclaim count")][0]
    assert line.split()[3] == "17"


@pytest.mark.parametrize("root, knobs", [(IDLE, {}),
                                         (MERGED, {"pone_deamon_scan_period": 5000})])
def test_render_tree_reproduces_the_recorded_trees(root, knobs):
    files = ps.render_tree("virt_release", ps.parse_counters(fixture_text(root, "pone_info")),
                           knobs)
    assert sorted(files) == sorted(ps.VIRT_RELEASE_FILES)
    for path in (root / PONE).iterdir():
        assert files[path.name] == path.read_bytes().decode(), path.name
    assert files["pone_debug"] == "-1"
    assert files["pone_sd_tree"] == "check dmesg buffer11111"
    assert files["pone_stat_begin"] == "begin stat\r\n"


def test_render_tree_guide_round_trips_through_read_pone(tmp_path):
    counters = {"slice merge cnt": 100, "delete merge page cnt": 30, "page recycle count": 7,
                "slice alloc cnt": 200}
    files = ps.render_tree("guide", counters, {"pone_nice": 5})
    assert sorted(files) == sorted(ps.GUIDE_FILES)
    assert files["pone_nice"] == "5\n"
    assert files["pone_daemon_scan_period"] == "20000\n"
    assert files["pone_debug"] == "-1\n"
    assert files["pone_abstract"] == "page merge count: 70\r\npage reclaim count: 7\r\n"
    snap = ps.read_pone(Roots(write_tree(tmp_path, {PONE + k: v for k, v in files.items()})))
    assert snap.dialect == "guide"
    assert snap.reasons == []
    assert snap.knobs == {"pone_nice": 5, "pone_daemon_scan_period": 20000,
                          "pone_daemon_run": 1, "pone_reclaim_run": 1, "pone_run": 1,
                          "pone_divide_thread_enable": 1}
    assert snap.info == {**dict.fromkeys(ps.PONE_INFO_KEYS, 0), **counters}
    assert snap.abstract == {"page merge count": 70, "page reclaim count": 7}


def test_render_tree_guide_reclaim_period_only_when_given():
    files = ps.render_tree("guide", {}, {"pone_daemon_reclaim_period": 3000})
    assert files["pone_daemon_reclaim_period"] == "3000\n"
    assert sorted(files) == sorted(ps.GUIDE_FILES + ("pone_daemon_reclaim_period",))


def test_render_tree_early():
    files = ps.render_tree("early", {"slice merge cnt": 2}, {})
    assert sorted(files) == sorted(ps.EARLY_FILES)
    assert files["pone_debug"] == "-1"
    assert ps.parse_counters(files["pone_info"])["slice merge cnt"] == 2
