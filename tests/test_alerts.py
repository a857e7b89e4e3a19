"""Alerts (dynvm_trace/alerts.py): the kernel's own failure modes, from synthetic streams, from
the emulator's pin and crash_worker actions, the shipped `failures` scenario through
`report --json`, and the /proc poll of the pone threads (dynvm_trace/pone_threads.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynvm_trace.alerts import MESSAGES, Alerts, interleave
from dynvm_trace.emulator.model import THREADS
from dynvm_trace.emulator.scenario import ScenarioError
from dynvm_trace.events import event, problems
from dynvm_trace.logfile import LogReader, make_header
from dynvm_trace.pone_threads import (PF_KTHREAD, PoneThread, list_pone_threads, parse_stat,
                                      workers_record, workers_values)
from dynvm_trace.report import render_text, summarize
from cli_helpers import run as cli
from emulator_helpers import SEC, run, scenario

ERR, FIND, OUT = "virt page merge count err", "slice deamon find volatile cnt", "slice out que cnt"


def scan(seq: int) -> dict:
    return event("scan_start", seq * 5 * SEC, "pone", seq=seq, merge_scan=True)


def failed(seq: int, pfn: int, pages: int = 53, vm: str = "vm1", **kw) -> dict:
    return event("reclaim_release", seq * 5 * SEC + 10, "pone", pid=1000, vm=vm, pages=pages,
                 pfn=pfn, addr=pfn << 12, status=kw.pop("status", "failed"), **kw)


def info(ts: int, **values: int) -> dict:
    names = {"err": ERR, "find": FIND, "out": OUT}
    return event("counters", ts, "pone", group="pone_info",
                 values={names[k]: v for k, v in values.items()})


def workers(ts: int, *names: str) -> dict:
    return event("counters", ts, "pone", group="workers", values={n: THREADS[n] for n in names})


def feed(*batches: list[dict]) -> tuple[Alerts, list[dict]]:
    a, raised = Alerts(), []
    for b in batches:
        raised += a.feed(b)
    return a, raised


# --- release_stuck -----------------------------------------------------------------------------

def test_the_same_pages_failing_in_two_consecutive_cycles_raise_release_stuck():
    a, raised = feed([scan(5), failed(5, 0x1000)], [scan(6), failed(6, 0x1000)])
    assert raised == [{"kind": "alert", "ts": 6 * 5 * SEC + 11, "src": "pone", "pid": 1000,
                       "vm": "vm1", "alert": "release_stuck",
                       "message": MESSAGES["release_stuck"], "pages": 53, "count": 2,
                       "evidence": "events", "pfns": [0x1000], "first_ts": 30 * SEC + 11}]
    assert problems(raised[0]) == []
    assert a.snapshot() == [{k: v for k, v in raised[0].items() if k not in ("kind", "src", "ts")}
                            | {"last_ts": 30 * SEC + 11}]


def test_a_single_failure_raises_nothing():
    # 53 pages with a bad slot fail once (pone.md's ppr run) and go on to the merge path
    a, raised = feed([scan(1), failed(1, 0x1000)], [scan(2)], [scan(3), failed(3, 0x2000)])
    assert raised == [] and a.snapshot() == []


def test_failures_in_cycles_that_are_not_consecutive_raise_nothing():
    a, _ = feed([scan(1), failed(1, 0x1000)], [scan(3), failed(3, 0x1000)],
                [scan(5), failed(5, 0x1000)])
    assert a.snapshot() == []


def test_a_page_released_in_between_is_not_stuck():
    a, _ = feed([scan(1), failed(1, 0x1000)], [scan(2), failed(2, 0x1000, status="released")],
                [scan(3), failed(3, 0x1000)])
    assert a.snapshot() == []


def test_release_stuck_is_raised_once_and_counts_the_cycles():
    batches = [[scan(k), failed(k, 0x1000), failed(k, 0x5000, pages=7)] for k in range(1, 11)]
    a, raised = feed(*batches)
    assert [r["alert"] for r in raised] == ["release_stuck"]  # one alert per VM, raised once
    (snap,) = a.snapshot()
    assert (snap["pages"], snap["pfns"], snap["count"]) == (60, [0x1000, 0x5000], 10)
    assert snap["first_ts"] == 2 * 5 * SEC + 11 and snap["last_ts"] == 10 * 5 * SEC + 11 + 0


def test_release_stuck_per_vm_and_by_address_without_pfns():
    recs = []
    for k in (1, 2):
        recs += [scan(k), event("reclaim_release", k * 5 * SEC + 1, "pone", pid=7, pages=3,
                                addr=0x7000, status="failed"),
                 failed(k, 0x9000, pages=1, vm="vm2")]
    a, _ = feed(recs)
    snap = {s.get("vm", s.get("pid")): s for s in a.snapshot()}
    assert snap[7]["pages"] == 3 and snap[7]["addr"] == 0x7000 and "pfns" not in snap[7]
    assert snap["vm2"]["pfns"] == [0x9000]


def test_without_scan_records_every_repeat_counts():
    a, _ = feed([failed(1, 0x1000)], [failed(2, 0x1000)], [failed(3, 0x1000)])
    assert [(s["alert"], s["count"]) for s in a.snapshot()] == [("release_stuck", 3)]


def test_release_stuck_from_counters_alone():
    # err +53 in every window in which it moved; windows without a base cycle change nothing
    errs = [0, 0, 53, 53, 53, 106, 106, 159, 212]
    a, raised = feed(*[[info(i * SEC, err=e)] for i, e in enumerate(errs)])
    assert [(r["alert"], r["pages"], r["count"], r["evidence"], r["ts"]) for r in raised] == \
        [("release_stuck", 53, 2, "counters", 5 * SEC + 1)]
    assert [(s["pages"], s["count"], s["last_ts"]) for s in a.snapshot()] == [(53, 4, 8 * SEC + 1)]


def test_counters_alone_need_the_same_rise_twice():
    a, _ = feed(*[[info(i * SEC, err=e)] for i, e in enumerate([0, 53, 60, 100, 101])])
    assert a.snapshot() == []


def test_counters_rule_stays_quiet_when_release_events_tell_more():
    a, _ = feed([scan(1), failed(1, 0x1000), info(5 * SEC, err=53)],
                [scan(2), failed(2, 0x2000), info(10 * SEC, err=106)],
                [scan(3), failed(3, 0x3000), info(15 * SEC, err=159)])
    assert a.snapshot() == []  # different pages each cycle: not stuck; events win over counters


# --- worker_stalled and worker_gone -------------------------------------------------------------

def test_worker_stalled_after_three_snapshots_of_finding_without_serving():
    seq = [(100, 100), (100, 100), (153, 100), (153, 100), (206, 100), (259, 100), (312, 100)]
    a, raised = feed(*[[info(i * SEC, find=f, out=o)] for i, (f, o) in enumerate(seq)])
    assert [(r["alert"], r["pages"], r["count"], r["ts"]) for r in raised] == \
        [("worker_stalled", 159, 3, 5 * SEC + 1)]
    assert raised[0]["message"] == MESSAGES["worker_stalled"]
    assert [(s["pages"], s["count"]) for s in a.snapshot()] == [(212, 4)]


def test_a_worker_that_serves_is_not_stalled():
    seq = [(0, 0), (50, 0), (100, 0), (100, 100), (150, 100), (200, 100), (200, 200)]
    a, _ = feed(*[[info(i * SEC, find=f, out=o)] for i, (f, o) in enumerate(seq)])
    assert a.snapshot() == []


def test_worker_gone_is_raised_once_with_the_snapshots_it_stayed_gone():
    every = ("spthrd_1", "spthrd_divide", "spdeamon")
    a, raised = feed([workers(0, *every)], [workers(SEC, *every)],
                     [workers(2 * SEC, "spthrd_divide", "spdeamon")],
                     [workers(3 * SEC, "spthrd_divide", "spdeamon")],
                     [workers(4 * SEC, "spthrd_divide", "spdeamon")])
    assert [(r["alert"], r["worker"], r["count"], r["ts"]) for r in raised] == \
        [("worker_gone", "spthrd_1", 1, 2 * SEC + 1)]
    assert [(s["worker"], s["count"], s["last_ts"]) for s in a.snapshot()] == \
        [("spthrd_1", 3, 4 * SEC + 1)]


def test_alert_records_read_back_are_not_counted_twice():
    batches = [[scan(k), failed(k, 0x1000)] for k in range(1, 5)]
    _, raised = feed(*batches)
    logged = list(batches)
    logged[1] = interleave(batches[1], raised)  # what `record` wrote: the alert after cycle 2
    a, again = feed(*logged)
    assert again == raised and len(a.snapshot()) == 1 and a.snapshot()[0]["count"] == 4


def test_interleave_puts_alerts_in_time_order_before_equal_timestamps():
    recs = [{"kind": "merge", "ts": t, "src": "x"} for t in (1, 5, 9)]
    al = [{"kind": "alert", "ts": 5, "src": "x"}, {"kind": "alert", "ts": 10, "src": "x"}]
    assert [(r["kind"], r["ts"]) for r in interleave(recs, al)] == \
        [("merge", 1), ("alert", 5), ("merge", 5), ("merge", 9), ("alert", 10)]


# --- the emulator: pin and crash_worker ---------------------------------------------------------

PIN = """
dialect = "virt_release"
scan_period = 5000
duration = 40
[[vm]]
name = "vm1"
pages = 4096
[[step]]
at = 1
vm = "vm1"
action = "free"
count = 1000
[[step]]
at = 1
vm = "vm1"
action = "pin"
start = 2000
count = 53
"""


def test_pinned_pages_fail_every_base_cycle_and_err_grows_by_53_each_time():
    r = run(scenario(PIN))
    err = [r.at(k * 5 + 0.5)[ERR] for k in range(1, 9)]
    assert err == [53 * k for k in range(1, 9)]  # cycles at 5, 10, ..., 40 s
    released = [x for x in r.of("reclaim_release") if x.get("status") == "released"]
    assert sum(x["pages"] for x in released) == 1000 and r.last["virt page merge count"] == 1000
    fails = r.of("reclaim_release")
    fails = [x for x in fails if x["status"] == "failed"]
    assert [(x["ts"] // SEC, x["pages"], x["addr"]) for x in fails] == \
        [(5 * k, 53, 2000 * 4096) for k in range(1, 9)]
    assert len({x["pfn"] for x in fails}) == 1  # the same pages every time
    assert r.last["page recycle count"] == 1000
    assert r.last[FIND] == r.last[OUT] == 1000 + 8 * 53 + r.last["slice que change watch cnt"]
    assert r.last["slice que change watch cnt"] == r.last[FIND] - 1000 - 8 * 53  # no bad slots
    alerts = Alerts()
    for b in [r.records]:
        alerts.feed(b)
    (a,) = alerts.snapshot()
    assert (a["alert"], a["pages"], a["count"], a["first_ts"] // SEC) == ("release_stuck", 53, 8, 10)


def test_a_write_ends_a_pin():
    r = run(scenario(PIN + '[[step]]\nat = 12\nvm = "vm1"\naction = "write"\nstart = 2000\n'
                           'count = 53\n'))
    assert [r.at(k * 5 + 0.5)[ERR] for k in range(1, 5)] == [53, 106, 106, 106]


CRASH = """
dialect = "virt_release"
scan_period = 5000
duration = 45
[[vm]]
name = "vm1"
pages = 4096
[[step]]
at = 1
vm = "vm1"
action = "pin"
count = 53
[[step]]
at = 17
action = "crash_worker"
[[step]]
at = 18
vm = "vm1"
action = "write"
start = 1000
count = 100
pattern = "identical"
"""


def test_a_crashed_worker_serves_nothing_while_the_daemon_keeps_finding():
    r = run(scenario(CRASH))
    before = r.at(16)
    assert before[ERR] == 3 * 53 and before[FIND] == before[OUT] == 3 * 53
    assert [w["values"] for w in r.counters("workers")][0] == THREADS
    gone = next(w for w in r.counters("workers") if "spthrd_1" not in w["values"])
    assert gone["ts"] // SEC == 17 and gone["values"] == {"spthrd_divide": 98, "spdeamon": 99}
    # cycles at 20..45 s: the 53 pinned pages are found again each cycle, the 100 written at
    # 18 s are aged at 20 s and found at every merge scan from 25 s on; nothing is served
    finds = [r.at(k * 5 + 0.5)[FIND] for k in range(3, 10)]
    assert finds == [159, 159 + 53] + [159 + 53 * (k - 3) + 100 * (k - 4) for k in range(5, 10)]
    assert {r.at(k * 5 + 0.5)[OUT] for k in range(3, 10)} == {159}
    assert {r.at(k * 5 + 0.5)[ERR] for k in range(3, 10)} == {159}
    assert not r.of("merge") and [x["ts"] // SEC for x in r.of("reclaim_release")] == [5, 10, 15]
    alerts = Alerts()
    alerts.feed(r.records)
    got = {(a["alert"], a.get("worker")): a for a in alerts.snapshot()}
    assert set(got) == {("release_stuck", None), ("worker_gone", "spthrd_1"),
                        ("worker_stalled", None)}
    assert got[("worker_stalled", None)]["first_ts"] // SEC == 30  # 3rd stalled cycle: 20, 25, 30 s


@pytest.mark.parametrize("step, message", [
    ('action = "crash_worker"\nworker = "spdeamon"', "step[0].worker: unknown worker 'spdeamon'"),
    ('action = "crash_worker"\nvm = "vm1"', "step[0].vm: not a field of action 'crash_worker'"),
    ('action = "pin"\nvm = "vm1"\nfail = 0.5', "step[0].fail: not a field of action 'pin'"),
    ('action = "pin"\nvm = "vm1"\npattern = "zero"', "step[0].pattern: not a field of action 'pin'"),
    ('action = "free"\nvm = "vm1"\nworker = "spthrd_1"', "step[0].worker: not a field of action 'free'"),
    ('action = "pin"', "step[0].vm: missing (required)"),
])
def test_scenario_validation_of_the_new_actions(step, message):
    with pytest.raises(ScenarioError) as e:
        scenario(f'[[vm]]\nname = "vm1"\npages = 64\n[[step]]\nat = 1\n{step}\n')
    assert message in str(e.value)


# --- the shipped scenario, through the command line ----------------------------------------------

def test_failures_scenario_through_record_and_report_json(tmp_path):
    log = tmp_path / "failures.jsonl"
    r = cli(["emulate", "--scenario", "failures", "-o", log])
    assert r.code == 0
    assert [line.split(" (")[0] for line in r.err.splitlines() if " alert " in line] == \
        ["dynvm-trace: warning: alert release_stuck", "dynvm-trace: warning: alert worker_gone",
         "dynvm-trace: warning: alert worker_stalled"]
    logged = [rec for b in LogReader(log).batches() for rec in b if rec["kind"] == "alert"]
    assert [(a["alert"], a["ts"]) for a in logged] == [
        ("release_stuck", 30 * SEC + 2), ("worker_gone", 52 * SEC + 1),
        ("worker_stalled", 65 * SEC + 2)]
    data = json.loads(cli(["report", log, "--json"]).out)
    got = [(a["alert"], a.get("vm"), a.get("worker"), a.get("pages"), a["count"], a["evidence"])
           for a in data["alerts"]]
    # 53 pinned pages failed in the 6 cycles at 25..50 s (the worker died at 52 s); spthrd_1 was
    # missing from 29 workers snapshots (52..80 s, one per second, and the split batches);
    # the daemon found 20,798 queue entries nobody served in the 6 stalled cycles at 55..80 s
    assert got == [("release_stuck", "vm1", None, 53, 6, "events"),
                   ("worker_gone", None, "spthrd_1", None, 29, "workers"),
                   ("worker_stalled", None, None, 20_798, 6, "counters")]
    assert data["alerts"][0]["pfns"] == [0x12000]
    assert data["correlation"]["verdict"] == "agrees" and data["warnings"] == []
    assert data["totals"]["events"]["alert"] == 3  # the log carries them
    assert data["totals"]["release"]["failed"] == 6 * 53
    text = cli(["report", log]).out
    assert "ALERTS (failures of the kernel itself)\n- release_stuck (vm1): 53 pages" in text


def test_report_of_a_stream_without_failures_says_none():
    s = summarize((make_header("emulate", "emulated", 4096, anchor_ts=0), [[scan(1)]]))
    assert s["alerts"] == []
    assert "ALERTS (failures of the kernel itself): none" in render_text(s)


def test_counters_only_log_raises_release_stuck_from_counters(tmp_path):
    """The failures run without its events (as an imported recording would be)."""
    r = run("failures")
    only = [x for x in r.records if x["kind"] == "counters" and x["group"] == "pone_info"]
    header = make_header("pone", "uptime", 4096, anchor_ts=0) | {"counters_only": True}
    s = summarize((header, [only]))
    got = [(a["alert"], a.get("pages"), a["count"], a["evidence"]) for a in s["alerts"]]
    assert got == [("release_stuck", 53, 6, "counters"), ("worker_stalled", 20_798, 6, "counters")]


# --- /proc: the pone threads --------------------------------------------------------------------

def _proc(root: Path, pid: int, comm: str, state: str = "S", flags: int = PF_KTHREAD | 0x40):
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "stat").write_text(
        f"{pid} ({comm}) {state} 2 0 0 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 30 0 0\n")


def test_list_pone_threads_under_a_proc_root(tmp_path):
    _proc(tmp_path, 2, "kthreadd")
    _proc(tmp_path, 99, "spdeamon", "D")
    _proc(tmp_path, 98, "spthrd_divide")
    _proc(tmp_path, 97, "spthrd_1")
    _proc(tmp_path, 120, "spthrd_11")
    _proc(tmp_path, 110, "spthrd_3", "R")
    _proc(tmp_path, 4000, "spthrd_5", flags=0x400100)  # a user process named like one
    _proc(tmp_path, 4001, "qemu-system-x86", flags=0)
    (tmp_path / "self").mkdir()
    (tmp_path / "4002").mkdir()  # exited while listed: no stat
    got = list_pone_threads(tmp_path)
    assert got == [PoneThread("spthrd_1", 97, "S"), PoneThread("spthrd_3", 110, "R"),
                   PoneThread("spthrd_11", 120, "S"), PoneThread("spthrd_divide", 98, "S"),
                   PoneThread("spdeamon", 99, "D")]
    assert [t.is_worker for t in got] == [True, True, True, False, False]
    assert workers_values(got) == {"spthrd_1": 97, "spthrd_3": 110, "spthrd_11": 120,
                                   "spthrd_divide": 98, "spdeamon": 99}
    rec = workers_record(5, "pone", got)
    assert rec["group"] == "workers" and problems(rec) == []
    assert list_pone_threads(tmp_path / "missing") == []


def test_parse_stat_takes_the_comm_up_to_the_last_parenthesis():
    assert parse_stat("7 (a (b) c) S 2 0 0 0 -1 2097216 0") == ("a (b) c", "S", 2097216)
    assert parse_stat("garbage") is None and parse_stat("7 (x) S 2") is None
