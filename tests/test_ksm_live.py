"""The ksm source against a live kernel: a workload process stands in for a VM, and the
recorded log must match, page for page, what the workload did and what the kernel counted.

Needs root, BPF, bcc and the ksm:* tracepoints (skips with the reason otherwise; with
DYNVM_REQUIRE_LIVE=1 that skip is a failure). KSM is set to scan fast and restored afterwards,
also when a test fails.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dynvm_trace import bpf_host, capabilities
from dynvm_trace.logfile import LogReader
from dynvm_trace.paths import Roots
from dynvm_trace.procfs import Mapping, read_ksm_stat, read_maps
from dynvm_trace.report import summarize

from ksm_workload import MEMFD_NAME, exclusive_ksm

N, M, K, J = 4099, 1031, 257, 127  # pages merged, COW-broken, released, refaulted
P = 512  # pages of the shared memfd region (punch holes)
WORKLOAD = Path(__file__).with_name("ksm_workload.py")
KSM = Path("/sys/kernel/mm/ksm")
FAST = {"pages_to_scan": "5000", "sleep_millisecs": "10", "run": "1"}
BURST = 262144  # 1 GiB of identical pages: ~250 k merge events/s with BURST_KSM
BURST_KSM = {"pages_to_scan": "20000", "sleep_millisecs": "0", "run": "1"}
TIMEOUT = 60.0
INTERVAL = "0.2"

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def live() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF, KSM knobs)")
    check = capabilities.ksm_source(Roots())
    if not check.ok:
        pytest.skip(f"ksm source unavailable here: {check.detail}")
    with exclusive_ksm():
        yield


@contextmanager
def ksm_knobs(values: dict[str, str]) -> Iterator[None]:
    """KSM knobs set to `values`; every knob changed is put back, whatever happens ("run"
    last on the way in, first on the way out)."""
    saved = {name: (KSM / name).read_text().strip() for name in values}
    try:
        for name, value in values.items():
            (KSM / name).write_text(value)
        yield
    finally:
        for name in ("run", *(n for n in values if n != "run")):
            (KSM / name).write_text(saved[name])


# max_page_sharing above any workload here (a fork doubles one): no KSM page reaches it.
CHAINLESS = "65536"


def write_when_no_ksm_pages(knob: Path, value: str) -> None:
    """KSM takes max_page_sharing only while it has no KSM pages (EBUSY): wait for ksmd (run 1)
    to free the last ones of the previous workload."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            knob.write_text(value)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            if time.monotonic() > deadline:
                raise AssertionError(f"{knob} still busy after {TIMEOUT:.0f} s: another process "
                                     "keeps KSM pages (the live tests need KSM to themselves)") from e
            time.sleep(0.05)


@contextmanager
def without_chains() -> Iterator[None]:
    """max_page_sharing above any workload's pages, put back afterwards, whatever happens.
    With chains (256 by default, so 4099 identical pages make 17 KSM pages), ksmd may move a
    merged page to another KSM page of its chain: a second merge tracepoint for that page,
    which can also race a COW fault of it (docs/ksm-source.md, "Known limits"). The exact
    counts here are of merging and COW-breaking themselves."""
    knob = KSM / "max_page_sharing"
    saved = knob.read_text().strip()
    write_when_no_ksm_pages(knob, CHAINLESS)
    try:
        yield
    finally:
        write_when_no_ksm_pages(knob, saved)


@pytest.fixture
def fast_ksm(live) -> Iterator[None]:
    """KSM scanning fast, without chains, restored afterwards (max_page_sharing while ksmd
    still runs: it frees the last KSM pages)."""
    with ksm_knobs(FAST), without_chains():
        yield


def ksm_value(name: str) -> int:
    return int((KSM / name).read_text())


