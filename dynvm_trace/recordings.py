"""Recordings of a real patched kernel (fixtures/pone-virt_release) as counters-only logs.

Two text formats, both printed by scripts run on a Linux 4.4.1 host with the Dynamic VM patch
(the `virt_release` interface, see kernel/pone.md):

- "uptime" (run1-merge-cow.txt): sections `--- pone_info @ uptime T` (T: seconds since boot)
  holding the 34 `pone_info` lines in the kernel's order, then `MemFree:`/`AnonPages:` of
  /proc/meminfo and the workload's `VmRSS:` (kB; any of them may be missing). `=== ` lines say
  what happened; a `--- cat pone_stat_end` section holds the 31 deltas of pone_stat_end, with no
  time. Every other line (workload and shell output) is ignored.
- "ppr" (ppr-release-refault.txt): lines `PPR[ t]: ...` (t: seconds since the workload process
  started); `PPR[ t]: INFO <phase> label=N | label=N ...` carry selected pone_info counters.

The parsers are pure functions of text (`parse_recording`); `recording_to_log` writes the log.
What they make of each line, and the header they write, is in docs/event-log.md ("Imported
recordings"). Malformed input raises RecordingFormatError naming the file and the line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .events import event
from .logfile import LogFormatError, LogWriter, make_header
from .pone_sysfs import PONE_INFO_KEYS, STAT_END_LABELS, normalize_label, parse_value

UPTIME, PPR = "uptime", "ppr"

# What the recordings do not say but a header needs (docs/event-log.md, "Imported recordings").
KERNEL = "4.4.1"  # fixtures/pone-virt_release/README.md: Linux 4.4.1 with the Dynamic VM patch
HOST = "recorded"
# Not printed by the recordings: the recorded host is x86-64 (qemu), whose base page is 4 KiB,
# and run1 agrees (MemFree rose 261,344 kB as 65,535 pages merged: 3.99 kB a page). The header
# says it is assumed (page_size_assumed).
PAGE_SIZE = 4096
CLOCKS = {UPTIME: "uptime", PPR: "workload"}
MEMINFO_GROUP = "meminfo"
MEMINFO_KEYS = ("MemFree", "AnonPages", "VmRSS")
STAT_END_KEYS = tuple(normalize_label(p.rstrip().removesuffix(":")) for p in STAT_END_LABELS)
NS = 1_000_000_000

_SECTION = re.compile(r"--- pone_info @ uptime (?P<t>\S+)\s*")
_STAT_END = re.compile(r"--- cat pone_stat_end\s*")
_MEMINFO = re.compile(r"(?P<key>MemFree|AnonPages|VmRSS):\s*(?P<value>\S+) kB\s*")
_PPR = re.compile(r"PPR\[\s*(?P<t>[^\]]*?)\s*\]: ?(?P<text>.*)")
_PPR_INFO = re.compile(r"INFO (?P<body>.*)")


class RecordingFormatError(LogFormatError):
    """A recording that cannot be imported; str() is `FILE:LINE: message` (or `FILE: message`)."""


@dataclass
class Snapshot:
    """One sample of the recording: ts in ns on the recording's clock, pone_info counters
    (normalized labels), and for the uptime format the meminfo values (kB)."""

    ts: int
    line: int  # where it starts in the recording (1-based)
    pone_info: dict[str, int]
    meminfo: dict[str, int] = field(default_factory=dict)


@dataclass
class Recording:
    format: str  # UPTIME or PPR
    clock: str
    snapshots: list[Snapshot]
    # {"ts": ns, "text": str}: `=== ` lines (and for ppr the other PPR lines, INFO phases
    # included). ts: exact for a PPR line; for a `=== ` line the last sample (or PPR line)
    # before it, left out before the first: the recording does not time those lines.
    annotations: list[dict[str, Any]] = field(default_factory=list)
    # the `--- cat pone_stat_end` section: {"ts": last sample before it, "values": {...}}
    stat_end: dict[str, Any] | None = None

    def records(self, src: str = "pone") -> list[dict[str, Any]]:
        """The log records: per snapshot a pone_info counters record, then (uptime format,
        when the section had them) a meminfo one with the same ts."""
        out = []
        for s in self.snapshots:
            out.append(event("counters", s.ts, src, group="pone_info", values=dict(s.pone_info)))
            if s.meminfo:
                out.append(event("counters", s.ts, src, group=MEMINFO_GROUP,
                                 values=dict(s.meminfo)))
        return out


# ---- helpers -------------------------------------------------------------------------------

def _lines(text: str) -> list[str]:
    """Lines without their ending (LF or CRLF; a serial console may add CRs)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _seconds_ns(text: str) -> int | None:
    """Non-negative decimal seconds -> ns, exactly (no float rounding); None if not a number."""
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        return None
    try:
        return int(Decimal(text) * NS)
    except InvalidOperation:  # pragma: no cover - the pattern above rules it out
        return None


def detect_format(text: str) -> str | None:
    """UPTIME, PPR, or None when the text is neither."""
    for line in _lines(text):
        if _SECTION.fullmatch(line):
            return UPTIME
        m = _PPR.fullmatch(line)
        if m and _PPR_INFO.fullmatch(m["text"]):
            return PPR
    return None


