"""How much of the verifier's budget each ksm probe program takes: the instructions the
verifier processed to load it (the kernel refuses a program past 1,000,000), for the two ways
the ksm source compiles probes/ksm.c: `record` (STREAM: the ring buffer) and `top` (TALLY:
in-kernel tallies). The discard exit programs take the most: mark_released's loops are
unrolled, and the verifier walks them once per path that reaches them.

    sudo .venv/bin/python bench/ksm_verifier.py [--json]

The programs are loaded, never attached: nothing is traced, KSM is not touched. The count is
the kernel's `verified_insns` (/proc/self/fdinfo of each program, Linux 5.16 and later).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dynvm_trace import bpf_host
from dynvm_trace.btf import kernel_member_offset
from dynvm_trace.paths import Roots
from dynvm_trace.sources.ksm import RINGBUF_PAGES, _defines, _probe_source

LIMIT = 1_000_000


def verified_insns(fd: int) -> int | None:
    """The instructions the verifier processed to load the program behind fd (None before
    Linux 5.16)."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "verified_insns":
            return int(value)
    return None


def _tracepoint(function: str) -> str:
    """A program's tracepoint from its bcc function name: `ksm:ksm_enter`, or `ksm_enter
    (raw)` for a raw tracepoint program."""
    if function.startswith("raw_tracepoint__"):
        return f"{function[len('raw_tracepoint__'):]} (raw)"
    return function[len("tracepoint__"):].replace("__", ":")


def measure(stream: bool) -> dict[str, int | None]:
    """tracepoint (group:name) -> verified instructions, with the probe compiled as the ksm
    source compiles it for this kernel (stream: record, else top)."""
    bcc = bpf_host.import_bcc()
    prefixes = {"tracepoint__": bcc.BPF.TRACEPOINT, "raw_tracepoint__": bcc.BPF.RAW_TRACEPOINT}

    class LoadOnly(bcc.BPF):
        def _trace_autoload(self) -> None:  # load every tracepoint program, attach none
            for i in range(bcc.lib.bpf_num_functions(self.module)):
                name = bcc.lib.bpf_function_name(self.module, i)
                for prefix, kind in prefixes.items():
                    if name.startswith(prefix.encode()):
                        self.load_func(name, kind)

    roots = Roots()
    flags = _defines(bpf_host.available_tracepoints(roots),
                     kernel_member_offset(roots, "ksm_rmap_item", "address"), stream, RINGBUF_PAGES,
                     kernel_member_offset(roots, "task_struct", "mm"))
    bpf = LoadOnly(text=_probe_source().encode(), cflags=flags)
    try:
        return {_tracepoint(name.decode()): verified_insns(fn.fd)
                for name, fn in sorted(bpf.funcs.items())}
    finally:
        bpf.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (loading BPF programs)")
    out = {mode: measure(stream) for mode, stream in (("record", True), ("top", False))}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for mode, programs in out.items():
        for tp, n in programs.items():
            share = "" if n is None else f"{n / LIMIT:6.1%}"
            print(f"{mode:6}  {tp:40} {'?' if n is None else f'{n:,}':>9}  {share}")


if __name__ == "__main__":
    main()
