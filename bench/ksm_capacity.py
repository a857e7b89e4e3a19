"""Capacity of the ksm source's per-event stream: the highest event rate `record` sustains with
zero loss, found with sustained load at increasing rates.

Each step keeps KSM busy for --seconds: W workload processes (tests/ksm_workload.py, `storm`)
write the same bytes again into every page of theirs in turn, so each write to a merged page
is a COW break and ksmd merges the page again at its next pass: two events per page and pass,
at a rate set by ksmd's knobs (pages_to_scan, sleep_millisecs = 1). `dynvm-trace record
--source ksm` (with its ring buffer --ring-pages pages, default 8192 = 32 MiB) logs the step.
The recorder starts before the workloads (it learns their mm at ksm_enter) and logs their
initial merge too. Per step: offered events/s (the rise of the in-kernel counters of the kinds
the stream carries, from the last counters snapshot before the storm to the last one), events
logged and lost over the whole log (`lost` records; the in-kernel `dropped`).

    sudo .venv/bin/python bench/ksm_capacity.py [--seconds 12] [--workers 2] \
        [--pages 65536] [--steps 250,500,1000,2000,4000,20000] [--ring-pages 8192]

Needs root. KSM knobs are restored at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from ksm_overhead import KSM, WORKLOAD, exclusive_ksm, merging_pages, wait  # noqa: E402

# the kinds the probe writes to the ring buffer (ksm_enter/ksm_exit are not logged as records)
STREAMED = ("merge_new", "merge_existing", "merge_zero", "merge_fail", "unmerge", "scan_start",
            "scan_end", "cow_break", "reclaim_release", "reclaim_refault")
EVENT_KINDS = ("merge", "merge_fail", "unmerge", "scan_start", "scan_end", "cow_break",
               "reclaim_release", "reclaim_refault")


def record_with_ring(log: str, ring_pages: int) -> None:
    """`dynvm-trace record --source ksm -o LOG` with a ring buffer of ring_pages pages."""
    from dynvm_trace.cli.main import entry
    from dynvm_trace.sources.ksm import KsmSource
    defaults = list(KsmSource.__init__.__defaults__)
    defaults[2] = ring_pages  # (pids, stream, ringbuf_pages, warn)
    KsmSource.__init__.__defaults__ = tuple(defaults)
    sys.argv = ["dynvm-trace", "record", "--source", "ksm", "-o", log]
    sys.exit(entry())


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def step(pages_to_scan: int, args, tmp: Path) -> dict:
    (KSM / "pages_to_scan").write_text(str(pages_to_scan))
    log = tmp / f"step{pages_to_scan}.jsonl"
    # the recorder first: it learns each workload's mm at ksm_enter (its merges, its page set)
    rec = subprocess.Popen([sys.executable, __file__, "--record", str(log),
                            "--ring-pages", str(args.ring_pages)],
                           stderr=open(tmp / "record.err", "w"), preexec_fn=_default_sigint)
    wait(lambda: log.exists() and log.read_text().count("\n") >= 2, 60, "record")
    works = [subprocess.Popen([sys.executable, str(WORKLOAD), str(args.pages)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(args.workers)]
    try:
        pids = [int(w.stdout.readline().split()[1]) for w in works]
        wait(lambda: all(merging_pages(p) >= args.pages for p in pids), what="merges")
        time.sleep(1.5)  # a counters snapshot (1 s interval) between the merge and the storm
        t0 = time.monotonic()
        storm_ns = time.monotonic_ns()
        for w in works:
            w.stdin.write(f"storm {args.seconds}\n")
            w.stdin.flush()
        for w in works:
            assert w.stdout.readline().strip() == "ok"
        storm_s = time.monotonic() - t0
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=300)
    finally:
        for w in works:
            w.kill()
            w.wait()
    logged = lost = 0
    probes = []
    with open(log) as f:
        for line in f:
            r = json.loads(line)
            kind = r.get("kind")
            if kind in EVENT_KINDS:
                logged += 1
            elif kind == "lost":
                lost += r["count"]
            elif kind == "counters" and r.get("group") == "ksm_probes":
                probes.append((r["ts"], r["values"]))
    log.unlink()
    # offered: from the last snapshot before the storm to the last one (just after it)
    t_a, a = [p for p in probes if p[0] <= storm_ns][-1]
    t_b, b = probes[-1]
    offered = sum(b[k] - a[k] for k in STREAMED)
    return {"pages_to_scan": pages_to_scan, "storm_s": round(storm_s, 2),
            "offered": offered, "offered_per_s": round(offered / ((t_b - t_a) / 1e9)),
            "storm_per_s": round(offered / storm_s), "logged": logged, "lost": lost,
            "dropped": b["dropped"] - a["dropped"], "cow_break": b["cow_break"] - a["cow_break"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=12.0, help="storm per step")
    ap.add_argument("--workers", type=int, default=2, help="workload processes")
    ap.add_argument("--pages", type=int, default=65536, help="pages per workload")
    ap.add_argument("--steps", default="250,500,1000,2000,4000,20000",
                    help="ksmd pages_to_scan per step (sleep_millisecs 1)")
    ap.add_argument("--ring-pages", type=int, default=8192)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.record:
        record_with_ring(args.record, args.ring_pages)
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    knobs = ("run", "pages_to_scan", "sleep_millisecs")
    rows = []
    with exclusive_ksm():
        saved = {k: (KSM / k).read_text().strip() for k in knobs}
        try:
            (KSM / "sleep_millisecs").write_text("1")
            (KSM / "run").write_text("1")
            with tempfile.TemporaryDirectory() as tmp:
                for pts in map(int, args.steps.split(",")):
                    row = step(pts, args, Path(tmp))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            for k in knobs:
                (KSM / k).write_text(saved[k])
    print(f"\nring {args.ring_pages} pages, {args.workers} x {args.pages} pages, "
          f"{args.seconds:g} s per step")
    print(f"{'pages_to_scan':>13} {'offered/s':>10} {'offered':>9} {'logged':>9} {'lost':>8}")
    for r in rows:
        print(f"{r['pages_to_scan']:>13} {r['offered_per_s']:>10} {r['offered']:>9} "
              f"{r['logged']:>9} {r['lost']:>8}")


if __name__ == "__main__":
    main()