def parse_recording(text: str, path: str | os.PathLike = "<recording>") -> Recording:
    """Parse either format (detected from the content); `path` names the file in errors."""
    if not text.strip():
        raise RecordingFormatError(path, 1, "empty file: not a recording")
    fmt = detect_format(text)
    if fmt == UPTIME:
        return parse_uptime_recording(text, path)
    if fmt == PPR:
        return parse_ppr_recording(text, path)
    raise RecordingFormatError(path, None, "unknown format: no `--- pone_info @ uptime T` "
                                           "section and no `PPR[t]: INFO ...` line")


# ---- run1 style: sections on the uptime clock -----------------------------------------------

def _counter_line(line: str, expected: str, n: int, path: str | os.PathLike,
                  what: str) -> int:
    """The value of a `label: N` line whose normalized label must be `expected`."""
    head, sep, value = line.rpartition(":") if ":" in line else line.rpartition(" ")
    label = normalize_label(head)
    if not sep or label != expected:
        raise RecordingFormatError(path, n, f"{what}: expected `{expected}` here, got "
                                            f"{line.strip()[:60]!r}")
    try:
        return parse_value(value)
    except ValueError as e:
        raise RecordingFormatError(path, n, f"{what}: `{expected}`: {e}") from None


def _block(lines: list[str], start: int, keys: tuple[str, ...], path: str | os.PathLike,
           what: str, opened: int) -> dict[str, int]:
    """The counters of `keys`, one per line in that order, from lines[start:]."""
    values: dict[str, int] = {}
    for i, key in enumerate(keys):
        idx = start + i
        if idx >= len(lines):
            raise RecordingFormatError(
                path, opened, f"{what} is cut short: the file ends after {i} of its "
                              f"{len(keys)} lines (truncated?)")
        # pone_info's last line has no colon: "page recycle count N"
        line = lines[idx]
        if key == "page recycle count" and ":" not in line:
            head, _, value = line.rstrip().rpartition(" ")
            if normalize_label(head) == key:
                try:
                    values[key] = parse_value(value)
                except ValueError as e:
                    raise RecordingFormatError(path, idx + 1, f"{what}: `{key}`: {e}") from None
                continue
        values[key] = _counter_line(line, key, idx + 1, path, what)
    return values


def parse_uptime_recording(text: str, path: str | os.PathLike = "<recording>") -> Recording:
    """run1-merge-cow.txt style: one snapshot per `--- pone_info @ uptime T` section."""
    lines = _lines(text)
    rec = Recording(UPTIME, CLOCKS[UPTIME], [])
    last_ts: int | None = None
    i = 0
    while i < len(lines):
        line, n = lines[i], i + 1
        m = _SECTION.fullmatch(line)
        if m:
            ts = _seconds_ns(m["t"])
            if ts is None:
                raise RecordingFormatError(path, n, f"uptime {m['t']!r} is not a number of seconds")
            if last_ts is not None and ts <= last_ts:
                raise RecordingFormatError(path, n, f"uptime {m['t']} is not after the previous "
                                                    "section's")
            what = f"pone_info section of line {n}"
            info = _block(lines, i + 1, PONE_INFO_KEYS, path, what, n)
            i += 1 + len(PONE_INFO_KEYS)
            meminfo: dict[str, int] = {}
            while i < len(lines) and lines[i].startswith(tuple(k + ":" for k in MEMINFO_KEYS)):
                mm = _MEMINFO.fullmatch(lines[i])
                if mm is None or mm["key"] in meminfo:
                    raise RecordingFormatError(path, i + 1, f"{what}: not a `Key: N kB` line "
                                                            f"(or repeated): {lines[i][:60]!r}")
                try:
                    meminfo[mm["key"]] = parse_value(mm["value"])
                except ValueError as e:
                    raise RecordingFormatError(path, i + 1, f"{what}: {mm['key']}: {e}") from None
                i += 1
            rec.snapshots.append(Snapshot(ts, n, info, meminfo))
            last_ts = ts
            continue
        if _STAT_END.fullmatch(line):
            if rec.stat_end is not None:
                raise RecordingFormatError(path, n, "a second pone_stat_end section")
            values = _block(lines, i + 1, STAT_END_KEYS, path,
                            f"pone_stat_end section of line {n}", n)
            rec.stat_end = ({} if last_ts is None else {"ts": last_ts}) | {"values": values}
            i += 1 + len(STAT_END_KEYS)
            continue
        if line.startswith("--- "):
            raise RecordingFormatError(path, n, f"unknown section {line[:60]!r}")
        if line.startswith("=== "):
            rec.annotations.append(({} if last_ts is None else {"ts": last_ts})
                                   | {"text": line[4:].strip()})
        i += 1
    if not rec.snapshots:  # pragma: no cover - detect_format saw a section
        raise RecordingFormatError(path, None, "no `--- pone_info @ uptime T` section")
    return rec


# ---- ppr style: INFO lines on the workload's clock ------------------------------------------

