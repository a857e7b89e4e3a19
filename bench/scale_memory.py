"""Peak memory of the emulated 64 VM x 4 GiB host, run in a fresh process so ru_maxrss is its own.

    .venv/bin/python bench/scale_memory.py                    # 64 x 4 GiB, 40 s emulated
    .venv/bin/python bench/scale_memory.py --vms 8 --gib 1    # a quick run

The child process runs bench/emulator_scan.py's run() (records are consumed, not kept) and
reports its peak resident set; the parent prints it with the pages the host models.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emulator_scan import print_run, run  # noqa: E402


def child(vms: int, gib: float, seconds: float) -> None:
    figures = run(vms, gib, seconds)
    figures["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(figures))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vms", type=int, default=64)
    ap.add_argument("--gib", type=float, default=4.0, help="guest RAM per VM")
    ap.add_argument("--seconds", type=float, default=40.0, help="emulated time (default 40)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.vms, args.gib, args.seconds)
        return 0
    out = subprocess.run([sys.executable, __file__, "--child", "--vms", str(args.vms),
                          "--gib", str(args.gib), "--seconds", str(args.seconds)],
                         check=True, capture_output=True, text=True).stdout
    figures = json.loads(out.splitlines()[-1])
    print_run(figures)
    rss = figures["maxrss_bytes"]
    print(f"peak RSS        {rss / 2**20:>14,.0f} MiB  ({rss / figures['pages']:.2f} bytes per "
          f"emulated page)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
