"""The emulated pone host: exact counts, counter/event invariants, knobs, the sysfs tree,
determinism and scenario validation. Small scenarios: each test runs in well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynvm_trace import pone_sysfs
from dynvm_trace.emulator import model
from dynvm_trace.emulator.scenario import (ScenarioError, list_scenarios, load_scenario,
                                           loads_scenario, scale_scenario)
from dynvm_trace.events import problems
from dynvm_trace.paths import Roots
from dynvm_trace.sources.emulate import BATCH_LIMIT, EmulateSource
from emulator_helpers import SEC, Run, run, scenario

PRIMES = """
scan_period = 5000
duration = 100
[[vm]]
name = "vm1"
pages = 16384
[[step]]
at = 1
vm = "vm1"
action = "fill"
count = 4099
pattern = "identical"
value = "a"
[[step]]
at = 1
vm = "vm1"
action = "fill"
start = 8192
count = 512
pattern = "unique"
[[step]]
at = 30
vm = "vm1"
action = "write"
start = 100
count = 1031
pattern = "unique"
[[step]]
at = 50
vm = "vm1"
action = "free"
start = 8192
count = 257
[[step]]
at = 70
vm = "vm1"
action = "touch"
start = 8192
count = 127
[[step]]
at = 90
vm = "vm1"
action = "exit"
"""


def check_invariants(r: Run) -> None:
    """At every counters record, the counters the correlation uses equal what the events
    emitted up to it add up to."""
    merges = cows = unmerges = released = failed = refaulted = exited = 0
    last_ts = -1
    for rec in r.records:
        assert not problems(rec), (rec, problems(rec))
        assert rec["ts"] >= last_ts
        last_ts = rec["ts"]
        k = rec["kind"]
        if k == "merge":
            merges += 1
        elif k == "cow_break":
            cows += 1
        elif k == "unmerge":
            unmerges += 1
        elif k == "reclaim_release":
            if rec.get("status", "released") == "released":
                released += rec["pages"]
            else:
                failed += rec["pages"]
        elif k == "reclaim_refault":
            refaulted += rec["pages"]
        elif k == "vm_exit":
            exited += rec["released"]
        elif k == "counters" and rec["group"] == "pone_info":
            v = rec["values"]
            assert v["slice merge cnt"] == merges
            assert v["delete merge page cnt"] == cows + unmerges
            assert v["virt page merge count"] == released
            assert v["virt page merge count err"] == failed
            assert v["page recycle count"] == released - refaulted - exited
            assert v["insert sd tree ok cnt"] == v["slice merge cnt"] + v["slice new insert cnt"]
        elif k == "counters" and rec["group"] == "pone_abstract":
            assert rec["values"] == {"page merge count": merges - cows - unmerges,
                                     "page reclaim count": released - refaulted - exited}


@pytest.fixture(scope="module")
def primes() -> Run:
    return run(scenario(PRIMES))


def test_prime_counts(primes):
    r = primes
    check_invariants(r)
    assert len([m for m in r.of("merge") if m["ts"] < 30 * SEC]) == 4098
    assert r.at(29)["slice new insert cnt"] == 1 + 512
    assert len(r.of("cow_break")) == 1031
    assert r.at(49)["delete merge page cnt"] == 1031
    assert sum(x["pages"] for x in r.of("reclaim_release")) == 257
    assert r.of("reclaim_release")[0]["addr"] == 8192 * 4096  # one record per contiguous run
    assert [x["pages"] for x in r.of("reclaim_report")] == [257]
    assert r.at(69)["page recycle count"] == 257
    assert sum(x["pages"] for x in r.of("reclaim_refault")) == 127
    assert r.at(89)["page recycle count"] == 130
    # + 257: the guest's free mark is a write, and those pages were (unique) tree pages
    assert r.at(89)["slice alloc cnt"] == 4099 + 512 + 1031 + 257 + 127
    assert r.last["page recycle count"] == 0  # the exit dropped the 130 still released
    assert r.of("vm_exit")[0]["released"] == 130
    assert r.last["delete sd tree ok cnt"] == r.last["insert sd tree ok cnt"]
    assert r.last["delete merge page cnt"] == r.last["slice merge cnt"]


def test_pipeline_counters_at_each_stage():
    """New page: tracked at once; write-protected at the merge scan after a whole cycle
    unwritten; inserted at the next merge scan (run1's timing)."""
    r = run(scenario(PRIMES))
    assert r.at(2)["slice alloc cnt"] == 4611 and r.at(2)["slice change volatile ok cnt"] == 4611
    assert r.at(9.9)["slice que change watch cnt"] == 0  # aged at 5 s
    w = r.at(10.5)
    assert w["slice que change watch cnt"] == w["slice deamon find volatile cnt"] == \
        w["slice out que cnt"] == 4611
    assert w["slice merge cnt"] == 0 and w["slice deamon fine watch cnt"] == 0
    m = r.at(15.5)
    assert m["slice merge cnt"] == 4098
    assert m["slice deamon fine watch cnt"] == m["slice out watch que cnt"] == 4611


def test_cow_of_whole_group_and_sole_member():
    text = """
scan_period = 5000
duration = 40
[[vm]]
name = "a"
pages = 64
[[step]]
at = 1
vm = "a"
action = "fill"
count = 10
pattern = "identical"
[[step]]
at = 1
vm = "a"
action = "fill"
start = 10
count = 1
pattern = "unique"
[[step]]
at = 20
vm = "a"
action = "write"
count = 11
pattern = "unique"
"""
    r = run(scenario(text))
    check_invariants(r)
    v = r.at(21)
    # 10 pages in one group: 9 COW breaks, then the last is the sole member; plus the unique one
    assert len(r.of("cow_break")) == 9
    assert v["delete merge page cnt"] == 9 and v["delete sd tree ok cnt"] == 11
    assert v["slice pre fix check cnt"] == 11
    assert v["slice alloc cnt"] == 11 + 11


def test_write_to_write_protected_page_makes_it_volatile_again():
    text = """
scan_period = 5000
duration = 40
[[vm]]
name = "a"
pages = 64
[[step]]
at = 1
vm = "a"
action = "fill"
count = 8
pattern = "identical"
[[step]]
at = 12
vm = "a"
action = "write"
count = 4
pattern = "increment"
"""
    r = run(scenario(text))
    check_invariants(r)
    assert r.at(12)["slice mem watch reuse cnt"] == 4
    assert r.at(16)["slice merge cnt"] == 3  # the 4 untouched ones, at 15 s
    assert r.at(26)["slice merge cnt"] == 3 + 3  # the written ones: aged 15, wp 20, in 25


def test_non_qemu_comm_is_ignored():
    text = """
scan_period = 5000
duration = 30
[[vm]]
name = "py"
comm = "python3"
pages = 1024
[[vm]]
name = "q"
comm = "qemu-system-x86_64"
pages = 1024
[[step]]
at = 1
vm = "py"
action = "fill"
pattern = "identical"
[[step]]
at = 1
vm = "q"
action = "fill"
pattern = "identical"
[[step]]
at = 20
vm = "py"
action = "free"
count = 100
"""
    r = run(scenario(text))
    assert not [x for x in r.records if "vm" in x]
    assert all(v == 0 for k, v in r.last.items() if k != "deamon task state")
    assert {x["kind"] for x in r.records} == {"counters", "scan_start", "scan_end"}


def test_determinism():
    sc = load_scenario("sampled", page_size=4096)
    a = run(sc, seed=7).records
    b = run(sc, seed=7).records
    c = run(sc, seed=8).records
    assert a == b
    assert a != c


def test_scan_period_rule():
    text = PRIMES.replace("scan_period = 5000", "scan_period = 20000")
    r = run(scenario(text))
    starts = r.of("scan_start")
    assert [s["seq"] for s in starts if s["merge_scan"]] == [4, 8, 12, 16, 20]
    assert [s["ts"] // SEC for s in starts if s["merge_scan"]] == [20, 40, 60, 80, 100]
    # aged at 5 s, write-protected at 20 s, merged at 40 s; but 1,031 of them were written at
    # 30 s (write-protected, not yet inserted: volatile again, inserted at 60 s as unique)
    assert r.at(39)["slice merge cnt"] == 0 and r.at(40.5)["slice merge cnt"] == 4098 - 1031
    assert r.at(40.5)["slice mem watch reuse cnt"] == 1031
    assert r.at(59)["slice new insert cnt"] == 1 + 512
    assert r.at(60.5)["slice new insert cnt"] == 1 + 512 + 1031
    # below 5000: clamped; 12000 // 5000 = every 2nd cycle
    r = run(scenario(PRIMES.replace("scan_period = 5000", "scan_period = 12000")))
    assert [s["seq"] for s in r.of("scan_start") if s["merge_scan"]][:3] == [2, 4, 6]


def test_pone_run_0_written_into_the_tree_stops_merging(tmp_path):
    src = EmulateSource(scenario(PRIMES), seed=1, sysfs_root=tmp_path, dialect="virt_release")
    pone = tmp_path / "kernel" / "mm" / "pone"
    recs = []
    for b in src.batches(SEC, None):
        recs += b.records
        if b.now == 3 * SEC:  # after the fill, before the first merge scan that wp's them
            (pone / "pone_run").write_text("0")
            (pone / "pone_deamon_scan_period").write_text("3000")  # clamped to 5000
    assert not [r for r in recs if r["kind"] in ("merge", "scan_start")]
    assert (pone / "pone_run").read_text() == "0"  # obeyed, not overwritten
    assert (pone / "pone_deamon_scan_period").read_text() == "5000"
    last = [r for r in recs if r["kind"] == "counters"][-1]["values"]
    assert last["slice alloc cnt"] == 4099 + 512  # tracked before pone_run went to 0
    assert last["slice merge cnt"] == 0 and last["slice que change watch cnt"] == 0
    # the writes made while pone_run is 0 are not tracked (no alloc), the free is not released
    assert last["virt page merge count"] == 0


def test_scan_period_written_into_the_tree_takes_effect(tmp_path):
    src = EmulateSource(scenario(PRIMES), seed=1, sysfs_root=tmp_path, dialect="guide")
    pone = tmp_path / "kernel" / "mm" / "pone"
    recs = []
    for b in src.batches(SEC, None):
        recs += b.records
        if b.now == 2 * SEC:
            (pone / "pone_daemon_scan_period").write_text("20000\n")
    assert [s["seq"] for s in recs if s["kind"] == "scan_start" and s["merge_scan"]] == \
        [4, 8, 12, 16, 20]


@pytest.mark.parametrize("dialect", ["guide", "virt_release"])
def test_emulated_tree_parses_back(tmp_path, dialect):
    r = run(scenario(PRIMES.replace("duration = 100", "duration = 85")), sysfs_root=tmp_path,
            dialect=dialect)
    check_invariants(r)
    snap = pone_sysfs.read_pone(Roots(sysfs=tmp_path))
    assert snap.dialect == dialect
    assert not snap.reasons
    assert snap.info == r.last
    assert snap.info["page recycle count"] == 130
    if dialect == "guide":
        assert snap.abstract == r.counters("pone_abstract")[-1]["values"]
        assert snap.knobs["pone_daemon_scan_period"] == 5000
    else:
        assert snap.knobs == {"pone_run": 1, "pone_recycle_run": 1,
                              "pone_deamon_scan_period": 5000, "pone_divide_thread_enable": 1}
        assert (tmp_path / "kernel/mm/pone/pone_info").read_bytes().endswith(b"\r\n")
    assert not list((tmp_path / "kernel/mm/pone").glob(".*"))  # no temporary files left


def test_failed_releases_and_merged_pages_freed():
    text = """
scan_period = 5000
duration = 60
[[vm]]
name = "a"
pages = 20000
[[step]]
at = 1
vm = "a"
action = "fill"
count = 10000
pattern = "identical"
[[step]]
at = 21
vm = "a"
action = "free"
count = 10000
fail = 0.1
"""
    r = run(scenario(text), seed=3)
    check_invariants(r)
    v = r.at(26)
    # merged pages are COW-broken by the guest's mark (9,999 of the 10,000 are sharers)
    assert len(r.of("cow_break")) == 9999
    assert v["virt page merge count"] + v["virt page merge count err"] == 10000
    assert 800 < v["virt page merge count err"] < 1200
    assert v["slice que change watch cnt"] == 10000 + v["virt page merge count err"]
    # the failed ones went on to the merge path (write-protected at the release, 25 s):
    # unique marks -> inserted at the next merge scan (30 s), not in the release's own scan
    assert r.at(29)["slice new insert cnt"] == 1
    assert r.at(31)["slice new insert cnt"] == 1 + v["virt page merge count err"]
    assert r.last["slice new insert cnt"] == 1 + v["virt page merge count err"]


def test_batches_are_bounded_and_counters_end_each_batch():
    text = """
scan_period = 5000
duration = 20
[[vm]]
name = "a"
pages = 200000
[[step]]
at = 1
vm = "a"
action = "fill"
pattern = "identical"
"""
    r = run(scenario(text), interval_s=5)
    check_invariants(r)
    assert len(r.of("merge")) == 199999
    assert max(n for _, n in r.batches) <= BATCH_LIMIT + 3
    split = [now for now, _ in r.batches if now == 15 * SEC]
    assert len(split) >= 4  # one merge scan split over several batches with the same now
    # every batch ends with its counters (workers, pone_info, then pone_abstract for the guide)
    i = 0
    for _, n in r.batches:
        assert r.records[i + n - 3]["group"] == "workers"
        assert r.records[i + n - 2]["group"] == "pone_info"
        assert r.records[i + n - 1]["group"] == "pone_abstract"
        i += n


def test_labels_agree_with_pone_sysfs():
    assert model.PONE_INFO_KEYS == pone_sysfs.PONE_INFO_KEYS


def test_header():
    h = EmulateSource("run1").header()
    assert h["source"] == "emulate" and h["clock"] == "emulated"
    assert h["scenario"] == "run1" and h["seed"] == 1 and h["dialect"] == "virt_release"
    assert h["wall_anchor"]["ts"] == 0


def test_speed_paces_against_the_wall_clock(monkeypatch):
    """At speed 2, batch k (k x 100 ms of source time) is due k x 50 ms after the start."""
    from dynvm_trace.sources import pacing
    clock = [1000.0]
    waits = []

    class Stop:
        def wait(self, seconds):  # what threading.Event.wait does for the pacer: time passes
            waits.append(round(seconds, 6))
            clock[0] += seconds

        def is_set(self):
            return False

    real_pacer = pacing.Pacer
    monkeypatch.setattr("dynvm_trace.sources.emulate.Pacer",
                        lambda speed, stop, origin_ts: real_pacer(speed, Stop(), origin_ts,
                                                                  clock=lambda: clock[0]))
    src = EmulateSource(scenario(PRIMES.replace("duration = 100", "duration = 0.3")), speed=2.0)
    nows = [b.now for b in src.batches(SEC // 10, None)]
    assert nows == [100_000_000, 200_000_000, 300_000_000]
    assert waits == [0.05, 0.05, 0.05]


def test_shipped_scenarios_load():
    listed = dict(list_scenarios())
    for n in ("run1", "tmpfs-random", "sampled", "reclaim", "demo", "scale64"):
        assert listed[n]
    for n in listed:
        if n.startswith("scale"):
            continue
        sc = load_scenario(n)
        assert sc.vms and sc.duration > 0
    big = scale_scenario(64, 4 << 30, page_size=4096)
    assert big.total_pages == 64 * (1 << 20)
    assert load_scenario("scale64", page_size=4096).total_pages == big.total_pages


BAD = [
    ("missing field", PRIMES.replace('action = "exit"', ""), "step[5].action"),
    ("wrong type", PRIMES.replace("pages = 16384", 'pages = "many"'), "vm[0].pages"),
    ("unknown action", PRIMES.replace('action = "touch"', 'action = "tuch"'), "step[4].action"),
    ("negative size", PRIMES.replace("count = 257", "count = -257"), "step[3].count"),
    ("negative memory", PRIMES.replace("pages = 16384", 'memory = "-1GiB"'), "vm[0].memory"),
    ("unknown vm", PRIMES.replace('vm = "vm1"\naction = "free"', 'vm = "vm9"\naction = "free"'),
     "step[3].vm"),
    ("outside RAM", PRIMES.replace("start = 8192\ncount = 257", "start = 16380\ncount = 257"),
     "step[3].count"),
    ("unknown field", PRIMES.replace("duration = 100", "duration = 100\nspeed = 2"), "speed"),
    ("no vm", "duration = 10\n", "vm"),
    ("bad pattern", PRIMES.replace('pattern = "identical"', 'pattern = "same"'), "step[0].pattern"),
    ("bad dialect", 'dialect = "early"\n' + PRIMES, "dialect"),
]


@pytest.mark.parametrize("what,text,field", BAD, ids=[b[0] for b in BAD])
def test_bad_scenario_names_file_and_field(tmp_path: Path, what, text, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as e:
        load_scenario(path, page_size=4096)
    assert e.value.field == field
    assert str(e.value).startswith(f"{path}: {field}: ")


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ScenarioError, match="not valid TOML"):
        loads_scenario("[[vm]\n", where="x.toml")
    with pytest.raises(ScenarioError, match="no such scenario"):
        load_scenario(tmp_path / "nope.toml")
