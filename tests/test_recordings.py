"""The real recordings (fixtures/pone-virt_release) as counters-only logs: parsed, reported,
and compared with the emulator's run1 scenario."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import PONE_FIXTURES
from dynvm_trace.cli.import_cmd import import_recording
from dynvm_trace.compare import MATCHES, compare_counters, render_rows
from dynvm_trace.environment import Environment
from dynvm_trace.logfile import LogFormatError, LogReader, LogWriter
from dynvm_trace.paths import Roots
from dynvm_trace.pone_sysfs import PONE_INFO_KEYS
from dynvm_trace.recordings import (PPR, UPTIME, RecordingFormatError, detect_format,
                                    parse_recording, recording_to_log)
from dynvm_trace.report import render_text, summarize
from dynvm_trace.sources.emulate import EmulateSource

RUN1 = PONE_FIXTURES / "run1-merge-cow.txt"
PPR_FILE = PONE_FIXTURES / "ppr-release-refault.txt"
SEC = 1_000_000_000
RUN1_UPTIMES = ("13.47", "23.65", "33.84", "44.02", "54.19", "64.35", "74.53", "84.68", "94.85",
                "105.03", "115.19", "125.36", "135.54", "150.79", "161.01", "171.26", "181.48",
                "191.68", "210.08")
COMPARED = ("slice merge cnt", "slice new insert cnt", "insert sd tree ok cnt",
            "delete merge page cnt", "delete sd tree ok cnt", "slice alloc cnt")


def ns(seconds: str) -> int:
    whole, _, frac = seconds.partition(".")
    return int(whole) * SEC + int(frac.ljust(9, "0"))


@pytest.fixture(scope="module")
def run1():
    return parse_recording(RUN1.read_text(), RUN1)


@pytest.fixture(scope="module")
def ppr():
    return parse_recording(PPR_FILE.read_text(), PPR_FILE)


@pytest.fixture(scope="module")
def run1_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "run1.jsonl"
    recording_to_log(RUN1, path)
    return path


@pytest.fixture(scope="module")
def emulated_run1_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("emulated") / "run1-emulated.jsonl.gz"
    src = EmulateSource("run1", seed=1, speed=None)
    with LogWriter(path, src.header()) as w:
        for batch in src.batches(SEC, None):
            w.write(batch.records)
    return path


def by_ts(rec, seconds: str):
    return next(s for s in rec.snapshots if s.ts == ns(seconds))


# ---- run1: sections on the uptime clock -----------------------------------------------------

def test_run1_has_19_pone_info_snapshots_on_the_uptime_clock(run1):
    assert detect_format(RUN1.read_text()) == UPTIME
    assert run1.format == UPTIME and run1.clock == "uptime"
    assert [s.ts for s in run1.snapshots] == [ns(t) for t in RUN1_UPTIMES]
    assert run1.snapshots[0].ts == 13_470_000_000
    assert all(tuple(s.pone_info) == PONE_INFO_KEYS for s in run1.snapshots)
    assert [s.line for s in run1.snapshots][:3] == [14, 52, 90]


def test_run1_values_at_recorded_times(run1):
    assert by_ts(run1, "23.65").pone_info["slice merge cnt"] == 0
    at_33 = by_ts(run1, "33.84").pone_info
    assert at_33["slice merge cnt"] == 65_535
    assert at_33["slice new insert cnt"] == 8_196
    assert at_33["insert sd tree ok cnt"] == 73_731
    assert at_33["slice que change watch cnt"] == 73_731  # "que change watch  cnt" in the kernel
    at_150 = by_ts(run1, "150.79").pone_info
    assert at_150["slice merge cnt"] == 67_534
    assert at_150["delete merge page cnt"] == 2_000
    assert at_150["delete sd tree ok cnt"] == 2_001
    at_210 = by_ts(run1, "210.08").pone_info
    assert at_210["delete merge page cnt"] == 67_534
    assert at_210["delete sd tree ok cnt"] == at_210["insert sd tree ok cnt"] == 75_733
    assert at_210["page recycle count"] == 0 and at_210["deamon task state"] == 2


def test_run1_meminfo_group(run1):
    assert run1.snapshots[0].meminfo == {"MemFree": 3_539_544, "AnonPages": 329_584,
                                         "VmRSS": 304_676}
    assert by_ts(run1, "33.84").meminfo == {"MemFree": 3_800_684, "AnonPages": 67_444,
                                            "VmRSS": 304_676}
    # the workload had exited: its VmRSS could not be read
    assert run1.snapshots[-1].meminfo == {"MemFree": 3_835_880, "AnonPages": 460}


def test_run1_annotations_and_stat_end(run1):
    assert run1.annotations == [
        {"text": "set pone_deamon_scan_period=5000 (minimum allowed = base period 5000 ms)"},
        {"text": "bcc: ls /lib/modules/4.4.1/build ->"},
        {"text": "bcc wait ended after 6s (ready=yes)"},
        {"text": "start workload"},
        {"text": "workload ready after 2s"},
        {"ts": 135_540_000_000, "text": "COW break: write 1 byte into 2000 identical pages"},
        {"ts": 210_080_000_000, "text": "risky debug attributes (printk side effects)"},
    ]
    assert run1.stat_end["ts"] == 191_680_000_000
    values = run1.stat_end["values"]
    assert len(values) == 31
    assert values["slice out que cnt"] == 0  # the kernel's bug: always 0
    assert values["data map key cnt"] == 307_890
    assert values["delete sd tree ok cnt"] == 2_002
    assert "deamon task state" not in values and "page recycle count" not in values


def test_run1_log_header_and_records(run1_log):
    reader = LogReader(run1_log)
    h = reader.header
    assert (h["source"], h["kernel"], h["host"], h["page_size"], h["clock"]) == \
        ("pone", "4.4.1", "recorded", 4096, "uptime")
    assert h["page_size_assumed"] is True and h["counters_only"] is True
    assert h["wall_anchor"] == {"ts": 0, "unix_ns": None}
    assert (h["recording"], h["recording_format"]) == ("run1-merge-cow.txt", "uptime")
    assert len(h["annotations"]) == 7 and h["pone_stat_end"]["ts"] == 191_680_000_000
    records = list(reader.records())
    assert len(records) == 38
    assert [r["group"] for r in records[:4]] == ["pone_info", "meminfo", "pone_info", "meminfo"]
    assert {r["kind"] for r in records} == {"counters"}
    assert {r["src"] for r in records} == {"pone"}
    info = [r for r in records if r["group"] == "pone_info"]
    assert [r["ts"] for r in info] == [ns(t) for t in RUN1_UPTIMES]
    assert info[2] == {"kind": "counters", "ts": 33_840_000_000, "src": "pone",
                       "group": "pone_info", "values": info[2]["values"]}
    assert info[2]["values"]["slice merge cnt"] == 65_535
    assert reader.warnings == []


def test_run1_report_counters(run1_log, run1):
    summary = summarize(LogReader(run1_log))
    assert summary["header"]["page_size"] == 4096 and summary["header"]["clock"] == "uptime"
    assert summary["span"] == {"first_ts": 13_470_000_000, "last_ts": 210_080_000_000,
                               "duration_ns": 196_610_000_000}
    assert summary["counters"]["pone_info"] == run1.snapshots[-1].pone_info
    assert summary["counters"]["meminfo"] == {"MemFree": 3_835_880, "AnonPages": 460}
    assert summary["vms"] == [] and summary["lost"] == 0
    assert sum(summary["totals"]["events"].values()) == 0
    assert summary["correlation"]["counters_records"] == 38
    text = render_text(summary)
    assert "slice merge cnt                                67,534" in text
    assert "clock        uptime" in text


def test_run1_report_says_counters_only(run1_log):
    """A log whose header says counters_only has no events to compare the counters with: the
    correlation is skipped, not "differs" (today every rule whose counters moved differs)."""
    corr = summarize(LogReader(run1_log))["correlation"]
    assert corr["verdict"] == "counters only: no events to compare"
    assert corr["rules"] == []
    assert summarize(LogReader(run1_log))["warnings"] == []


# ---- ppr: INFO lines on the workload's clock ------------------------------------------------

def test_ppr_snapshots(ppr):
    assert detect_format(PPR_FILE.read_text()) == PPR
    assert ppr.format == PPR and ppr.clock == "workload"
    assert [s.ts for s in ppr.snapshots] == [ns(t) for t in (
        "0.2", "0.6", "1.2", "6.2", "11.3", "11.5", "11.5", "21.5", "31.5", "41.5")]
    assert [s.line for s in ppr.snapshots] == [7, 9, 14, 15, 17, 20, 22, 26, 27, 28]
    labels = ("slice alloc cnt", "slice change volatile ok cnt", "slice out que cnt",
              "virt page merge count", "virt page merge count err", "slice que change watch cnt",
              "slice merge cnt", "slice new insert cnt", "slice deamon find volatile cnt",
              "slice mem watch reuse cnt", "slice volatile free cnt", "slice other free cnt",
              "page recycle count")
    assert all(tuple(s.pone_info) == labels for s in ppr.snapshots)
    assert set(labels) <= set(PONE_INFO_KEYS)
    marked = by_ts(ppr, "6.2").pone_info
    assert marked["virt page merge count"] == 997
    assert marked["virt page merge count err"] == 53
    assert marked["page recycle count"] == 997
    assert marked["slice out que cnt"] == 1_050
    before, after = ppr.snapshots[5].pone_info, ppr.snapshots[6].pone_info
    assert after["page recycle count"] - before["page recycle count"] == -101
    assert after["slice alloc cnt"] - before["slice alloc cnt"] == 101
    assert ppr.snapshots[0].pone_info["slice alloc cnt"] == 1
    assert ppr.snapshots[-1].pone_info["slice mem watch reuse cnt"] == 6
    assert all(s.meminfo == {} for s in ppr.snapshots)


def test_ppr_annotations(ppr):
    phases = [a for a in ppr.annotations if a["text"].startswith("INFO")]
    assert phases == [
        {"ts": 200_000_000, "text": "INFO before touch"},
        {"ts": 600_000_000, "text": "INFO after touch"},
        {"ts": 1_200_000_000, "text": "INFO right after marking"},
        {"ts": 6_200_000_000, "text": "INFO t+5s after marking"},
        {"ts": 11_300_000_000, "text": "INFO t+10s after marking"},
        {"ts": 11_500_000_000, "text": "INFO before refault"},
        {"ts": 11_500_000_000, "text": "INFO right after refault"},
        {"ts": 21_500_000_000, "text": "INFO hold t+10s after refault"},
        {"ts": 31_500_000_000, "text": "INFO hold t+20s after refault"},
        {"ts": 41_500_000_000, "text": "INFO hold t+30s after refault"},
    ]
    assert ppr.annotations[0] == {"text": "run pprwork.py"}
    assert {"ts": 11_500_000_000, "text": "wrote 8 bytes into 101 released pages in 0.002s"} \
        in ppr.annotations
    assert ppr.annotations[-1] == {"ts": 41_500_000_000, "text": "pone_info after exit"}
    assert len(ppr.annotations) == 29
    assert ppr.stat_end is None


def test_ppr_log(tmp_path):
    out = tmp_path / "ppr.jsonl"
    recording_to_log(PPR_FILE, out)
    reader = LogReader(out)
    assert reader.header["clock"] == "workload"
    assert reader.header["recording_format"] == "ppr"
    assert "pone_stat_end" not in reader.header
    records = list(reader.records())
    assert len(records) == 10 and {r["group"] for r in records} == {"pone_info"}
    summary = summarize(LogReader(out))
    assert summary["counters"]["pone_info"]["virt page merge count"] == 997
    assert summary["counters"]["pone_info"]["page recycle count"] == 896


# ---- the emulator's run1 against the recording ----------------------------------------------

def test_emulated_run1_matches_the_recording(run1_log, emulated_run1_log):
    rows = compare_counters(run1_log, emulated_run1_log, COMPARED)
    assert [r.label for r in rows] == list(COMPARED)
    assert [r.verdict for r in rows] == [MATCHES] * 6
    assert all(len(r.points) == 19 and r.worst is None for r in rows)
    merge = rows[0]
    assert [p.real for p in merge.points][2] == 65_535
    p = merge.points[13]  # uptime 150.79: the 1,999 re-merges are in
    assert (p.real_ts, p.real, p.emulated, p.difference) == (150_790_000_000, 67_534, 67_534, 0)
    assert 150 * SEC <= p.emulated_ts <= p.real_ts  # the last emulated snapshot at or before
    assert render_rows(rows).splitlines()[:2] == [
        "label                  snapshots  verdict",
        "slice merge cnt               19  matches"]


def test_compare_shows_the_worst_difference(run1_log, emulated_run1_log):
    # the kernel's key map bookkeeping is not modelled
    (row,) = compare_counters(run1_log, emulated_run1_log, ["data map key cnt"])
    assert row.verdict == "worst difference -623,270 at ts 210.08 s (real 623,270, emulated 0)"
    # the wrong clock mapping: as if the emulated run started at the recording's uptime 11.5
    rows = compare_counters(run1_log, emulated_run1_log,
                            ["slice merge cnt", "delete merge page cnt"], offset_ns=11_500_000_000)
    assert [r.verdict for r in rows] == [
        "worst difference -65,535 at ts 33.84 s (real 65,535, emulated 0)",
        "worst difference -65,534 at ts 210.08 s (real 67,534, emulated 2,000)",
    ]
    (row,) = compare_counters(run1_log, emulated_run1_log, ["slice merge cnt"],
                              offset_ns=14 * SEC)
    assert row.verdict == "no emulated snapshot at or before ts 13.47 s"
    (row,) = compare_counters(run1_log, emulated_run1_log, ["no such counter"])
    assert row.verdict == "missing from the real snapshot at ts 13.47 s"


# ---- the command ----------------------------------------------------------------------------

def invoke(args):
    env = Environment(stdout=io.StringIO(), stderr=io.StringIO(),
                      roots=Roots(Path("/nonexistent-sys"), Path("/nonexistent-proc")))
    result = CliRunner().invoke(import_recording, [str(a) for a in args], obj=env)
    return result, env


def test_import_command_writes_a_log(tmp_path):
    out = tmp_path / "run1.jsonl.gz"
    result, env = invoke([RUN1, "-o", out])
    assert result.exit_code == 0, result.output
    assert env.stderr.getvalue() == (
        f"dynvm-trace: wrote 19 snapshots (38 counters records: meminfo, pone_info; clock uptime) "
        f"from the uptime recording {RUN1} to {out}\n")
    assert env.stdout.getvalue() == ""
    assert len(list(LogReader(out).records())) == 38
    out2 = tmp_path / "ppr.jsonl"
    result, env = invoke([PPR_FILE, "-o", out2])
    assert result.exit_code == 0
    assert env.stderr.getvalue() == (
        f"dynvm-trace: wrote 10 snapshots (10 counters records: pone_info; clock workload) "
        f"from the ppr recording {PPR_FILE} to {out2}\n")
    assert import_recording.name == "import"


def test_import_command_bad_input_writes_nothing(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\n")
    out = tmp_path / "out.jsonl"
    result, env = invoke([bad, "-o", out])
    assert result.exit_code != 0
    assert isinstance(result.exception, RecordingFormatError)
    assert isinstance(result.exception, LogFormatError)  # main() exits BAD_INPUT (3) on these
    assert str(result.exception) == (f"{bad}: unknown format: no `--- pone_info @ uptime T` "
                                     "section and no `PPR[t]: INFO ...` line")
    assert not out.exists()
    result, _ = invoke([RUN1, "-o", RUN1])
    assert result.exit_code == 2 and "would overwrite the recording" in result.output


# ---- malformed input -------------------------------------------------------------------------

def write(tmp_path, text: str, name: str = "rec.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(tmp_path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(RecordingFormatError) as e:
        recording_to_log(path, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    return str(e.value).replace(str(path), "FILE")


def test_garbled_counter_line(tmp_path):
    lines = RUN1.read_text().splitlines(keepends=True)
    assert lines[100] == "slice merge cnt: 65535\n"  # line 101, in the section of line 90
    garbled = lines[:100] + ["slice merge cnt: 65x35\n"] + lines[101:]
    assert error_of(tmp_path, "".join(garbled)) == \
        "FILE:101: pone_info section of line 90: `slice merge cnt`: not an integer: '65x35'"
    wrong_label = lines[:100] + ["slice mrge cnt: 65535\n"] + lines[101:]
    assert error_of(tmp_path, "".join(wrong_label)) == (
        "FILE:101: pone_info section of line 90: expected `slice merge cnt` here, got "
        "'slice mrge cnt: 65535'")
    missing_line = lines[:100] + lines[101:]
    assert error_of(tmp_path, "".join(missing_line)).startswith(
        "FILE:101: pone_info section of line 90: expected `slice merge cnt` here, got "
        "'slice insert sd tree err cnt: 0'")
    bad_meminfo = "".join(lines).replace("MemFree:         3800684 kB", "MemFree: lots kB")
    assert error_of(tmp_path, bad_meminfo) == \
        "FILE:125: pone_info section of line 90: MemFree: not an integer: 'lots'"


def test_truncated_recording(tmp_path):
    lines = RUN1.read_text().splitlines(keepends=True)
    assert error_of(tmp_path, "".join(lines[:109])) == (
        "FILE:90: pone_info section of line 90 is cut short: the file ends after 19 of its 34 "
        "lines (truncated?)")
    # cut in the middle of a line
    assert error_of(tmp_path, "".join(lines[:100]) + "slice merge c") == (
        "FILE:101: pone_info section of line 90: expected `slice merge cnt` here, got "
        "'slice merge c'")
    # the untimed pone_stat_end section cut short
    start = lines.index("--- cat pone_stat_end\n")
    assert error_of(tmp_path, "".join(lines[:start + 5])) == (
        f"FILE:{start + 1}: pone_stat_end section of line {start + 1} is cut short: the file "
        "ends after 4 of its 31 lines (truncated?)")


def test_ppr_garbled_and_truncated(tmp_path):
    lines = PPR_FILE.read_text().splitlines(keepends=True)
    assert error_of(tmp_path, "".join(lines).replace("virt page merge count=997 | virt page "
                                                     "merge count err=53 | slice que change "
                                                     "watch cnt=53 | slice merge cnt=0 | "
                                                     "slice new insert cnt=0 | slice deamon "
                                                     "find volatile cnt=1050 | slice mem "
                                                     "watch reuse cnt=0 | slice volatile free "
                                                     "cnt=2 | slice other free cnt=0 | page "
                                                     "recycle count=997\n",
                                                     "virt page merge count=9x7 | etc\n", 1)) \
        == "FILE:15: INFO: 'virt page merge count': not an integer: '9x7'"
    cut = "".join(lines[:27]) + lines[27][:120]
    assert error_of(tmp_path, cut) == \
        "FILE:28: INFO counter 3 is not `label=N`: 'slice out que cnt'"
    cut = "".join(lines[:27]) + lines[27].split(" | page recycle")[0] + "\n"
    assert error_of(tmp_path, cut) == ("FILE:28: INFO has 12 counters, not the 13 of line 7; "
                                       "missing ['page recycle count'] (cut short?)")
    assert error_of(tmp_path, "PPR[    0.2]: INFO before touch nonsense=1\n") == (
        "FILE:1: INFO: the first counter 'before touch nonsense' is not a pone_info label "
        "(cannot tell it from the phase)")
    assert error_of(tmp_path, "PPR[ 3.0]: INFO x slice alloc cnt=1\n"
                              "PPR[ 2.0]: INFO x slice alloc cnt=2\n") == \
        "FILE:2: time 2.0 is before the previous line's"


def test_empty_unknown_and_unreadable(tmp_path):
    assert error_of(tmp_path, "") == "FILE:1: empty file: not a recording"
    assert error_of(tmp_path, "\n  \n") == "FILE:1: empty file: not a recording"
    assert error_of(tmp_path, "just some text\n--- something else\n") == (
        "FILE: unknown format: no `--- pone_info @ uptime T` section and no `PPR[t]: INFO ...` "
        "line")
    with pytest.raises(RecordingFormatError, match=r"nope\.txt: no such file$"):
        recording_to_log(tmp_path / "nope.txt", tmp_path / "out.jsonl")
    p = tmp_path / "bin.txt"
    p.write_bytes(b"--- pone_info @ uptime 1.0\n\xff\n")
    with pytest.raises(RecordingFormatError, match=r"bin\.txt:2: not UTF-8 text$"):
        recording_to_log(p, tmp_path / "out.jsonl")


def test_out_of_order_sections_and_bad_uptime(tmp_path):
    lines = RUN1.read_text().splitlines(keepends=True)
    swapped = "".join(lines).replace("--- pone_info @ uptime 23.65", "--- pone_info @ uptime 13.47")
    assert error_of(tmp_path, swapped) == \
        "FILE:52: uptime 13.47 is not after the previous section's"
    assert error_of(tmp_path, "".join(lines).replace("uptime 23.65", "uptime soon")) == \
        "FILE:52: uptime 'soon' is not a number of seconds"
    start = lines.index("--- cat pone_stat_end\n")
    assert error_of(tmp_path, "".join(lines).replace("--- cat pone_stat_end", "--- cat foo")) \
        == f"FILE:{start + 1}: unknown section '--- cat foo'"


def test_crlf_recording_parses_the_same(tmp_path, run1):
    crlf = RUN1.read_text().replace("\n", "\r\n")
    rec = parse_recording(crlf, "crlf.txt")
    assert [s.pone_info for s in rec.snapshots] == [s.pone_info for s in run1.snapshots]
    assert rec.annotations == run1.annotations


def test_import_through_main(tmp_path):
    """User errors exit BAD_INPUT with one line."""
    from cli_helpers import run
    from dynvm_trace import exitcodes
    out = tmp_path / "run1.jsonl"
    ok = run(["import", RUN1, "-o", out])
    assert (ok.code, ok.out) == (exitcodes.OK, "")
    assert ok.err.startswith("dynvm-trace: wrote 19 snapshots (38 counters records")
    bad = write(tmp_path, RUN1.read_text().replace("slice merge cnt: 65535",
                                                   "slice merge cnt: ?", 1))
    res = run(["import", bad, "-o", tmp_path / "bad.jsonl"])
    assert res.code == exitcodes.BAD_INPUT == 3
    assert res.err == (f"dynvm-trace: error: {bad}:101: pone_info section of line 90: "
                       "`slice merge cnt`: not an integer: '?'\n")
    assert not (tmp_path / "bad.jsonl").exists()
