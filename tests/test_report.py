"""The report of a small synthetic log: golden text, JSON keys, warnings.

Set DYNVM_UPDATE_GOLDEN=1 to rewrite the golden file after an intended change of the layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dynvm_trace.events import event
from dynvm_trace.logfile import LogReader, LogWriter, make_header
from dynvm_trace.report import fmt_bytes, render_text, summarize

GOLDEN = Path(__file__).parent / "golden" / "report_small.txt"
MS = 1_000_000


def small_log() -> tuple[dict, list[list[dict]]]:
    header = make_header("emulate", "CLOCK_MONOTONIC", 8192, anchor_ts=0,
                         anchor_unix_ns=1_700_000_000 * 10**9,
                         kernel="4.4.1-pone", host="kvm-host-1")
    info = lambda ts, merged, deleted, released, recycled: event(  # noqa: E731
        "counters", ts, "emulate", group="pone_info",
        values={"slice merge cnt": merged, "delete merge page cnt": deleted,
                "virt page merge count": released, "virt page merge count err": 0,
                "page recycle count": recycled})
    first = [info(0, 0, 0, 0, 0)]
    first += [event("merge", MS + i, "emulate", pid=3001, vm="web", addr=i << 12)
              for i in range(1500)]
    first += [event("merge", 2 * MS + i, "emulate", pid=3002, vm="db", addr=i << 12)
              for i in range(300)]
    first += [event("cow_break", 3 * MS + i * 1000, "emulate", pid=3001, vm="web", addr=i << 12)
              for i in range(200)]
    first += [event("merge_fail", 4 * MS, "emulate", pid=3002, vm="db", reason="page lock",
                    stage="change_reverse_ref", code=2),
              event("reclaim_release", 5 * MS, "emulate", pid=3002, vm="db", pages=1000),
              event("reclaim_release", 5 * MS + 1, "emulate", pid=3002, vm="db", pages=40,
                    status="failed"),
              info(10 * MS, 1800, 200, 1000, 1000)]
    second = [event("reclaim_refault", 11 * MS, "emulate", pid=3002, vm="db", pages=100),
              event("unmerge", 12 * MS, "emulate", pid=3002, vm="db", reason="exit",
                    addr=5 << 12),
              event("cow_break", 13 * MS, "emulate", pid=3002, vm="db"),
              event("lost", 14 * MS, "emulate", count=2, where="perf buffer", why="full"),
              info(20 * MS, 1800, 204, 1000, 900)]
    return header, [first, second]


def write_log(tmp_path: Path) -> Path:
    header, batches = small_log()
    path = tmp_path / "small.jsonl"
    with LogWriter(path, header) as w:
        for b in batches:
            w.write(b)
    return path


def test_report_text_matches_golden(tmp_path):
    text = render_text(summarize(LogReader(write_log(tmp_path))))
    if os.environ.get("DYNVM_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_summary_from_reader_equals_summary_from_header_and_batches(tmp_path):
    assert summarize(LogReader(write_log(tmp_path))) == summarize(small_log())


def test_summary_keys_and_figures():
    s = json.loads(json.dumps(summarize(small_log())))
    assert list(s) == ["header", "span", "totals", "vms", "lifetimes", "counters",
                       "correlation", "lost", "alerts", "warnings"]
    assert s["header"]["page_size"] == 8192 and s["header"]["kernel"] == "4.4.1-pone"
    assert s["span"] == {"first_ts": 0, "last_ts": 20 * MS, "duration_ns": 20 * MS}
    assert s["lost"] == 2
    web, db = s["vms"]
    assert (web["vm"], web["shared_pages"], web["saved_bytes"]) == ("web", 1300, 1300 * 8192)
    assert (db["vm"], db["reclaimed_pages"], db["reclaimed_bytes"]) == ("db", 900, 900 * 8192)
    assert s["lifetimes"]["matched"] == 200 and s["lifetimes"]["unmatched"] == 1
    assert s["counters"]["pone_info"]["page recycle count"] == 900
    rules = {r["rule"]: r["verdict"] for r in s["correlation"]["rules"]}
    # second window: the counter says 4 sharing ended, the events 2, with 2 lost
    assert rules == {"merges": "agrees", "sharing removed": "explained",
                     "pages released": "agrees", "release failures": "differs",
                     "released in place": "agrees"}
    assert s["correlation"]["verdict"] == "differs"
    assert s["warnings"] == ["2 events were lost: event figures undercount"]


def test_missing_page_size_is_a_warning_not_a_guess():
    header, batches = small_log()
    del header["page_size"]
    s = summarize((header, batches))
    assert s["header"]["page_size"] == os.sysconf("SC_PAGESIZE")
    assert s["warnings"][0].startswith("the header gives no page size")


def test_empty_log_renders():
    header, _ = small_log()
    s = summarize((header, []))
    assert s["correlation"]["verdict"] == "no counters"
    assert "CORRELATION (counters vs events): no counters" in render_text(s)


@pytest.mark.parametrize("n, text", [(0, "0.00 MiB"), (1536 * 1024, "1.50 MiB"),
                                     (-(1 << 20), "-1.00 MiB"), (3 << 30, "3.00 GiB")])
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text
