"""Emulated host speed: pages the merge daemon scans per second of wall time, on one core.

    .venv/bin/python bench/emulator_scan.py                        # 16 VMs x 4 GiB, 40 s emulated
    .venv/bin/python bench/emulator_scan.py --vms 64 --gib 4       # the 64 x 4 GiB host
    .venv/bin/python bench/emulator_scan.py --profile              # cProfile, top 25

Runs the emulate source on `scale_scenario` (dynvm_trace.emulator.scenario) for some seconds
of emulated time, consuming every batch (its records are counted, not kept). Pages scanned are
the emulator's own count (every scan cycle walks every page in use); the wall time includes
making the records.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from typing import Any

from dynvm_trace.emulator.scenario import scale_scenario
from dynvm_trace.sources.emulate import EmulateSource

INTERVAL_NS = 1_000_000_000


def run(vms: int, gib: float, seconds: float, seed: int = 1) -> dict[str, Any]:
    """Run the host for `seconds` of emulated time; what it did and how fast."""
    t = time.perf_counter()
    source = EmulateSource(scale_scenario(vms, int(gib * (1 << 30))), seed=seed)
    setup_s = time.perf_counter() - t
    records = scans = 0
    t = time.perf_counter()
    for batch in source.batches(INTERVAL_NS, int(seconds * 1e9)):
        records += len(batch.records)
        scans += sum(1 for r in batch.records if r["kind"] == "scan_end" and r["merge_scan"])
    run_s = time.perf_counter() - t
    return {"vms": vms, "gib": gib, "seconds": seconds, "pages": source.scenario.total_pages, "setup_s": setup_s,
            "run_s": run_s, "merge_scans": scans, "pages_scanned": source.pages_scanned,
            "records": records, "pages_per_s": source.pages_scanned / run_s,
            "records_per_s": records / run_s}


def print_run(r: dict[str, Any]) -> None:
    print(f"{r['vms']} VMs x {r['gib']:g} GiB = {r['pages']:,} pages; set-up {r['setup_s']:.1f} s")
    print(f"{r['seconds']:g} s emulated ({r['merge_scans']} merge scans) in {r['run_s']:.1f} s: "
          f"{r['pages_scanned']:,} pages "
          f"scanned, {r['records']:,} records")
    print(f"pages scanned/s {r['pages_per_s']:>14,.0f}")
    print(f"records/s       {r['records_per_s']:>14,.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=16)
    ap.add_argument("--gib", type=float, default=4.0, help="guest RAM per VM")
    ap.add_argument("--seconds", type=float, default=40.0,
                    help="emulated time (the scenario fills guest RAM at 1 s, writes at 30 s; default 40)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print the top 25 of a cProfile run")
    args = ap.parse_args(argv)
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run, args.vms, args.gib, args.seconds, args.seed)
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
        return 0
    print_run(run(args.vms, args.gib, args.seconds, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
