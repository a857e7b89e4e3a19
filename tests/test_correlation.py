"""Correlation of events with counter deltas: agree, differ, explained by lost events, KSM."""

from __future__ import annotations

from dynvm_trace.correlation import RULES, Correlation
from dynvm_trace.events import event


def info(ts: int, merged: int) -> dict:
    """A pone_info snapshot with only "slice merge cnt"."""
    return event("counters", ts, "t", group="pone_info", values={"slice merge cnt": merged})


def merges(ts: int, n: int) -> list[dict]:
    return [event("merge", ts + i, "t", pid=1, addr=i) for i in range(n)]


def rule(c: Correlation, name: str) -> dict:
    (found,) = [r for r in c.snapshot()["rules"] if r["rule"] == name]
    return found


def run(records: list[dict]) -> Correlation:
    c = Correlation()
    c.feed(records)
    return c


def test_no_counters():
    c = run(merges(0, 10))
    assert c.snapshot() == {"verdict": "no counters", "counters_records": 0, "late_records": 0,
                            "rules": []}


def test_one_snapshot_compares_nothing():
    c = run([info(0, 0)] + merges(1, 3))
    assert c.verdict == "no counters" and c.counters_seen == 1


def test_merges_agree_across_windows():
    recs = [info(0, 100)]
    recs += merges(1, 7) + [info(100, 107)]
    recs += merges(101, 4099) + [info(10_000, 4206)]
    c = run(recs)
    r = rule(c, "merges")
    assert (r["verdict"], r["windows"], r["counters_total"], r["events_total"]) == \
        ("agrees", 2, 4106, 4106)
    assert r["worst"] is None and r["last"]["difference"] == 0
    assert c.verdict == "agrees"
    # only rules whose counters were present are listed
    assert [x["rule"] for x in c.snapshot()["rules"]] == ["merges"]


def test_event_at_the_window_end_counts_in_that_window():
    c = run([info(10, 0), event("merge", 10, "t"),
             event("merge", 20, "t"), info(20, 2)])
    # the merge at ts 10 came after the first snapshot with the same ts: late
    assert c.late_records == 1
    c = run([info(10, 0), event("merge", 11, "t"),
             event("merge", 20, "t"), info(20, 2)])
    assert c.verdict == "agrees" and c.late_records == 0


def test_differs_with_total_and_worst_window():
    recs = [info(0, 0), *merges(1, 7),
            info(100, 10),  # +3
            *merges(101, 5), info(200, 15),  # 0
            *merges(201, 5), info(300, 19)]  # -1
    r = rule(run(recs), "merges")
    assert r["verdict"] == "differs"
    assert (r["windows"], r["windows_differing"], r["difference_total"]) == (3, 2, 2)
    assert r["worst"] == {"start_ts": 0, "end_ts": 100, "counters": 10, "events": 7,
                          "difference": 3, "lost": 0, "in_flight": 0}


def lost(ts: int, n: int) -> dict:
    return event("lost", ts, "t", count=n, where="perf buffer", why="full")


def test_difference_within_lost_events_is_explained():
    recs = [info(0, 0), *merges(1, 7), lost(50, 5),
            info(100, 10)]
    c = run(recs)
    r = rule(c, "merges")
    assert (r["verdict"], r["windows_explained"], r["lost_in_explained"]) == ("explained", 1, 5)
    assert c.verdict == "explained"


def test_lost_events_in_another_window_explain_nothing():
    recs = [info(0, 0), lost(50, 5),
            info(100, 0), *merges(101, 7),
            info(200, 10)]
    r = rule(run(recs), "merges")
    assert r["verdict"] == "differs" and r["worst"]["lost"] == 0


def test_too_few_lost_events_still_differs():
    recs = [info(0, 0), *merges(1, 7), lost(50, 2),
            info(100, 10)]
    assert run(recs).verdict == "differs"