def wait_for(what: str, cond, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def wait_scans(n: int = 2) -> None:
    """Until ksmd has completed n more full scans: every change so far is in its counters."""
    target = ksm_value("full_scans") + n
    wait_for(f"{n} KSM full scans", lambda: ksm_value("full_scans") >= target)


class Workload:
    def __init__(self, pages: int):
        self.proc = subprocess.Popen([sys.executable, str(WORKLOAD), str(pages)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        self.pid = int(ready[1])

    def do(self, command: str) -> list[str]:
        """Run a command; the words of its answer after "ok"."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer[:1] == ["ok"], answer
        return answer[1:]

    def merging_pages(self, pid: int | None = None) -> int:
        """ksm_merging_pages of this process (or of pid, e.g. its child)."""
        return (read_ksm_stat(Roots(), pid or self.pid) or {}).get("ksm_merging_pages", 0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def dynvm(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).with_name("dynvm-trace")), *args], **kw)


def start_recorder(log: Path, *pids: int, options: tuple[str, ...] = ()) -> subprocess.Popen:
    """`record` of the ksm source (also tracking `pids`), once it has written its first batch."""
    proc = dynvm("record", "--source", "ksm", "--interval", INTERVAL, "-o", str(log), *options,
                 *(arg for pid in pids for arg in ("--pid", str(pid))),
                 stderr=subprocess.PIPE, text=True)
    wait_for(f"{log} to start", lambda: log.exists() and log.read_text().count("\n") >= 2
             or proc.poll() is not None)
    assert proc.poll() is None, proc.stderr.read()
    return proc


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return err


def records(log: Path) -> tuple[dict, list[dict]]:
    reader = LogReader(log)
    return reader.header, list(reader.records())


class Recorded:
    """The recorders and workloads of one live test. stop() waits two intervals (the last
    events into a batch) and ends the recorders with SIGINT, each of which must say its log is
    complete. Leaving the block, whatever happened, kills recorders still running and closes
    the workloads."""

    def __init__(self) -> None:
        self.recorders: list[subprocess.Popen] = []
        self.workloads: list[Workload] = []

    def record(self, log: Path, *pids: int, options: tuple[str, ...] = ()) -> subprocess.Popen:
        self.recorders.append(start_recorder(log, *pids, options=options))
        return self.recorders[-1]

    def workload(self, pages: int) -> Workload:
        self.workloads.append(Workload(pages))
        return self.workloads[-1]

    def stop(self) -> None:
        time.sleep(2 * float(INTERVAL))
        errs = [stop(p) for p in self.recorders]
        assert all("stopped by signal; the log is complete" in e for e in errs), errs

    def __enter__(self) -> "Recorded":
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.recorders:
            if p.poll() is None:
                p.kill()
        for work in self.workloads:
            work.close()


def test_exact_merges_cow_breaks_releases_and_refaults(fast_ksm, tmp_path):
    logs = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    with Recorded() as run:
        # the second runs beside the first, at the normal priority (the first at --nice's default)
        recorders = [run.record(logs[0]), run.record(logs[1], options=("--nice", "0"))]
        assert [os.getpriority(os.PRIO_PROCESS, p.pid) for p in recorders] == [10, 0]
        work = run.workload(N)
        wait_for(f"{N} pages merged", lambda: work.merging_pages() == N)
        wait_scans()
        work.do(f"cow {M}")
        wait_scans()
        work.do(f"release {K}")
        work.do(f"touch {J}")
        wait_scans()
        run.stop()
        assert work.merging_pages() == N - M

    for log in logs:
        header, recs = records(log)
        assert header["source"] == "ksm"
        mine = [r for r in recs if r.get("pid") == work.pid]
        kinds = Counter(r["kind"] for r in mine)
        assert kinds["merge"] == N, (log, kinds)
        assert kinds["cow_break"] == M, (log, kinds)
        assert kinds["unmerge"] == 0, (log, kinds)
        assert sum(r["pages"] for r in mine if r["kind"] == "reclaim_release") == K
        assert kinds["reclaim_refault"] == J, (log, kinds)
        last_merge = max(r["ts"] for r in mine if r["kind"] == "merge")
        assert last_merge < min(r["ts"] for r in mine if r["kind"] == "cow_break")
        assert sum(r["count"] for r in recs if r["kind"] == "lost") == 0

        vmstat = [r["values"]["cow_ksm"] for r in recs if r.get("group") == "vmstat"]
        assert vmstat[-1] - vmstat[0] == M
        stats = [r["values"] for r in recs if r.get("group") == "ksm_stat" and r.get("pid") == work.pid]
        assert stats[-1]["ksm_merging_pages"] == kinds["merge"] - kinds["cow_break"]

        corr = summarize(LogReader(log))["correlation"]
        verdicts = {r["rule"]: r["verdict"] for r in corr["rules"]}
        assert {"ksm merged now", "ksm cow breaks", "ksm stream: merges",
                "ksm stream: cow breaks", "ksm stream: refaults"} <= set(verdicts), verdicts
        assert corr["verdict"] == "agrees", corr


def test_a_release_of_merged_pages_across_many_chunks(fast_ksm, tmp_path):
    """A madvise discard of R merged pages spanning several 512-page chunks (the first and the
    last partial, the ones between whole: the probe marks those without per-page bounds): it
    is one release of R pages, each of the R pages it unmapped is an `unmerge` (released), and
    touching T of them again is exactly T refaults, no COW break."""
    R, T = 2053, 1031  # primes; R pages are at least 5 chunks
    log = tmp_path / "release.jsonl"
    with Recorded() as run:
        run.record(log)
        work = run.workload(N)
        wait_for(f"{N} pages merged", lambda: work.merging_pages() == N)
        wait_scans()
        work.do(f"release {R}")
        work.do(f"touch {T}")
        wait_scans()
        run.stop()
        assert work.merging_pages() == N - R
    _, recs = records(log)
    mine = [r for r in recs if r.get("pid") == work.pid]
    kinds = Counter(r["kind"] for r in mine)
    assert [r["pages"] for r in mine if r["kind"] == "reclaim_release"] == [R]
    assert kinds["merge"] == N and kinds["unmerge"] == R, kinds
    assert {r["reason"] for r in mine if r["kind"] == "unmerge"} == {"released"}
    assert kinds["reclaim_refault"] == T and kinds["cow_break"] == 0, kinds
    assert sum(r["count"] for r in recs if r["kind"] == "lost") == 0
    corr = summarize(LogReader(log))["correlation"]
    assert corr["verdict"] == "agrees", corr


def test_the_merges_of_a_forked_child_are_its_own(fast_ksm, tmp_path):
    """A KSM process forks. KSM enters the child's mm from the parent (ksm_enter fires in the
    parent), and ksmd then merges the child's N pages into its own rmap items: those N merges
    are the child's, the parent keeps its N, and each agrees with its /proc/PID/ksm_stat."""
    log = tmp_path / "fork.jsonl"
    with Recorded() as run:
        run.record(log)
        work = run.workload(N)
        wait_for(f"{N} pages merged", lambda: work.merging_pages() == N)
        child = int(work.do("fork")[0])
        wait_for(f"the child's {N} pages merged", lambda: work.merging_pages(child) == N)
        wait_scans()
        run.stop()
    _, recs = records(log)
    merges = Counter(r["pid"] for r in recs if r["kind"] == "merge")
    assert merges[work.pid] == N and merges[child] == N, merges
    assert sum(r["count"] for r in recs if r["kind"] == "lost") == 0
    stats = {r["pid"]: r["values"]["ksm_merging_pages"] for r in recs
             if r.get("group") == "ksm_stat" and r.get("pid") in (work.pid, child)}
    assert stats == {work.pid: N, child: N}, stats
    corr = summarize(LogReader(log))["correlation"]
    assert corr["verdict"] == "agrees", corr


def record_memfd_workload(log: Path, *commands: str) -> tuple[int, Mapping, dict, list[dict]]:
    """A workload with a shared memfd region of P pages (file-backed guest RAM, as qemu's
    memory-backend-memfd), recorded with its pid tracked while it runs `commands`: its pid, the
    region's mapping, the log's header and records."""
    with Recorded() as run:
        work = run.workload(1)
        work.do(f"memfd {P}")
        ram = [m for m in read_maps(Roots(), work.pid) if MEMFD_NAME in m.path]
        run.record(log, work.pid)
        for command in commands:
            work.do(command)
        run.stop()
    assert len(ram) == 1 and ram[0].shared, ram
    return work.pid, ram[0], *records(log)


def test_refaults_after_a_punch_hole(live, tmp_path):
    """A shared memfd region (file-backed guest RAM, as qemu's memory-backend-memfd): a punch
    hole of K pages is one reclaim_release at the address the file range is mapped at, and
    writing J of them again gives exactly J refaults. The recorder learns the mapping at its
    start, before its first batch."""
    pid, ram, header, recs = record_memfd_workload(tmp_path / "punch.jsonl", f"punch {K}",
                                                   f"mtouch {J}")
    assert pid in header["tracked_pids"]
    mine = [r for r in recs if r.get("pid") == pid]
    releases = [r for r in mine if r["kind"] == "reclaim_release"]
    assert len(releases) == 1, releases
    assert releases[0]["discard"] == "punch_hole" and releases[0]["pages"] == K
    assert releases[0]["offset"] == 0 and releases[0]["addr"] == ram.start, releases
    refaults = [r for r in mine if r["kind"] == "reclaim_refault"]
    ps = header["page_size"]
    assert len(refaults) == J
    assert sorted(r["addr"] for r in refaults) == [ram.start + i * ps for i in range(J)]
    assert sum(r["count"] for r in recs if r["kind"] == "lost") == 0
    probes = [r["values"] for r in recs if r.get("group") == "ksm_probes"]
    assert probes[-1]["punch_untracked_pages"] == probes[0]["punch_untracked_pages"]


def test_cow_breaks_of_pages_merged_before_tracing_started(fast_ksm, tmp_path):
    """All N pages are merged before the recorder starts: it seeds the workload's merged page
    set from /proc at attach time (the header says how many pages), so it sees every one of
    the M COW breaks that follow, and cow_ksm agrees. Its first fault tells the probe its mm
    (it entered KSM before the probes attached): the rmap items ksmd then removes for the
    COW-broken pages are the workload's, not unmerges of an unknown process."""
    log = tmp_path / "seeded.jsonl"
    with Recorded() as run:
        work = run.workload(N)
        wait_for(f"{N} pages merged", lambda: work.merging_pages() == N)
        wait_scans()
        run.record(log)  # returns once the first batch is written: seeded
        work.do(f"cow {M}")
        wait_scans()
        run.stop()
        assert work.merging_pages() == N - M

    header, recs = records(log)
    assert header["seeded_merged_pages"].get(str(work.pid)) == N, header
    assert "seed_incomplete" not in header, header
    mine = [r for r in recs if r.get("pid") == work.pid]
    kinds = Counter(r["kind"] for r in mine)
    assert kinds["cow_break"] == M, kinds
    assert kinds["merge"] == 0 and kinds["unmerge"] == 0, kinds
    assert sum(1 for r in recs if r["kind"] == "cow_break") == M
    assert sum(r["count"] for r in recs if r["kind"] == "lost") == 0

    vmstat = [r["values"]["cow_ksm"] for r in recs if r.get("group") == "vmstat"]
    assert vmstat[-1] - vmstat[0] == M
    corr = summarize(LogReader(log))["correlation"]
    verdicts = {r["rule"]: r["verdict"] for r in corr["rules"]}
    assert verdicts["ksm cow breaks"] == "agrees", corr
    assert verdicts["ksm stream: cow breaks"] == "agrees", corr
    assert corr["verdict"] == "agrees", corr


def test_a_qemu_discard_of_file_backed_ram_is_one_release(live, tmp_path):
    """qemu discards memfd-backed guest RAM with a punch hole and then MADV_DONTNEED of the same
    addresses, in one thread (ram_block_discard_range): one discard of K pages, so one
    reclaim_release (the punch hole's) and the madvise counted in release_repeat only; writing
    J of the pages gives J refaults. A punch hole followed by a madvise of other addresses (the
    anonymous region) stays two releases. The per-VM and correlation figures agree."""
    log = tmp_path / "discard.jsonl"
    pid, ram, header, recs = record_memfd_workload(log, f"discard {K}", f"mtouch {J}",
                                                   f"punch {K}", "release 1")
    mine = [r for r in recs if r.get("pid") == pid]
    releases = [r for r in mine if r["kind"] == "reclaim_release"]
    assert [(r["discard"], r["pages"]) for r in releases] == \
        [("punch_hole", K), ("punch_hole", K), ("madvise", 1)], releases
    assert releases[0]["addr"] == ram.start and releases[1]["addr"] == ram.start
    assert not ram.start <= releases[2]["addr"] < ram.end, releases
    refaults = [r for r in mine if r["kind"] == "reclaim_refault"]
    ps = header["page_size"]
    assert sorted(r["addr"] for r in refaults) == [ram.start + i * ps for i in range(J)]
    assert all(releases[0]["ts"] < r["ts"] < releases[1]["ts"] for r in refaults)
    assert sum(r["count"] for r in recs if r["kind"] == "lost") == 0
    probes = [r["values"] for r in recs if r.get("group") == "ksm_probes"]
    assert probes[-1]["release_repeat"] - probes[0]["release_repeat"] == 1

    summary = summarize(LogReader(log))
    row = next(r for r in summary["vms"] if r["vm"] == f"pid {pid}")
    assert (row["released"], row["refaulted"]) == (2 * K + 1, J), row
    verdicts = {r["rule"]: r["verdict"] for r in summary["correlation"]["rules"]}
    assert verdicts["ksm stream: released pages"] == verdicts["ksm stream: refaults"] == "agrees"


def test_top_mode_a_qemu_discard_is_one_release(live):
    """The same discard in `top` mode (tallies in the kernel, no stream): K released pages in one
    reclaim_release, J refaulted, one release_repeat."""
    from dynvm_trace.aggregators import Aggregates
    from dynvm_trace.sources.ksm import KsmSource

    work = Workload(1)
    src = None
    try:
        work.do(f"memfd {P}")  # mapped before the source starts: its first batch knows it
        src = KsmSource(Roots(), pids=(work.pid,), stream=False)
        agg = Aggregates(4096, 200_000_000)
        discarded = False
        for batch in src.batches(200_000_000, None):
            agg.feed(batch.records, batch.now)
            if not discarded:
                work.do(f"discard {K}")
                work.do(f"mtouch {J}")
                discarded = True
            else:
                src.stop()  # after a snapshot that has them
        counts = src.kernel_counts()
    finally:
        if src is not None:
            src.close()
        work.close()
    row = next(r for r in agg.per_vm.table() if r["vm"] == f"pid {work.pid}")
    assert (row["released"], row["refaulted"]) == (K, J), row
    assert agg.totals.snapshot()["events"]["reclaim_release"] == 1
    assert counts["release_repeat"] == 1 and counts["released_pages"] == K, counts
    verdicts = {r["rule"]: r["verdict"] for r in agg.correlation.snapshot()["rules"]}
    assert verdicts["ksm stream: released pages"] == verdicts["ksm stream: refaults"] == "agrees"


def test_trace_json_lines_while_merging(fast_ksm, tmp_path):
    pages = 512
    errors = tmp_path / "trace.err"
    with open(errors, "w") as err_file:
        trace = dynvm("trace", "--source", "ksm", "--json", "--interval", INTERVAL,
                      stdout=subprocess.PIPE, stderr=err_file, text=True)
    lines: list[str] = []
    # one reader for the whole output (mixing readline() with communicate() loses what
    # readline had buffered), draining it all the time so the tracer never blocks on the pipe
    reader = threading.Thread(target=lambda: lines.extend(trace.stdout), daemon=True)
    reader.start()
    work = None
    try:
        wait_for("the tracer attached (its first batch)", lambda: lines or trace.poll() is not None)
        assert lines, errors.read_text()
        work = Workload(pages)
        wait_for(f"{pages} pages merged", lambda: work.merging_pages() == pages)
        time.sleep(3 * float(INTERVAL))
        trace.send_signal(signal.SIGINT)
        trace.wait(timeout=TIMEOUT)
        reader.join(timeout=TIMEOUT)
    finally:
        if trace.poll() is None:
            trace.kill()
        if work is not None:
            work.close()
    assert trace.returncode == 0, errors.read_text()
    recs = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and "kind" in r and "ts" in r for r in recs)
    merges = [r for r in recs if r["kind"] == "merge" and r.get("pid") == work.pid]
    assert len(merges) == pages
    assert {r["into"] for r in merges} <= {"new", "existing"}


def test_burst_every_merge_logged_when_stopped_mid_burst(live, tmp_path):
    """A 1 GiB merge burst, the recorder (1 s interval) stopped by SIGINT the moment the kernel
    has merged the last page, while it is still taking in and writing the burst: every merge
    the kernel made is in the log (= the in-kernel counter = the rise of pages_shared +
    pages_sharing), none lost, and the last counter snapshot comes after the last merge."""
    log = tmp_path / "burst.jsonl"
    with ksm_knobs(BURST_KSM):
        recorder = dynvm("record", "--source", "ksm", "-o", str(log), stderr=subprocess.PIPE,
                         text=True)
        work = None
        try:
            wait_for(f"{log} to start", lambda: log.exists() and log.read_text().count("\n") >= 2
                     or recorder.poll() is not None)
            assert recorder.poll() is None, recorder.stderr.read()
            work = Workload(BURST)
            wait_for(f"{BURST} pages merged", lambda: work.merging_pages() == BURST, 120)
            err = stop(recorder)  # the workload lives on: nothing unmerges until the end
        finally:
            if recorder.poll() is None:
                recorder.kill()
            if work is not None:
                work.close()
    assert "stopped by signal; the log is complete" in err, err

    _, recs = records(log)
    kinds = Counter(r["kind"] for r in recs)
    mine = sum(1 for r in recs if r["kind"] == "merge" and r.get("pid") == work.pid)
    probes = [r["values"] for r in recs if r.get("group") == "ksm_probes"]
    ksm = [r["values"] for r in recs if r.get("group") == "ksm"]

    def merged(v: dict) -> int:
        return v["merge_new"] + v["merge_existing"] + v["merge_zero"]

    assert sum(r["count"] for r in recs if r["kind"] == "lost") == 0
    assert probes[-1]["dropped"] == 0
    assert mine == BURST, kinds
    assert kinds["merge"] == merged(probes[-1]) - merged(probes[0]), (kinds, probes[-1])
    assert kinds["unmerge"] == probes[-1]["unmerge"] - probes[0]["unmerge"], (kinds, probes[-1])
    sharing = [v["pages_shared"] + v["pages_sharing"] for v in ksm]
    assert sharing[-1] - sharing[0] == kinds["merge"] - kinds["unmerge"], (sharing, kinds)
    last_merge = max(i for i, r in enumerate(recs) if r["kind"] == "merge")
    last_probes = max(i for i, r in enumerate(recs) if r.get("group") == "ksm_probes")
    assert last_probes > last_merge


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "fields"])
def test_top_mode_tallies_in_the_kernel_without_a_stream(fast_ksm, raw):
    """The ksm source as `top` opens it (no ring buffer): per-process tallies read from the
    kernel each interval give the workload's N merges and M COW breaks, also after it exited,
    and agree with the in-kernel totals. Both ways of attaching: raw (where BTF allows, as
    here) and as tracepoints with fields (kernels without BTF)."""
    from dynvm_trace.aggregators import Aggregates
    from dynvm_trace.sources.ksm import KsmSource

    if raw and bpf_host.RAW not in bpf_host.available_tracepoints(Roots()).values():
        pytest.skip("no BTF describing the tracepoints' arguments: nothing attaches raw here")
    src = KsmSource(Roots(), stream=False, raw=raw)
    modes = set(src.tracepoints.values())
    assert bpf_host.RAW in modes if raw else modes == {bpf_host.FIELDS}, src.tracepoints
    agg = Aggregates(4096, 200_000_000)
    work = None
    phase = ["merge"]
    kinds: Counter[str] = Counter()
    exits: list[dict] = []
    try:
        work = Workload(N)
        deadline = time.monotonic() + TIMEOUT
        settle = None
        for batch in src.batches(200_000_000, None):
            agg.feed(batch.records, batch.now)
            kinds.update(r["kind"] for r in batch.records)
            exits += [r for r in batch.records if r["kind"] == "vm_exit"]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out in phase {phase[0]}")
            if phase[0] == "merge" and work.merging_pages() == N:
                work.do(f"cow {M}")
                work.do("exit")  # in the same interval: its last tallies must outlive it
                work.proc.wait()
                phase[0], settle = "exited", time.monotonic() + 1.0
            elif phase[0] == "exited" and time.monotonic() > settle:
                src.stop()
        counts = src.kernel_counts()
    finally:
        src.close()
        if work is not None:
            work.close()
    assert kinds["merge"] == 0 and kinds["cow_break"] == 0 and kinds["tally"] > 0
    row = next(r for r in agg.per_vm.table() if r["vm"] == f"pid {work.pid}")
    assert row["merges"] == N and row["cow_breaks"] == M
    events = agg.totals.snapshot()["events"]
    assert events["merge"] == counts["merge_new"] + counts["merge_existing"] + counts["merge_zero"]
    assert events["cow_break"] == counts["cow_break"]
    assert counts["tally_full"] == 0
    # the exit takes its still-merged pages away: those ksmd removed while the process was
    # still tracked are unmerges, the rest vm_exit's `merged`, so the kernel's fall in
    # pages_sharing + pages_shared is accounted for
    assert [r["pid"] for r in exits] == [work.pid]
    assert exits[0]["merged"] + row["unmerges"] == N - M, (exits, row)