# Longest first, so "virt page merge count err" wins over "virt page merge count".
_KNOWN_LABELS = sorted(PONE_INFO_KEYS, key=len, reverse=True)


def _split_phase(first_label: str) -> tuple[str, str] | None:
    """("phase", "label") of the text before the first `=`: a known pone_info label at its end,
    the words before it (if any) being the phase."""
    for key in _KNOWN_LABELS:
        if first_label == key:
            return "", key
        if first_label.endswith(" " + key):
            return first_label[: -len(key) - 1].strip(), key
    return None


def _ppr_info(body: str, n: int, path: str | os.PathLike) -> tuple[str, dict[str, int]]:
    values: dict[str, int] = {}
    phase = ""
    for j, part in enumerate(body.split(" | ")):
        label, sep, value = part.partition("=")
        label = normalize_label(label)
        if not sep or not label:
            raise RecordingFormatError(path, n, f"INFO counter {j + 1} is not `label=N`: "
                                                f"{part.strip()[:60]!r}")
        if j == 0:
            split = _split_phase(label)
            if split is None:
                raise RecordingFormatError(
                    path, n, f"INFO: the first counter {label!r} is not a pone_info label "
                             "(cannot tell it from the phase)")
            phase, label = split
        if label in values:
            raise RecordingFormatError(path, n, f"INFO: {label!r} appears twice")
        try:
            values[label] = parse_value(value)
        except ValueError as e:
            raise RecordingFormatError(path, n, f"INFO: {label!r}: {e}") from None
    return phase, values


def parse_ppr_recording(text: str, path: str | os.PathLike = "<recording>") -> Recording:
    """ppr-release-refault.txt style: one snapshot per `PPR[t]: INFO` line. Every INFO line must
    carry the labels of the first one (a line with fewer was cut short)."""
    rec = Recording(PPR, CLOCKS[PPR], [])
    last_ts: int | None = None
    labels: tuple[str, ...] | None = None
    first_info = 0
    for n, line in enumerate(_lines(text), 1):
        if line.startswith("=== "):
            rec.annotations.append(({} if last_ts is None else {"ts": last_ts})
                                   | {"text": line[4:].strip()})
            continue
        m = _PPR.fullmatch(line)
        if m is None:
            if line.startswith("PPR["):
                raise RecordingFormatError(path, n, f"not a `PPR[t]: ...` line: {line[:60]!r}")
            continue  # PPR-DMESG: and other output
        ts = _seconds_ns(m["t"])
        if ts is None:
            raise RecordingFormatError(path, n, f"time {m['t']!r} is not a number of seconds")
        if last_ts is not None and ts < last_ts:
            raise RecordingFormatError(path, n, f"time {m['t']} is before the previous line's")
        last_ts = ts
        info = _PPR_INFO.fullmatch(m["text"])
        if info is None:
            rec.annotations.append({"ts": ts, "text": m["text"].strip()})
            continue
        phase, values = _ppr_info(info["body"], n, path)
        if labels is None:
            labels, first_info = tuple(values), n
        elif tuple(values) != labels:
            missing = [k for k in labels if k not in values]
            extra = [k for k in values if k not in labels]
            raise RecordingFormatError(
                path, n, f"INFO has {len(values)} counters, not the {len(labels)} of line "
                         f"{first_info}" + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "") + " (cut short?)")
        rec.annotations.append({"ts": ts, "text": f"INFO {phase}".rstrip()})
        rec.snapshots.append(Snapshot(ts, n, values))
    if not rec.snapshots:  # pragma: no cover - detect_format saw an INFO line
        raise RecordingFormatError(path, None, "no `PPR[t]: INFO` line")
    return rec


# ---- the log ----------------------------------------------------------------------------------

def recording_header(rec: Recording, path: str | os.PathLike) -> dict[str, Any]:
    """The log header of an imported recording (docs/event-log.md, "Imported recordings")."""
    header = make_header("pone", clock=rec.clock, page_size=PAGE_SIZE, anchor_ts=0,
                         anchor_unix_ns=0, page_size_assumed=True, counters_only=True,
                         recording=Path(path).name, recording_format=rec.format,
                         annotations=rec.annotations)
    header["kernel"], header["host"] = KERNEL, HOST
    header["wall_anchor"] = {"ts": 0, "unix_ns": None}  # the recording gives no wall time
    if rec.stat_end is not None:
        header["pone_stat_end"] = rec.stat_end
    return header


def recording_to_log(text_path: str | os.PathLike, log_path: str | os.PathLike) -> Recording:
    """Parse a recording and write it as a counters-only log (.jsonl or .jsonl.gz). Nothing is
    written when the recording cannot be parsed. Returns what was parsed."""
    path = Path(text_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecordingFormatError(path, None, "no such file") from None
    except IsADirectoryError:
        raise RecordingFormatError(path, None, "is a directory, not a recording") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise RecordingFormatError(path, line, "not UTF-8 text") from None
    rec = parse_recording(text, path)
    with LogWriter(log_path, recording_header(rec, path)) as w:
        w.write(rec.records())
    return rec
