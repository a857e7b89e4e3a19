"""Every command, in-process, against fixture trees: output (golden where it is a layout) and
exit status. Bad inputs named by the issue each get a test."""

from __future__ import annotations

import gzip
import io
import re
import json
import shutil

import pytest

from dynvm_trace import exitcodes
from dynvm_trace.cli.main import main
from dynvm_trace.environment import Environment
from dynvm_trace.logfile import LogReader
from dynvm_trace.paths import Roots

from cli_helpers import assert_golden, normalize, run
from conftest import PONE_FIXTURES, write_tree

MERGED = Roots(PONE_FIXTURES / "sysfs-merged", PONE_FIXTURES / "no-proc")

SMALL_SCENARIO = """
name = "small"
description = "a prime number of identical pages, some COW writes, a free and a refault"
dialect = "virt_release"
scan_period = 5000
duration = 60

[[vm]]
name = "vm1"
pages = 8192
pid = 4242

[[step]]
at = 1.0
vm = "vm1"
action = "fill"
count = 4099
pattern = "identical"
value = "a"

[[step]]
at = 25.0
vm = "vm1"
action = "write"
count = 1031
pattern = "unique"

[[step]]
at = 30.0
vm = "vm1"
action = "free"
start = 5000
count = 257

[[step]]
at = 40.0
vm = "vm1"
action = "touch"
start = 5000
count = 127
"""


@pytest.fixture
def scenario(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_SCENARIO)
    return path


@pytest.fixture
def small_log(tmp_path, scenario):
    log = tmp_path / "small.jsonl"
    r = run(["emulate", "--scenario", scenario, "--seed", "7", "--speed", "max", "--duration", "60",
             "-o", log])
    assert r.code == exitcodes.OK, r.err
    return log


def without_live_requirements(text: str) -> str:
    """The 'live tracing needs' block checks this machine (privilege, bpf(), bcc, headers):
    tests/test_bpf_host.py covers it; the golden files keep the rest."""
    return re.sub(r"(?m)^live tracing needs:\n(  .*\n)*", "<live tracing needs: this machine>\n", text)


@pytest.fixture
def root_with_bcc(monkeypatch):
    """Doctor's pone line as on a root host with bcc, whoever runs the tests."""
    from dynvm_trace.sources import pone
    monkeypatch.setattr(pone.os, "geteuid", lambda: 0)
    monkeypatch.setattr(pone, "import_bcc", lambda: None)


def test_doctor_on_a_pone_host_without_kprobes(root_with_bcc):
    r = run(["doctor"], MERGED)
    assert r.code == exitcodes.OK
    assert_golden("cli_doctor_pone_no_kprobes.txt", without_live_requirements(normalize(r.out)))


def test_doctor_json_names_every_source_and_the_pick(root_with_bcc):
    r = run(["doctor", "--json"], MERGED)
    data = json.loads(r.out)
    assert data["auto"] == "emulate"
    assert [s["name"] for s in data["sources"]] == ["pone", "ksm", "emulate", "replay"]
    assert [s["ok"] for s in data["sources"]] == [False, False, True, True]
    assert data["sources"][0]["detail"] == ("no kprobe_events in tracefs: CONFIG_KPROBES off or "
                                            "tracefs not mounted")


def test_status_reads_the_recorded_tree():
    r = run(["status"], MERGED)
    assert r.code == exitcodes.OK
    assert_golden("cli_status_merged.txt", normalize(r.out))


def test_status_json_values():
    data = json.loads(run(["status", "--json"], MERGED).out)
    assert data["pone"]["dialect"] == "virt_release"
    assert data["pone"]["merged_pages"] == 4091
    assert data["pone"]["pone_info"]["slice protect err cnt"] == 14
    assert data["pone"]["knobs"]["pone_deamon_scan_period"] == 5000
    assert data["vms"] == []


def test_status_finds_vms_in_proc(tmp_path):
    proc = write_tree(tmp_path / "proc", {
        "vmstat": "nr_free_pages 5\ncow_ksm 17\nksm_swpin_copy 0\n",
        "101/comm": "qemu-system-x86\n",
        "101/cmdline": b"qemu-system-x86_64\0-name\0guest=db1,debug-threads=on\0-m\0004096\0",
        "101/ksm_stat": "ksm_rmap_items 10\nksm_merging_pages 7\nksm_process_profit 4096\n",
        "102/comm": "bash\n",
    })
    data = json.loads(run(["status", "--json"], Roots(tmp_path / "sys", proc)).out)
    assert data["vmstat"] == {"cow_ksm": 17, "ksm_swpin_copy": 0}
    assert data["vms"] == [{"pid": 101, "name": "db1", "comm": "qemu-system-x86", "pone_tracked": True,
                            "ksm_stat": {"ksm_rmap_items": 10, "ksm_merging_pages": 7,
                                         "ksm_process_profit": 4096}}]