def test_pone_release_rules_as_seen_on_the_patched_kernel():
    """997 released, 53 failed, then 101 written again (kernel/pone.md, ppr as it ran)."""
    zero = {"virt page merge count": 0, "virt page merge count err": 0, "page recycle count": 0,
            "delete merge page cnt": 0}
    recs = [event("counters", 0, "t", group="pone_info", values=zero),
            event("reclaim_release", 1, "t", pages=997, status="released"),
            event("reclaim_release", 2, "t", pages=53, status="failed"),
            event("reclaim_release", 3, "t", pages=4, status="retry"),
            event("counters", 10, "t", group="pone_info",
                  values={**zero, "virt page merge count": 997, "virt page merge count err": 53,
                          "page recycle count": 997}),
            *[event("reclaim_refault", 11 + i, "t", pages=1) for i in range(101)],
            event("cow_break", 200, "t"), event("unmerge", 201, "t", reason="exit"),
            event("counters", 300, "t", group="pone_info",
                  values={**zero, "virt page merge count": 997, "virt page merge count err": 53,
                          "page recycle count": 896, "delete merge page cnt": 2})]
    c = run(recs)
    verdicts = {r["rule"]: (r["verdict"], r["counters_total"]) for r in c.snapshot()["rules"]}
    assert verdicts == {"sharing removed": ("agrees", 2), "pages released": ("agrees", 997),
                        "release failures": ("agrees", 53), "released in place": ("agrees", 896)}
    assert c.verdict == "agrees"


def test_guide_dialect_abstract():
    recs = [event("counters", 0, "t", group="pone_abstract",
                  values={"page merge count": 50, "page reclaim count": 7}),
            *merges(1, 10), event("cow_break", 20, "t"),
            event("reclaim_release", 21, "t", pages=8),
            event("reclaim_refault", 22, "t", pages=3),
            event("counters", 30, "t", group="pone_abstract",
                  values={"page merge count": 59, "page reclaim count": 11})]
    c = run(recs)
    got = {r["rule"]: (r["verdict"], r["difference_total"]) for r in c.snapshot()["rules"]}
    assert got == {"merged now": ("agrees", 0), "reclaimed now": ("differs", -1)}


def test_ksm_rules_on_a_synthetic_stream():
    """4096 identical pages merged into 16 KSM pages, then 2048 COW breaks (upstream.md)."""
    ksm = lambda ts, sharing, shared: event(  # noqa: E731
        "counters", ts, "ksm", group="ksm",
        values={"pages_sharing": sharing, "pages_shared": shared, "full_scans": ts})
    vmstat = lambda ts, cow: event("counters", ts, "ksm", group="vmstat",  # noqa: E731
                                   values={"cow_ksm": cow, "ksm_swpin_copy": 0})
    recs = [ksm(0, 0, 0), vmstat(0, 1000)]
    recs += [event("merge", 1 + i, "ksm", pid=9, addr=i << 12, into="ksm_page")
             for i in range(4096)]
    recs += [ksm(5000, 4080, 16), vmstat(5000, 1000)]
    recs += [event("cow_break", 5001 + i, "ksm", pid=9, addr=i << 12) for i in range(2048)]
    recs += [ksm(9000, 4080 - 2048, 16), vmstat(9000, 1000 + 2048)]
    c = run(recs)
    got = {r["rule"]: r for r in c.snapshot()["rules"]}
    assert set(got) == {"ksm merged now", "ksm cow breaks"}
    assert got["ksm merged now"]["verdict"] == "agrees"
    assert got["ksm merged now"]["approximate"] is True
    assert got["ksm merged now"]["counters"] == "Δpages_sharing + Δpages_shared"
    assert got["ksm merged now"]["events"] == "merges - cow_breaks - unmerges - merged_at_exit"
    assert (got["ksm cow breaks"]["verdict"], got["ksm cow breaks"]["counters_total"]) == \
        ("agrees", 2048)
    assert c.verdict == "agrees"