def test_top_mode_correlation_agrees_rule_by_rule(fast_ksm):
    """`top` mode (no stream): a workload merges N pages, COW-breaks M of them and exits; every
    window's tallies are exactly what its counters moved by, so every ksm rule agrees, window by
    window (and `ksm merged now` over the log: the exit is accounted by vm_exit's `merged`)."""
    from dynvm_trace.aggregators import Aggregates
    from dynvm_trace.sources.ksm import KsmSource

    src = KsmSource(Roots(), stream=False)
    agg = Aggregates(4096, 200_000_000)
    work = None
    phase = "merge"
    sharing = lambda: ksm_value("pages_shared") + ksm_value("pages_sharing")  # noqa: E731
    base = sharing()
    try:
        work = Workload(N)
        deadline = time.monotonic() + TIMEOUT
        for batch in src.batches(200_000_000, None):
            agg.feed(batch.records, batch.now)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out in phase {phase}")
            if phase == "merge" and work.merging_pages() == N:
                work.do(f"cow {M}")
                work.do("exit")
                work.proc.wait()
                phase = "exited"
            elif phase == "exited" and sharing() <= base:
                phase = "settled"  # ksmd has dropped the exited process's pages
            elif phase == "settled":
                src.stop()  # after a snapshot that has them
    finally:
        src.close()
        if work is not None:
            work.close()
    corr = agg.correlation.snapshot()
    verdicts = {r["rule"]: r["verdict"] for r in corr["rules"] if r["rule"].startswith("ksm")}
    assert {"ksm merged now", "ksm cow breaks", "ksm stream: merges",
            "ksm stream: cow breaks"} <= set(verdicts), verdicts
    assert set(verdicts.values()) == {"agrees"}, [
        (r["rule"], r["verdict"], r["worst"]) for r in corr["rules"] if r["verdict"] != "agrees"]
    row = next(r for r in agg.per_vm.table() if r["vm"] == f"pid {work.pid}")
    assert row["merges"] == N and row["cow_breaks"] == M
