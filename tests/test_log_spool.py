"""SpooledLogWriter: the log its low-priority child writes is byte for byte the log LogWriter
writes; nothing is left next to the log; a recorder killed mid-run still leaves every batch it
handed over; a log that cannot be written is one LogWriteError (exit code OUTPUT_FAILED)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dynvm_trace import exitcodes
from dynvm_trace.ksm_columns import EVENT, E_COW, E_MERGE_NEW, EventColumns
from dynvm_trace.log_spool import NICE, LogWriteError, SpooledLogWriter, encode
from dynvm_trace.logfile import LogReader, LogWriter, make_header

from cli_helpers import run

HEADER = make_header("ksm", clock="monotonic", page_size=4096, anchor_ts=0, anchor_unix_ns=0)


def batches() -> list[tuple[list[dict], EventColumns | None]]:
    """Three batches: records only; records spliced into 7 column events; columns only."""
    ev = np.zeros(7, dtype=EVENT)
    ev["ts"] = [10, 20, 30, 40, 50, 60, 70]
    ev["pid"] = 42
    ev["addr"] = np.arange(7) * 4096
    ev["kind"] = [E_MERGE_NEW] * 4 + [E_COW] * 3
    cols = EventColumns(ev, lambda pid: {"pid": pid, "comm": "qemu"}, "ksm")
    counters = {"kind": "counters", "ts": 35, "src": "ksm", "group": "ksm", "values": {"run": 1}}
    lost = {"kind": "lost", "ts": 71, "src": "ksm", "count": 0, "where": "ring"}
    tail = np.zeros(2, dtype=EVENT)
    tail["ts"], tail["pid"], tail["kind"] = [80, 90], 43, E_COW
    return [([counters], None), ([counters, lost], cols),
            ([], EventColumns(tail, lambda pid: {"pid": pid}, "ksm"))]


def test_the_same_log_as_log_writer(tmp_path):
    direct, spooled = tmp_path / "direct.jsonl", tmp_path / "spooled.jsonl"
    with LogWriter(direct, HEADER) as w:
        for b in batches():
            w.write(*b)
    s = SpooledLogWriter(spooled, HEADER)
    for b in batches():
        s.write(*b)
        s.flush()
    s.close()
    assert spooled.read_bytes() == direct.read_bytes()
    assert s.records == 3 + 7 + 2 == sum(1 for _ in LogReader(spooled).records())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.jsonl", "spooled.jsonl"]


def test_the_child_runs_at_the_lowest_priority_and_leaves_no_spool(tmp_path):
    s = SpooledLogWriter(tmp_path / "log.jsonl", HEADER)
    try:
        assert os.getpriority(os.PRIO_PROCESS, s._child.pid) == NICE
        assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]  # spool unlinked
    finally:
        s.close()


KILLED = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_log_spool import HEADER, batches
from dynvm_trace.log_spool import SpooledLogWriter
s = SpooledLogWriter({log!r}, HEADER)
for b in batches():
    s.write(*b)
    s.flush()
s.write(*batches()[0])  # written, never handed over
print(s._child.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_recorder_leaves_every_batch_it_handed_over(tmp_path):
    log = tmp_path / "log.jsonl"
    proc = subprocess.run([sys.executable, "-c", KILLED.format(tests=str(Path(__file__).parent),
                                                               log=str(log))],
                          stdout=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    child = int(proc.stdout)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    reader = LogReader(log)
    assert sum(1 for _ in reader.records()) == 3 + 7 + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_the_child_says_why_the_log_cannot_be_written():
    said: list[str] = []
    lines = iter(['{"kind":"header"}\n', "10\n"])
    encode("/nonexistent-dir/x.spool", "/dev/full", lines, said.append)
    assert said == ["error: /dev/full: [Errno 2] No such file or directory: "
                    "'/nonexistent-dir/x.spool'"]


def test_a_full_disk_is_an_error_line(tmp_path):
    spool = tmp_path / "s"
    spool.write_bytes(b"")
    said: list[str] = []
    encode(str(spool), "/dev/full", iter(['{"kind":"header"}\n', "0\n"]), said.append)
    assert said[0] == "ready" and said[1].startswith("error: /dev/full: [Errno 28] No space left")


def test_a_log_the_child_cannot_open_is_log_write_error(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(LogWriteError, match="adir: .*Is a directory"):
        SpooledLogWriter(tmp_path / "adir", HEADER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_record_into_a_missing_directory_is_one_line_and_its_exit_code():
    r = run(["record", "--scenario", "demo", "--duration", "1", "-o", "/nonexistent-dir/x.jsonl"])
    assert r.code == exitcodes.OUTPUT_FAILED == 6
    assert r.err.strip().splitlines()[-1] == ("dynvm-trace: error: /nonexistent-dir/x.jsonl: cannot "
                                              "write there: No such file or directory")
    assert "Traceback" not in r.err