def test_knobs_list():
    r = run(["knobs"], MERGED)
    assert r.code == exitcodes.OK
    assert_golden("cli_knobs_merged.txt", r.out)


@pytest.fixture
def writable(tmp_path):
    shutil.copytree(PONE_FIXTURES / "sysfs-merged", tmp_path / "sys")
    return Roots(tmp_path / "sys", tmp_path / "proc")


def test_knobs_set_writes_and_reads_back(writable):
    r = run(["knobs", "set", "pone_deamon_scan_period", "20000"], writable)
    assert (r.code, r.out) == (exitcodes.OK, "pone_deamon_scan_period: 5000 -> 20000\n")
    assert (writable.pone_dir / "pone_deamon_scan_period").read_text() == "20000"


@pytest.mark.parametrize("name, value, message", [
    ("pone_run", "2", "pone_run"),
    ("pone_deamon_scan_period", "4999", "pone_deamon_scan_period"),
    ("pone_run", "on", "pone_run"),
    ("pone_info", "1", "pone_info"),
    ("pone_debug", "1", "pone_debug"),
    ("no_such_knob", "1", "no_such_knob"),
])
def test_knobs_set_refuses_bad_input_with_one_line_and_writes_nothing(writable, name, value, message):
    before = {p.name: p.read_bytes() for p in writable.pone_dir.iterdir()}
    r = run(["knobs", "set", name, value], writable)
    assert r.code == exitcodes.USAGE
    assert r.out == ""
    assert r.err.count("\n") == 1 and r.err.startswith("dynvm-trace: error: ") and message in r.err
    assert {p.name: p.read_bytes() for p in writable.pone_dir.iterdir()} == before


def test_knobs_set_without_permission(writable, monkeypatch):
    from dynvm_trace import knobs

    def denied(path, text):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(knobs, "_write_text", denied)
    r = run(["knobs", "set", "pone_run", "0"], writable)
    assert r.code == exitcodes.NOT_PERMITTED
    assert r.err == (f"dynvm-trace: error: writing {writable.pone_dir / 'pone_run'}: "
                     "permission denied: run as root\n")


def test_knobs_without_any_interface():
    r = run(["knobs"])
    assert r.code == exitcodes.MISSING_FEATURE
    assert "neither" in r.out


def test_emulate_writes_a_log_whose_report_agrees(small_log):
    data = json.loads(run(["report", small_log, "--json"]).out)
    assert data["totals"]["events"]["merge"] == 4098
    assert data["totals"]["events"]["cow_break"] == 1031
    assert data["totals"]["pages"]["reclaim_release"] == 257
    assert data["totals"]["pages"]["reclaim_refault"] == 127
    assert data["counters"]["pone_info"]["slice merge cnt"] == 4098
    assert data["correlation"]["verdict"] == "agrees"
    assert data["lost"] == 0


def test_report_text_is_stable(small_log):
    r = run(["report", small_log])
    assert r.code == exitcodes.OK
    assert_golden("cli_report_small.txt", normalize(r.out))


def test_report_check_fails_when_counters_disagree(tmp_path, small_log):
    lines = small_log.read_text().splitlines()
    kept = [line for line in lines if '"kind":"cow_break"' not in line][:]  # lose every COW event
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(kept) + "\n")
    assert run(["report", broken, "--check"]).code == exitcodes.FAILURE
    assert run(["report", small_log, "--check"]).code == exitcodes.OK


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b'{"kind":"merge","ts":1,"src":"x"}\n', "missing header"),
    (b"garbage\n", "first line is not JSON"),
])
def test_report_bad_logs_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    r = run(["report", path])
    assert r.code == exitcodes.BAD_INPUT
    assert r.err.count("\n") == 1 and message in r.err and str(path) in r.err


def test_report_of_a_corrupt_gzip_log(tmp_path, small_log):
    path = tmp_path / "bad.jsonl.gz"
    data = bytearray(gzip.compress(small_log.read_bytes()))
    data[100:140] = bytes(40)
    path.write_bytes(bytes(data))
    r = run(["report", path])
    assert r.code == exitcodes.BAD_INPUT
    assert "corrupt gzip stream" in r.err


