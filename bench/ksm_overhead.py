"""What tracing KSM costs: the time ksmd takes to merge a workload, and the time a COW-fault
storm takes, with nothing attached and with each tracer attached, in one run, alternating
(round by round), reported as medians and as ratios to the untraced median, round by round and
between the lowest trials.

Tracers: `top` (`dynvm-trace top --source ksm`: in-kernel counters and per-process tallies, no
event stream), `top-probes` (the same probes without the CLI), `record-probes` (`record`'s
probes and ring buffer, drained and decoded, no log written), `record-nodrain` (the same, the
ring never read: the kernel's side of `record` alone; the ring holds 524,288 events, so keep
--pages + --cow below that), `bare` (the floor: a bcc counter
on the merge and the page fault tracepoints, nothing else), `bare-raw` (the same counter on raw
tracepoints, as the ksm source attaches them where BTF allows), `record` (every event to a log),
`bpftrace` (a count and one histogram on the merge tracepoint, and write faults counted per
process), `perf` (perf record -e 'ksm:*'), `busy` (no tracer: a process at nice 19 copying 32
MiB over and over, what any busy neighbour on the other CPU costs the workload).
Loss: lost events reported by dynvm-trace's record; events bpftrace/perf saw against the
kernel-side total. Each tracer's own CPU time during the trial is reported too (`tracer_cpu_s`,
user + system of its process); with --probe-cost, kernel.bpf_stats_enabled is turned on (and
restored) and the time its BPF programs ran is read from the kernel (`probe_ms`, and per
program: runs and ns per run). The statistics cost a little themselves: compare ratios from
runs without it.

The COW storm runs with ksmd stopped (KSM `run` 0: the merged pages stay merged), so that it
measures the faults alone; `--storm-ksmd run` keeps ksmd scanning at the merge's pace, the other
CPU busy, as it did before 2026-12-05. `cow_cpu_s` is the workload's own CPU time in the storm
(the probes run in its context; what it lacks against `cow_s` is time it waited for a CPU).

    sudo .venv/bin/python bench/ksm_overhead.py [--pages 262144] [--rounds 3] [--cow 0] [--probe-cost]
        [--resident PAGES] [--storm-ksmd stop|run]

--resident keeps another process in KSM through every round, there before any tracer starts,
as on a host with VMs running: the tracers then start with a process already in KSM.

Needs root. KSM knobs are restored at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = ROOT / "tests" / "ksm_workload.py"
sys.path.insert(0, str(WORKLOAD.parent))
from ksm_workload import exclusive_ksm  # noqa: E402
KSM = Path("/sys/kernel/mm/ksm")
KNOBS = {"pages_to_scan": "20000", "sleep_millisecs": "0", "run": "1"}
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# top's equivalent in bpftrace: merges counted with a histogram, and write faults on present
# pages counted per process (a superset of KSM COW breaks: bpftrace has no page set to tell).
BPFTRACE = ("tracepoint:ksm:ksm_merge_with_ksm_page { @merges = count(); @err = hist(args->err); }"
            " tracepoint:exceptions:page_fault_user /(args->error_code & 3) == 3/"
            " { @wp_faults[pid] = count(); }")
# by default; also: top-probes, record-probes, record-nodrain, bare, bare-raw, busy
TRACERS = ("none", "top", "record", "bpftrace", "perf")
BUSY = "b = bytearray(32 << 20)\nwhile True:\n    c = bytes(b)"
# the ksm source without the CLI
PROBES = {"top-probes": "top", "record-probes": "record", "record-nodrain": "record-nodrain"}
# The floor of any probe on these events: count them, nothing else; attached as tracepoints
# (bare) or raw (bare-raw: no trace record built, as the ksm source attaches where BTF allows).
_COUNT = "{ u32 k = %d; u64 *v = counts.lookup(&k); if (v) *v += 1; return 0; }"
BARE = {
    "bare": "BPF_PERCPU_ARRAY(counts, u64, 2);\n"
            f"TRACEPOINT_PROBE(ksm, ksm_merge_with_ksm_page) {_COUNT % 0}\n"
            f"TRACEPOINT_PROBE(exceptions, page_fault_user) {_COUNT % 1}\n",
    "bare-raw": "BPF_PERCPU_ARRAY(counts, u64, 2);\n"
                f"RAW_TRACEPOINT_PROBE(ksm_merge_with_ksm_page) {_COUNT % 0}\n"
                f"RAW_TRACEPOINT_PROBE(page_fault_user) {_COUNT % 1}\n",
}


def ksm(name: str) -> int:
    return int((KSM / name).read_text())


def wait(cond, timeout: float = 300.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def merging_pages(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
            if line.startswith("ksm_merging_pages"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def program_stats(pid: int) -> dict[int, tuple[int, int]]:
    """The BPF programs a process holds: prog_id -> (runs, ns run), counted while
    kernel.bpf_stats_enabled is 1."""
    out = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        out[int(info["prog_id"])] = (int(info.get("run_cnt", 0)), int(info.get("run_time_ns", 0)))
    return out


def _default_sigint() -> None:
    """Tracers stop on SIGINT even when this bench was started with SIGINT ignored (a
    background job), which children would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Tracer:
    """One tracer process, started and attached, then stopped with its own numbers."""

    def __init__(self, kind: str, tmp: Path):
        self.kind, self.tmp, self.proc = kind, tmp, None
        dynvm = str(Path(sys.executable).with_name("dynvm-trace"))
        if kind == "top":  # the real command: in-kernel tallies, aggregators, a line a second
            self.proc = subprocess.Popen([dynvm, "top", "--source", "ksm", "--no-report"],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, preexec_fn=_default_sigint)
            first = self.proc.stdout.readline()  # the first line: attached
            assert first, self.proc.stderr.read()
        elif kind in (*PROBES, *BARE):  # the source's probes without the CLI; the floors
            self.proc = subprocess.Popen([sys.executable, __file__, "--attach-only",
                                          PROBES.get(kind, kind)],
                                         stdout=subprocess.PIPE, text=True,
                                         preexec_fn=_default_sigint)
            assert self.proc.stdout.readline().strip() == "attached"
        elif kind == "record":
            self.log = tmp / "bench.jsonl"
            self.proc = subprocess.Popen([dynvm, "record", "--source", "ksm", "-o", str(self.log)],
                                         stderr=open(tmp / "record.err", "w"), preexec_fn=_default_sigint)
            wait(lambda: self.log.exists() and self.log.read_text().count("\n") >= 2, 60, "record")
        elif kind == "bpftrace":
            self.proc = subprocess.Popen(["bpftrace", "-e", BPFTRACE], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True,
                                         preexec_fn=_default_sigint)
            lines = [self.proc.stdout.readline() for _ in range(1)]
            while not lines[-1].startswith("Attaching"):  # after any warnings
                assert lines[-1] and len(lines) < 10, lines
                lines.append(self.proc.stdout.readline())
        elif kind == "busy":
            self.proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", BUSY],
                                         stderr=subprocess.DEVNULL, preexec_fn=_default_sigint)
        elif kind == "perf":
            self.data = tmp / "perf.data"
            self.proc = subprocess.Popen(["perf", "record", "-q", "-a", "-e", "ksm:*", "-o",
                                          str(self.data)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True,
                                         preexec_fn=_default_sigint)
            time.sleep(2.0)  # perf says nothing when it is attached

    def start_trial(self) -> None:
        """Take the tracer's CPU time and program statistics as the trial begins."""
        if self.proc is not None:
            self.cpu0, self.progs0 = cpu_seconds(self.proc.pid), program_stats(self.proc.pid)

    def cost(self) -> dict:
        """The tracer's CPU time, and its programs' runs and time, since start_trial()."""
        if self.proc is None:
            return {}
        out: dict = {"tracer_cpu_s": round(cpu_seconds(self.proc.pid) - self.cpu0, 3)}
        progs = []
        for prog, (runs, ns) in program_stats(self.proc.pid).items():
            runs0, ns0 = self.progs0.get(prog, (0, 0))
            if ns > ns0:
                progs.append((runs - runs0, ns - ns0))
        if progs:
            out["probe_ms"] = round(sum(ns for _, ns in progs) / 1e6, 1)
            out["probes"] = [f"{runs} runs {ns / runs:.0f} ns" for runs, ns in sorted(progs, reverse=True)]
        return out

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=120)
        if self.kind == "top":
            lines = out.strip().splitlines()
            return {"last_line": lines[-1] if lines else ""}
        if self.kind in (*PROBES, *BARE):
            return json.loads(out)
        if self.kind == "record":
            merges = cows = lost = 0
            with open(self.log) as f:
                for line in f:
                    if '"kind":"merge"' in line:
                        merges += 1
                    elif '"kind":"cow_break"' in line:
                        cows += 1
                    elif '"kind":"lost"' in line:
                        lost += json.loads(line)["count"]
            self.log.unlink()
            return {"merge_events": merges, "cow_events": cows, "lost": lost,
                    "stderr": (self.tmp / "record.err").read_text().strip().splitlines()[-3:]}
        if self.kind == "bpftrace":
            m = re.search(r"@merges: (\d+)", out)
            return {"merge_events": int(m.group(1)) if m else None,
                    "wp_faults": sum(map(int, re.findall(r"@wp_faults\[\d+\]: (\d+)", out)))}
        if self.kind == "perf":
            script = subprocess.run(["perf", "script", "-i", str(self.data), "-F", "event"],
                                    capture_output=True, text=True)
            n = sum(1 for line in script.stdout.splitlines() if "ksm_merge_with_ksm_page" in line)
            lost = re.findall(r"lost (\d+) chunks", script.stderr + err)
            self.data.unlink()
            return {"merge_events": n, "lost_chunks": sum(map(int, lost))}
        return {}