def test_ksm_breaks_counted_a_scan_later_differ_then_catch_up():
    """An approximate rule: windows may differ, the totals over the log decide."""
    ksm = lambda ts, sharing: event("counters", ts, "ksm", group="ksm",  # noqa: E731
                                    values={"pages_sharing": sharing, "pages_shared": 1})
    recs = [ksm(0, 9), event("cow_break", 1, "ksm"), ksm(10, 9), ksm(20, 8)]
    r = rule(run(recs), "ksm merged now")
    assert (r["verdict"], r["difference_total"], r["windows_differing"]) == ("agrees", 0, 2)
    r = rule(run(recs[:3]), "ksm merged now")  # the log ends while the COW break is news
    assert (r["verdict"], r["difference_total"]) == ("settling", 1)
    assert run(recs[:3]).verdict == "settling"
    r = rule(run(recs[:3] + [ksm(20, 9)]), "ksm merged now")  # a quiet window: still not caught up
    assert (r["verdict"], r["difference_total"]) == ("differs", 1)


def test_rule_table_names_are_unique_and_groups_known():
    assert len({r.name for r in RULES}) == len(RULES)
    assert {r.group for r in RULES} == {"pone_info", "pone_abstract", "ksm", "vmstat",
                                        "ksm_probes", "pone_probes"}


def test_released_pages_given_up_at_vm_exit_are_not_a_difference():
    def recycle(ts: int, n: int) -> dict:
        return event("counters", ts, "t", group="pone_info", values={"page recycle count": n})
    records = [recycle(0, 0),
               event("reclaim_release", 1, "t", pid=1, pages=257),
               event("reclaim_refault", 2, "t", pid=1, pages=127),
               recycle(10, 130),
               event("vm_exit", 11, "t", pid=1, released=130),
               recycle(20, 0)]
    c = run(records)
    assert rule(c, "released in place")["verdict"] == "agrees"
    without_field = run([dict(r) for r in records[:4]] + [event("vm_exit", 11, "t", pid=1), records[5]])
    assert rule(without_field, "released in place")["verdict"] == "differs"


def test_merged_pages_a_process_takes_away_at_exit_are_not_a_difference():
    def ksm(ts: int, sharing: int) -> dict:
        return event("counters", ts, "t", group="ksm", values={"pages_sharing": sharing,
                                                                 "pages_shared": 0})
    records = [ksm(0, 0), *merges(1, 4099), ksm(10_000, 4099),
               event("vm_exit", 10_001, "t", pid=1, merged=4099), ksm(20_000, 0)]
    assert rule(run(records), "ksm merged now")["verdict"] == "agrees"
    without = [r for r in records if r["kind"] != "vm_exit"] + [ksm(30_000, 0)]  # then quiet
    assert rule(run(without), "ksm merged now")["verdict"] == "differs"


def test_difference_within_events_in_flight_at_the_snapshots_is_explained():
    """A source that found no quiet moment to read its counters says how many events came
    meanwhile (`in_flight`): a window may be off by those of both its ends, no more."""
    from dynvm_trace.report import _correlation

    def busy(ts: int, merged: int, in_flight: int) -> dict:
        rec = info(ts, merged)
        rec["in_flight"] = in_flight
        return rec

    recs = [busy(0, 0, 2), *merges(1, 7), busy(100, 10, 1)]  # +3 = 2 + 1: explained
    r = rule(run(recs), "merges")
    assert (r["verdict"], r["windows_explained"], r["in_flight_in_explained"]) == ("explained", 1, 3)
    assert "explained by 3 in flight at snapshots" in _correlation(run(recs).snapshot())
    assert "in flight 3" in _correlation(run(recs).snapshot())
    recs += [*merges(101, 5), busy(200, 19, 0)]  # +4 > 1 + 0: differs
    assert rule(run(recs), "merges")["verdict"] == "differs"