def test_report_of_a_log_cut_short_warns_and_reports(tmp_path, small_log):
    data = small_log.read_bytes()
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(data[: len(data) - 10])
    r = run(["report", cut, "--json"])
    assert r.code == exitcodes.OK
    assert "last line is cut short" in r.err
    assert json.loads(r.out)["warnings"][0].endswith("last line is cut short (recorder killed?); ignored")


def test_emulate_bad_scenario_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[vm]]\nname = "a"\nmemory = "-1GiB"\n')
    r = run(["emulate", "--scenario", bad])
    assert r.code == exitcodes.BAD_INPUT
    assert r.err == f"dynvm-trace: error: {bad}: vm[0].memory: not a size: '-1GiB' (e.g. 4096, \"4GiB\", \"512MiB\")\n"


def test_emulate_unknown_scenario_name():
    r = run(["emulate", "--scenario", "no-such-scenario"])
    assert r.code == exitcodes.BAD_INPUT
    assert "no-such-scenario" in r.err


@pytest.mark.parametrize("args", [["--speed", "fast"], ["--speed", "0"], ["--duration", "-1"],
                                  ["--interval", "0"]])
def test_bad_options_are_usage_errors(args):
    assert run(["record", "-o", "/dev/null", *args]).code == exitcodes.USAGE


def test_emulate_list_names_the_shipped_scenarios():
    names = [line.split()[0] for line in run(["emulate", "--list"]).out.splitlines()]
    assert {"run1", "demo", "reclaim", "sampled", "tmpfs-random", "scale64"} <= set(names)


def test_record_from_auto_falls_back_to_the_emulated_host_and_says_why(tmp_path, scenario):
    log = tmp_path / "r.jsonl.gz"
    r = run(["record", "--scenario", scenario, "--duration", "30", "-o", log])
    assert r.code == exitcodes.OK
    assert "source: emulate, the emulated host (pone: " in r.err
    assert "recording: " in r.err and ", 0 lost" in r.err
    reader = LogReader(log)
    assert reader.header["source"] == "emulate" and reader.header["scenario"] == "small"
    recs = list(reader.records())
    assert 30 * 10**9 <= max(rec["ts"] for rec in recs) < 31 * 10**9  # the free step at 30 s is in
    assert not [rec for rec in recs if rec["kind"] == "reclaim_refault"]  # the touch at 40 s is not


def test_trace_json_is_json_lines_and_replays_identically(small_log):
    r = run(["trace", "--source", "replay", "--log", small_log, "--speed", "max", "--json"])
    assert r.code == exitcodes.OK
    replayed = [json.loads(line) for line in r.out.splitlines()]
    assert replayed == list(LogReader(small_log).records())


def test_trace_text_and_kind_filter(small_log):
    r = run(["trace", "--source", "replay", "--log", small_log, "--speed", "max",
             "--kind", "reclaim_refault"])
    lines = r.out.splitlines()
    assert lines and all(" reclaim_refault " in line for line in lines)
    assert sum(int(line.split("pages=")[1].split()[0]) for line in lines) == 127


def test_replay_needs_a_log():
    r = run(["trace", "--source", "replay"])
    assert r.code == exitcodes.USAGE
    assert r.err == "dynvm-trace: error: --source replay needs --log FILE\n"


def test_live_sources_say_why_they_are_unavailable():
    r = run(["trace", "--source", "pone"])
    assert r.code == exitcodes.MISSING_FEATURE
    assert r.err.startswith("dynvm-trace: error: pone source unavailable: ")


def test_top_without_a_terminal_prints_interval_lines_then_the_report(small_log):
    r = run(["top", "--source", "replay", "--log", small_log, "--speed", "max", "--interval", "5"])
    assert r.code == exitcodes.OK
    first, report = r.out.split("\ndynvm-trace report\n")
    lines = first.strip().splitlines()
    # one line per completed 5 s interval of the 60 s log, then one at its last record
    assert [line.split()[0] for line in lines] == [f"{5.0 * i:.1f}" for i in range(1, 13)] + ["60.0"]
    assert lines[-1].lstrip().startswith("60.0 s  end | merges 4,098 cow 1,031 |"), lines[-1]
    assert lines[-1].endswith("counters vs events: agrees")
    assert lines[3].lstrip().startswith("20.0 s  merge 820/s |")
    assert lines[5].lstrip().startswith("30.0 s  cow_break 206/s |")
    assert lines[6].lstrip().startswith("35.0 s  reclaim_report 51 pages/s reclaim_release 51 pages/s |")  # 4,098 merges in the 15-20 s interval
    assert "CORRELATION (counters vs events): agrees" in report