def run_ns(pid: int) -> int:
    """Time a task has run on a CPU so far, in ns (/proc/PID/schedstat): its CPU time, without
    the time it waited for one."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def trial(pages: int, cow: int, storm_ksmd: bool) -> dict:
    """Merge `pages` identical pages (time to all merged), then COW-break `cow` of them; with
    storm_ksmd False, ksmd is stopped (run 0: the pages stay merged) during the storm."""
    base = ksm("pages_shared") + ksm("pages_sharing")
    w = subprocess.Popen([sys.executable, str(WORKLOAD), str(pages)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    pid = int(w.stdout.readline().split()[1])
    t0 = time.monotonic()
    wait(lambda: merging_pages(pid) >= pages, what="merges")
    result = {"merge_s": time.monotonic() - t0}
    if cow:
        if not storm_ksmd:
            (KSM / "run").write_text("0")
        t0, c0 = time.monotonic(), run_ns(pid)
        w.stdin.write(f"cow {cow}\n")
        w.stdin.flush()
        w.stdout.readline()
        result["cow_s"] = time.monotonic() - t0
        result["cow_cpu_s"] = (run_ns(pid) - c0) / 1e9
        (KSM / "run").write_text("1")
    w.stdin.write("exit\n")
    w.stdin.flush()
    w.wait()
    wait(lambda: ksm("pages_shared") + ksm("pages_sharing") <= base, what="unmerge at exit")
    return result


def _until_sigint() -> None:
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass


def attach_only(what: str) -> None:
    """Until SIGINT: the ksm source, without the event stream (`top`) or with it, drained and
    decoded into batches, nothing written (`record`, at record's default nice 10) or never read
    (`record-nodrain`); or a BARE counter."""
    if what in BARE:
        from dynvm_trace.bpf_host import import_bcc
        bpf = import_bcc().BPF(text=BARE[what].encode())
        print("attached", flush=True)
        _until_sigint()
        table = bpf["counts"]
        print(json.dumps({"merge_events": int(sum(table[table.Key(0)])),
                          "faults": int(sum(table[table.Key(1)]))}))
        bpf.cleanup()
        return
    from dynvm_trace.paths import Roots
    from dynvm_trace.sources.ksm import KsmSource
    stream = what.startswith("record")
    if stream:
        os.nice(10)
    src = KsmSource(Roots(), stream=stream)
    print("attached", flush=True)
    if what == "record-nodrain":
        _until_sigint()
        print(json.dumps(src.kernel_counts()))
    else:
        signal.signal(signal.SIGINT, lambda *a: src.stop())
        events = sum(len(batch) for batch in src.batches(1_000_000_000, None))
        print(json.dumps({**src.kernel_counts(), "records": events}))
    src.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=262144, help="workload pages (1 GiB)")
    ap.add_argument("--cow", type=int, default=0, help="COW breaks per trial (0: none)")
    ap.add_argument("--resident", type=int, default=0,
                    help="pages of a process kept in KSM through every round, there before any "
                         "tracer starts (a host with VMs running; 0: none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tracers", default=",".join(TRACERS))
    ap.add_argument("--storm-ksmd", choices=("stop", "run"), default="stop",
                    help="ksmd during the COW storm: stopped (run 0; the merged pages stay "
                         "merged), or scanning on at the merge's pace (the other CPU busy)")
    ap.add_argument("--probe-cost", action="store_true",
                    help="turn on kernel.bpf_stats_enabled and report the programs' run time")
    ap.add_argument("--attach-only", choices=(*PROBES.values(), *BARE), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attach_only:
        attach_only(args.attach_only)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    tracers = args.tracers.split(",")
    results: dict[str, list[dict]] = {t: [] for t in tracers}
    with exclusive_ksm():
        run_rounds(args, tracers, results)
    report(args, results)


def run_rounds(args: argparse.Namespace, tracers: list[str], results: dict[str, list[dict]]) -> None:
    saved = {k: (KSM / k).read_text().strip() for k in KNOBS}
    saved_stats = BPF_STATS.read_text().strip()
    resident = None
    try:
        if args.probe_cost:
            BPF_STATS.write_text("1")
        for k, v in KNOBS.items():
            (KSM / k).write_text(v)
        if args.resident:
            resident = subprocess.Popen([sys.executable, str(WORKLOAD), str(args.resident)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            pid = int(resident.stdout.readline().split()[1])
            wait(lambda: merging_pages(pid) >= args.resident, what="resident merges")
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(args.rounds):
                for kind in tracers:
                    tracer = Tracer(kind, Path(tmp))
                    tracer.start_trial()
                    r = trial(args.pages, args.cow, args.storm_ksmd == "run")
                    r.update(tracer.cost())
                    r.update(tracer.stop())
                    results[kind].append(r)
                    print(f"round {rnd} {kind:<9} {json.dumps(r)}", flush=True)
    finally:
        if resident is not None:
            resident.kill()
            resident.wait()
        for k in ("run", "pages_to_scan", "sleep_millisecs"):
            (KSM / k).write_text(saved[k])
        BPF_STATS.write_text(saved_stats)


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    """Per tracer and measure: the median, its ratio to the untraced median; the ratios of each
    round's trial to the untraced trial of the same round (median, and lowest..highest); the
    lowest trial and its ratio to the lowest untraced one. The untraced rounds alone vary by
    ±10-25 % here (the host's noise only ever adds time, so the lowest trials are the least
    disturbed), and a round's trials run seconds apart."""
    none = results.get("none", [])
    keys = [k for k in ("merge_s", "cow_s", "cow_cpu_s") if none and k in none[0]]
    print(f"\n{args.pages} pages, {args.cow} COW breaks, {args.rounds} rounds (medians; per-round "
          "ratios: median, lowest..highest; the lowest trials)"
          + (f", {args.resident} resident pages in KSM" if args.resident else "")
          + (f", ksmd {'scanning' if args.storm_ksmd == 'run' else 'stopped'} in the storm"
             if args.cow else ""))
    for kind, rs in results.items():
        cells = []
        for key in keys:
            med, low = statistics.median(r[key] for r in rs), min(r[key] for r in rs)
            ratio = (med / statistics.median(r[key] for r in none) - 1) * 100
            cell = f"{key} {med:.3f} s ({ratio:+.1f} %"
            if kind != "none":
                paired = sorted((r[key] / n[key] - 1) * 100 for r, n in zip(rs, none))
                cell += f"; {statistics.median(paired):+.1f}, {paired[0]:+.1f}..{paired[-1]:+.1f}"
            low_ratio = (low / min(r[key] for r in none) - 1) * 100
            cells.append(cell + f"; lowest {low:.3f} s, {low_ratio:+.1f} %)")
        for key, unit in (("tracer_cpu_s", "s"), ("probe_ms", "ms")):
            if all(key in r for r in rs):
                cells.append(f"{key} {statistics.median(r[key] for r in rs):g} {unit}")
        print(f"{kind:<9} " + "  ".join(cells))


if __name__ == "__main__":
    main()
