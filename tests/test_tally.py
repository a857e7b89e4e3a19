"""`tally` records (events counted in the kernel, not streamed: the ksm source under `top`)
count in Totals, PerVM and Rates exactly as the same events streamed one by one would."""

from __future__ import annotations

from dynvm_trace.aggregators import Aggregates, PerVM, Rates, Totals
from dynvm_trace.events import problems

S = 1_000_000_000


def streamed(t0: int) -> list[dict]:
    recs = [{"kind": "merge", "ts": t0 + i, "src": "ksm", "pid": 7} for i in range(5)]
    recs += [{"kind": "cow_break", "ts": t0 + 10, "src": "ksm", "pid": 7},
             {"kind": "merge_fail", "ts": t0 + 11, "src": "ksm", "reason": "EBUSY"},
             {"kind": "reclaim_release", "ts": t0 + 12, "src": "ksm", "pid": 7, "pages": 3},
             {"kind": "unmerge", "ts": t0 + 12, "src": "ksm", "pid": 7, "reason": "released"},
             {"kind": "reclaim_refault", "ts": t0 + 13, "src": "ksm", "pid": 7, "pages": 1}]
    return recs


def tallied(t0: int) -> list[dict]:
    return [{"kind": "tally", "ts": t0, "src": "ksm", "window_ns": 20,
             "counts": {"merge_fail": 1}},
            {"kind": "tally", "ts": t0, "src": "ksm", "pid": 7, "window_ns": 20,
             "counts": {"merge": 5, "cow_break": 1, "reclaim_release": 1, "unmerge": 1,
                        "reclaim_refault": 1},
             "pages": {"reclaim_release": 3, "reclaim_refault": 1}}]


def test_tally_is_a_valid_record():
    for rec in tallied(0):
        assert problems(rec) == []
    assert problems({"kind": "tally", "ts": 0, "src": "ksm"}) == ["missing field 'counts'"]


def test_totals_same_as_streamed():
    a, b = Totals(), Totals()
    a.feed(streamed(100))
    b.feed(tallied(100))
    assert a.snapshot() == b.snapshot()
    assert "tally" not in b.snapshot()["events"]


def test_per_vm_same_as_streamed():
    a, b = PerVM(4096), PerVM(4096)
    a.feed(streamed(100))
    b.feed(tallied(100))
    assert a.table() == b.table()


def test_rates_put_a_tally_in_the_interval_of_its_window():
    a, b = Rates(S, t0=0), Rates(S, t0=0)
    a.feed(streamed(S + 100))
    a.advance(2 * S)
    b.feed(tallied(S + 100))
    b.advance(2 * S)
    assert a.last() == b.last()
    assert b.last()["index"] == 1 and b.last()["events"]["merge"] == 5


def test_aggregates_and_correlation_see_tallies_as_events():
    agg = Aggregates(4096, S)
    agg.feed([{"kind": "counters", "ts": 0, "src": "ksm", "group": "ksm_probes",
               "values": {"merge_new": 0, "merge_existing": 0, "merge_zero": 0}}]
             + tallied(1)
             + [{"kind": "counters", "ts": 50, "src": "ksm", "group": "ksm_probes",
                 "values": {"merge_new": 1, "merge_existing": 4, "merge_zero": 0}}], 50)
    assert agg.totals.snapshot()["events"]["merge"] == 5
    merges = [s for s in agg.correlation.applicable() if s.rule.name == "ksm stream: merges"]
    assert merges and merges[0].verdict == "agrees"
    assert agg.correlation.late_records == 0