def test_status_reads_pone_stat_end_only_on_request():
    assert "pone_stat_end" not in json.loads(run(["status", "--json"], MERGED).out)["pone"]
    data = json.loads(run(["status", "--json", "--stat-end"], MERGED).out)
    stat_end = data["pone"]["pone_stat_end"]
    assert len(stat_end) == 31 and stat_end["slice merge cnt"] == 4091
    assert stat_end["slice out que cnt"] == 0  # the kernel's bug: always 0 there
    assert "pone_stat_end (since pone_stat_begin)" in run(["status", "--stat-end"], MERGED).out


def test_roots_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DYNVM_SYSFS_ROOT", str(PONE_FIXTURES / "sysfs-idle"))
    monkeypatch.setenv("DYNVM_PROC_ROOT", str(PONE_FIXTURES / "no-proc"))
    env = Environment(stdout=io.StringIO(), stderr=io.StringIO())
    assert main(["status", "--json"], env) == exitcodes.OK
    assert json.loads(env.stdout.getvalue())["pone"]["knobs"]["pone_deamon_scan_period"] == 20000


def test_the_real_run1_recording_matches_the_emulated_run1(tmp_path):
    real, emulated = tmp_path / "real.jsonl", tmp_path / "emulated.jsonl.gz"
    assert run(["import", PONE_FIXTURES / "run1-merge-cow.txt", "-o", real]).code == exitcodes.OK
    assert run(["emulate", "--scenario", "run1", "-o", emulated]).code == exitcodes.OK
    r = run(["compare", real, emulated])
    assert r.code == exitcodes.OK
    assert [line.split()[-1] for line in r.out.splitlines()[1:]] == ["matches"] * 9
    assert "slice merge cnt                   19  matches" in r.out
    differs = run(["compare", real, emulated, "--label", "data map key cnt"])
    assert differs.code == exitcodes.FAILURE and "worst difference -623,270 at ts 210.08 s" in differs.out
    report = run(["report", real, "--check"])
    assert report.code == exitcodes.FAILURE  # counters only: nothing was verified
    assert "CORRELATION (counters vs events): counters only: no events to compare" in report.out


def test_doctor_for_pone_walks_the_guide_checks_and_probe_points(tmp_path, root_with_bcc):
    proc = write_tree(tmp_path / "proc", {"kallsyms": (PONE_FIXTURES / "kallsyms-subset.txt").read_text()})
    r = run(["doctor", "--source", "pone"], Roots(PONE_FIXTURES / "sysfs-merged", proc))
    assert r.code == exitcodes.OK
    text = without_live_requirements(normalize(r.out).replace(str(tmp_path), "<tmp>"))
    text = re.sub(r"(?m)^(ok|no)  kvm .*\n(  +fix: .*\n)?", "<the kvm check: depends on /dev/kvm here>\n", text)
    assert_golden("cli_doctor_pone_checks.txt", text)


def test_doctor_checks_probe_points_against_a_system_map(tmp_path):
    system_map = tmp_path / "System.map"
    system_map.write_text("".join(line + "\n" for line in
                                  (PONE_FIXTURES / "kallsyms-subset.txt").read_text().splitlines()
                                  if not line.endswith(" change_reverse_ref")))
    data = json.loads(run(["doctor", "--json", "--system-map", system_map], MERGED).out)
    (probe,) = [c for c in data["pone"] if c["name"] == "probe change_reverse_ref"]
    assert probe["ok"] is False and "merge" in probe["detail"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_top_on_a_terminal_draws_the_live_screen(small_log):
    env = Environment(stdout=Terminal(), stderr=io.StringIO(), roots=MERGED)
    code = main(["top", "--source", "replay", "--log", str(small_log), "--speed", "max",
                 "--interval", "5"], env)
    assert code == exitcodes.OK
    screen = env.stdout.getvalue()
    for text in ("source: replay", "events/s", "pages/s", "cow breaks", "shared now", "vm1",
                 "4,098", "1,031", "CORRELATION (counters vs events): agrees"):
        assert text in screen


def test_top_with_output_logs_every_record_it_replays(small_log, tmp_path):
    """`top -o` writes its log through the same low-priority encoder as `record`: every record
    of the replayed log is in it, in order."""
    out = tmp_path / "top.jsonl"
    r = run(["top", "--source", "replay", "--log", small_log, "--speed", "max", "--interval", "5",
             "--no-report", "-o", out])
    assert r.code == exitcodes.OK, r.err
    replayed = list(LogReader(out).records())
    assert len(replayed) > 1000 and replayed == list(LogReader(small_log).records())
