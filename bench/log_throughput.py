"""Log write, log read and replay + aggregation throughput on a synthetic event log.

    .venv/bin/python bench/log_throughput.py                   # 10 M events (the target size)
    .venv/bin/python bench/log_throughput.py --events 1000000  # a quick run
    .venv/bin/python bench/log_throughput.py --profile report  # cProfile of one stage

The log looks like an emulated run: 8 VMs (pid, comm, vm on every record), mostly merges, COW
breaks and unmerges of pages merged earlier (so lifetimes match), reclaim releases and refaults,
a few merge failures, a scan cycle every 100 ms and a pone_info counters record (all 34
counters, kept consistent with the events) every second of source time. Records are generated
in batches that are never all held in memory; generation is not timed.

Stages, each timed alone on one core:
  write   LogWriter.write of every batch, to .jsonl and to .jsonl.gz
  read    LogReader.batches over each file
  report  report.summarize(LogReader(file)): what `dynvm-trace report` does
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dynvm_trace.logfile import LogReader, LogWriter, make_header
from dynvm_trace.pone_sysfs import PONE_INFO_KEYS
from dynvm_trace.report import summarize

PAGE = 4096
BATCH = 65536  # records per generated batch (what the emulate source bounds a batch to)
EVENT_GAP_NS = 20_000  # mean source time between events: 50 k events per second
COUNTERS_EVERY_NS = 1_000_000_000
SCAN_EVERY_NS = 100_000_000
SCAN_NS = 60_000_000
VMS = [(4000 + i, "qemu-kvm", f"vm{i}") for i in range(8)]
VM_PAGES = 1 << 20  # 4 GiB of 4 KiB pages per VM

# Cumulative weights of the event kinds between scans and counters.
KINDS = ("merge", "cow_break", "unmerge", "reclaim_release", "reclaim_refault", "merge_fail")
WEIGHTS = (0.70, 0.15, 0.06, 0.04, 0.04, 0.01)


def generate(n_events: int, seed: int) -> Iterator[list[dict[str, Any]]]:
    """Batches of records, n_events in all, in timestamp order."""
    rng = random.Random(seed)
    merged: list[list[int]] = [[] for _ in VMS]  # addresses merged now, per VM
    ctr = dict.fromkeys(PONE_INFO_KEYS, 0)
    ts, seq, scanning = 0, 0, False
    next_counters, next_scan = COUNTERS_EVERY_NS, SCAN_EVERY_NS
    made = 0
    kinds = rng.choices(KINDS, WEIGHTS, k=BATCH)
    while made < n_events:
        batch: list[dict[str, Any]] = []
        for i in range(min(BATCH, n_events - made)):
            ts += rng.randrange(1, 2 * EVENT_GAP_NS)
            if ts >= next_scan:  # a scan runs for the first 60 ms of every 100 ms
                if scanning:
                    batch.append({"kind": "scan_end", "ts": ts, "src": "emulate", "seq": seq,
                                  "merge_scan": True, "pages_scanned": rng.randrange(1 << 20)})
                    seq += 1
                    next_scan += SCAN_EVERY_NS - SCAN_NS
                else:
                    batch.append({"kind": "scan_start", "ts": ts, "src": "emulate", "seq": seq,
                                  "merge_scan": True})
                    next_scan += SCAN_NS
                scanning = not scanning
            elif ts >= next_counters:
                ctr["slice alloc cnt"] += rng.randrange(100)
                ctr["data map key cnt"] += rng.randrange(100)
                batch.append({"kind": "counters", "ts": ts, "src": "emulate", "group": "pone_info",
                              "values": dict(ctr)})
                next_counters += COUNTERS_EVERY_NS
            else:
                batch.append(_event(rng, kinds[i], ts, merged, ctr))
        made += len(batch)
        yield batch


def _event(rng: random.Random, kind: str, ts: int, merged: list[list[int]],
           ctr: dict[str, int]) -> dict[str, Any]:
    v = rng.randrange(len(VMS))
    pid, comm, vm = VMS[v]
    pages = merged[v]
    if kind in ("cow_break", "unmerge") and pages:
        j = rng.randrange(len(pages))
        pages[j], pages[-1] = pages[-1], pages[j]
        addr = pages.pop()
        ctr["delete merge page cnt"] += 1
        if kind == "cow_break":
            return {"kind": kind, "ts": ts, "src": "emulate", "pid": pid, "comm": comm, "vm": vm,
                    "pfn": rng.randrange(1 << 24), "new_pfn": rng.randrange(1 << 24), "addr": addr}
        return {"kind": kind, "ts": ts, "src": "emulate", "pid": pid, "comm": comm, "vm": vm,
                "reason": "unmap", "pfn": rng.randrange(1 << 24), "addr": addr}
    if kind == "reclaim_release":
        n = rng.randrange(1, 512)
        ctr["virt page merge count"] += n
        ctr["page recycle count"] += n
        return {"kind": kind, "ts": ts, "src": "emulate", "pid": pid, "comm": comm, "vm": vm,
                "pages": n, "addr": rng.randrange(VM_PAGES) * PAGE}
    if kind == "reclaim_refault":
        ctr["page recycle count"] -= 1
        return {"kind": kind, "ts": ts, "src": "emulate", "pid": pid, "comm": comm, "vm": vm,
                "pages": 1, "addr": rng.randrange(VM_PAGES) * PAGE}
    if kind == "merge_fail":
        return {"kind": kind, "ts": ts, "src": "emulate", "pid": pid, "comm": comm, "vm": vm,
                "reason": "changed", "stage": "compare", "addr": rng.randrange(VM_PAGES) * PAGE}
    addr = rng.randrange(VM_PAGES) * PAGE
    pages.append(addr)
    ctr["slice merge cnt"] += 1
    return {"kind": "merge", "ts": ts, "src": "emulate", "pid": pid, "comm": comm, "vm": vm,
            "pfn": rng.randrange(1 << 24), "old_pfn": rng.randrange(1 << 24), "addr": addr,
            "into": "existing" if rng.random() < 0.8 else "new"}


def write_logs(paths: list[Path], n_events: int, seed: int) -> list[float]:
    """Write the same generated log to every path; the seconds spent in LogWriter per path."""
    header = make_header("emulate", "emulated", PAGE, 0, anchor_unix_ns=0, seed=seed)
    writers = [LogWriter(p, header) for p in paths]
    spent = [0.0] * len(paths)
    for batch in generate(n_events, seed):
        for i, w in enumerate(writers):
            t = time.perf_counter()
            w.write(batch)
            spent[i] += time.perf_counter() - t
    for i, w in enumerate(writers):
        t = time.perf_counter()
        w.close()
        spent[i] += time.perf_counter() - t
    return spent


def read_all(path: Path) -> int:
    return sum(len(b) for b in LogReader(path).batches())


def report(path: Path) -> int:
    return sum(summarize(LogReader(path))["totals"]["events"].values())


def timed(fn, *args) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000, help="records (default 10 M)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", type=Path, help="where the logs go (default: a temporary directory)")
    ap.add_argument("--profile", choices=("read", "report"),
                    help="run that stage on the .jsonl log under cProfile and print the top 25")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = [Path(tmp) / "bench.jsonl", Path(tmp) / "bench.jsonl.gz"]
        spent = write_logs(paths, args.events, args.seed)
        n = args.events
        if args.profile:
            stage = read_all if args.profile == "read" else report
            prof = cProfile.Profile()
            prof.runcall(stage, paths[0])
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
            return 0
        rows = []
        for path, write_s in zip(paths, spent):
            read_s, got = timed(read_all, path)
            report_s, _ = timed(report, path)
            assert got == n, (got, n)
            size = path.stat().st_size
            rows.append((path.name, size, write_s, read_s, report_s))
    print(f"{n:,} records, seed {args.seed}, python {sys.version.split()[0]}")
    print(f"{'file':<16} {'MiB':>8} {'B/rec':>6} {'write ev/s':>12} {'read ev/s':>12} "
          f"{'report ev/s':>12} {'report s':>9}")
    for name, size, write_s, read_s, report_s in rows:
        print(f"{name:<16} {size / 2**20:>8.1f} {size / n:>6.1f} {n / write_s:>12,.0f} "
              f"{n / read_s:>12,.0f} {n / report_s:>12,.0f} {report_s:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
