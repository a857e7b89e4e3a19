"""Aggregators on synthetic event lists, with exact expected numbers."""

from __future__ import annotations

import json

import pytest

from dynvm_trace.aggregators import Aggregates, LastCounters, PerVM, Rates, Totals
from dynvm_trace.events import event
from dynvm_trace.lifetimes import Lifetimes, bucket, bucket_range

SEC = 1_000_000_000
PID = 4242


def merges_and_breaks() -> list[dict]:
    """4099 merges (1 ns apart), then 1031 COW breaks of the first 1031 with lifetimes
    2^b or 2^(b+1) - 1 for b = j % 31 (both ends of bucket b), plus unmatched noise."""
    recs = [event("merge", 1_000 + i, "emulate", pid=PID, addr=i << 12) for i in range(4099)]
    for j in range(1031):
        b = j % 31
        lifetime = (1 << b) if j % 2 == 0 else (2 << b) - 1
        recs.append(event("cow_break", 1_000 + j + lifetime, "emulate", pid=PID, addr=j << 12))
    # unmatched: never merged (5), no address (2), another pid (1), unmerged first (1)
    base = 1 << 40
    recs += [event("cow_break", base + i, "emulate", pid=PID, addr=(10_000 + i) << 12)
             for i in range(5)]
    recs += [event("cow_break", base + 10 + i, "emulate", pid=PID) for i in range(2)]
    recs.append(event("cow_break", base + 20, "emulate", pid=PID + 1, addr=2000 << 12))
    recs.append(event("unmerge", base + 30, "emulate", pid=PID, addr=2001 << 12, reason="unmap"))
    recs.append(event("cow_break", base + 31, "emulate", pid=PID, addr=2001 << 12))
    recs.sort(key=lambda r: r["ts"])
    return recs


def test_bucket_edges():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == [0, 0, 1, 1, 2, 2, 3, 9, 10]
    assert bucket_range(0) == (0, 1)
    assert bucket_range(10) == (1024, 2047)


def test_lifetime_histogram_exact():
    lt = Lifetimes()
    lt.feed(merges_and_breaks())
    snap = lt.snapshot()
    # 1031 = 31 * 33 + 8: buckets 0..7 get 34 breaks, 8..30 get 33
    assert snap["buckets"] == {str(b): 34 if b < 8 else 33 for b in range(31)}
    assert snap["matched"] == 1031
    assert snap["unmatched"] == 9
    assert snap["open"] == 4099 - 1031 - 1
    lifetimes = [(1 << (j % 31)) if j % 2 == 0 else (2 << (j % 31)) - 1 for j in range(1031)]
    assert snap["mean_ns"] == sum(lifetimes) // 1031


def test_lifetime_keyed_by_vm_without_pid_and_latest_merge_wins():
    lt = Lifetimes()
    lt.feed([event("merge", 100, "e", vm="a", addr=1), event("merge", 200, "e", vm="a", addr=1),
             event("merge", 100, "e", vm="b", addr=1),
             event("cow_break", 264, "e", vm="a", addr=1)])
    assert lt.snapshot()["buckets"] == {"6": 1}  # 64 ns after the second merge
    assert lt.snapshot()["open"] == 1


def test_totals_counts_pages_status_and_lost():
    t = Totals()
    t.feed([
        event("merge", 1, "e"), event("merge", 2, "e"), event("cow_break", 3, "e"),
        event("reclaim_report", 4, "e", pages=64),
        event("reclaim_release", 5, "e", pages=10),  # no status: released
        event("reclaim_release", 6, "e", pages=7, status="released"),
        event("reclaim_release", 7, "e", pages=3, status="retry"),
        event("reclaim_release", 8, "e", pages=2, status="failed"),
        event("reclaim_refault", 9, "e", pages=5),
        event("lost", 10, "e", count=11, where="perf", why="full"),
        event("lost", 11, "e", count=4, where="perf", why="full"),
    ])
    snap = t.snapshot()
    assert snap["events"] == {"cow_break": 1, "lost": 2, "merge": 2, "reclaim_refault": 1,
                              "reclaim_release": 4, "reclaim_report": 1}
    assert snap["pages"] == {"reclaim_report": 64, "reclaim_release": 22, "reclaim_refault": 5}
    assert snap["release"] == {"released": 17, "retry": 3, "failed": 2}
    assert snap["lost"] == 15


def test_per_vm_keys_and_bytes_use_the_page_size():
    v = PerVM(page_size=16384)
    recs = [event("merge", i, "e", vm="web", pid=1) for i in range(7)]
    recs += [event("cow_break", 10, "e", vm="web", pid=1), event("unmerge", 11, "e", vm="web",
                                                                 reason="exit")]
    recs += [event("merge", 12, "e", pid=77), event("merge_fail", 13, "e", pid=77, reason="lock")]
    recs += [event("reclaim_release", 14, "e", pages=100),
             event("reclaim_release", 15, "e", pages=9, status="failed"),
             event("reclaim_refault", 16, "e", pages=30)]
    v.feed(recs)
    rows = {r["vm"]: r for r in v.table()}
    assert list(rows) == ["web", "pid 77", "host"]  # by memory saved
    assert rows["web"] == {"vm": "web", "merges": 7, "cow_breaks": 1, "unmerges": 1,
                           "merge_fails": 0, "released": 0, "refaulted": 0,
                           "merged_at_exit": 0, "released_at_exit": 0, "shared_pages": 5,
                           "saved_bytes": 5 * 16384, "reclaimed_pages": 0, "reclaimed_bytes": 0}
    assert rows["pid 77"]["merge_fails"] == 1 and rows["pid 77"]["saved_bytes"] == 16384
    assert rows["host"]["released"] == 100
    assert rows["host"]["reclaimed_bytes"] == 70 * 16384


def test_per_vm_counts_what_an_exit_took_away():
    v = PerVM(4096)
    v.feed([*[event("merge", i, "e", pid=9) for i in range(10)],
            event("cow_break", 20, "e", pid=9),
            event("reclaim_release", 21, "e", pid=9, pages=5),
            event("vm_exit", 30, "e", pid=9, merged=9, released=5)])
    (row,) = v.table()
    assert (row["shared_pages"], row["reclaimed_pages"]) == (0, 0)
    assert (row["merged_at_exit"], row["released_at_exit"]) == (9, 5)


def test_rates_per_interval():
    r = Rates(interval_ns=SEC // 2, t0=0)
    r.feed([event("merge", i * 1000, "e") for i in range(300)]
           + [event("reclaim_release", 1000, "e", pages=50)])
    assert r.last() is None  # interval 0 still open
    r.feed([event("merge", SEC // 2 + 1, "e")])
    last = r.last()
    assert (last["index"], last["start_ns"], last["end_ns"]) == (0, 0, SEC // 2)
    assert last["events"] == {"merge": 300, "reclaim_release": 1}
    assert last["events_per_s"] == {"merge": 600.0, "reclaim_release": 2.0}
    assert last["pages_per_s"]["merge"] == 600.0
    assert last["pages_per_s"]["reclaim_release"] == 100.0
    assert last["pages_per_s"]["cow_break"] == 0.0
    r.advance(3 * SEC)  # intervals 2..5 passed with nothing
    assert r.last()["index"] == 5 and r.last()["events"] == {}


def test_last_counters_per_group_and_per_pid():
    c = LastCounters()
    c.feed([event("counters", 1, "k", group="ksm", values={"pages_sharing": 1}),
            event("counters", 2, "k", group="ksm", values={"pages_sharing": 9}),
            event("counters", 2, "k", group="ksm_stat", pid=30, values={"ksm_merging_pages": 4}),
            event("counters", 2, "k", group="ksm_stat", pid=4, values={"ksm_merging_pages": 2})])
    assert c.snapshot() == {"ksm": {"pages_sharing": 9},
                            "ksm_stat": {"4": {"ksm_merging_pages": 2},
                                         "30": {"ksm_merging_pages": 4}}}


@pytest.mark.parametrize("size", [1, 7, 1000, 100_000])
def test_batch_boundaries_do_not_change_the_result(size):
    recs = merges_and_breaks()
    recs.insert(500, event("counters", recs[499]["ts"], "e", group="pone_info",
                           values={"slice merge cnt": 0}))
    merged_after = sum(r["kind"] == "merge" for r in recs[501:])
    recs.append(event("counters", recs[-1]["ts"], "e", group="pone_info",
                      values={"slice merge cnt": merged_after}))
    whole = Aggregates(page_size=4096, interval_ns=SEC)
    whole.feed(recs)
    split = Aggregates(page_size=4096, interval_ns=SEC)
    split.feed_all(recs[i:i + size] for i in range(0, len(recs), size))
    assert split.snapshot() == whole.snapshot()
    assert whole.snapshot()["correlation"]["verdict"] == "agrees"


def test_snapshot_is_json_and_has_its_keys():
    agg = Aggregates(page_size=4096)
    agg.feed(merges_and_breaks())
    snap = json.loads(json.dumps(agg.snapshot()))
    assert set(snap) == {"page_size", "span", "totals", "vms", "rates", "lifetimes", "counters",
                         "correlation"}
    assert snap["span"]["first_ts"] == 1000
    assert snap["vms"][0]["vm"] == f"pid {PID}"
    assert snap["totals"]["events"]["merge"] == 4099
