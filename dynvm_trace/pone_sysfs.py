"""/sys/kernel/mm/pone of the patched kernel: dialects, parsers, the passive poll, renderers.

The parsers are pure functions of text (psutil style); the only file access is in
`detect_dialect`, `read_pone` and `read_stat_end`, always through `Roots`. The renderers are the
inverse of the parsers and print what the kernel prints (byte for byte for `virt_release`, whose
source is public: pone_sys.c); the emulated host uses them to write its sysfs tree.

See kernel/pone.md for the three dialects. Counter dicts use `normalize_label`led labels as
keys and keep the kernel's spelling ("deamon", "fine watch").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .paths import Roots

GUIDE = "guide"
VIRT_RELEASE = "virt_release"
EARLY = "early"

GUIDE_FILES = ("pone_abstract", "pone_nice", "pone_daemon_scan_period", "pone_daemon_run",
               "pone_reclaim_run", "pone_run", "pone_divide_thread_enable", "pone_info",
               "pone_sd_tree", "pone_debug", "pone_stat_begin", "pone_stat_end")
VIRT_RELEASE_FILES = ("pone_run", "pone_recycle_run", "pone_deamon_scan_period",
                      "pone_divide_thread_enable", "pone_info", "pone_stat_begin",
                      "pone_stat_end", "pone_debug", "pone_sd_tree")
EARLY_FILES = ("pone_info", "pone_debug", "pone_sd_tree")
DIALECT_FILES: dict[str, tuple[str, ...]] = {
    GUIDE: GUIDE_FILES, VIRT_RELEASE: VIRT_RELEASE_FILES, EARLY: EARLY_FILES,
}

# Written by the authors' ops scripts on the guide release but not listed by the guide: some
# hosts have it, some do not, so its absence is not worth a reason.
OPTIONAL_FILES = frozenset({"pone_daemon_reclaim_period"})

# The tunables of each dialect and the value the kernel boots with (None: not known).
KNOB_DEFAULTS: dict[str, dict[str, int | None]] = {
    GUIDE: {"pone_nice": 0, "pone_daemon_scan_period": 20000, "pone_daemon_run": 1,
            "pone_reclaim_run": 1, "pone_run": 1, "pone_divide_thread_enable": 1,
            "pone_daemon_reclaim_period": None},
    VIRT_RELEASE: {"pone_run": 1, "pone_recycle_run": 1, "pone_deamon_scan_period": 20000,
                   "pone_divide_thread_enable": 1},
    EARLY: {},
}

# Reading these changes kernel state or walks internal trees and floods the kernel log: no
# poll ever reads them.
SIDE_EFFECT_FILES = frozenset({"pone_stat_begin", "pone_debug", "pone_sd_tree"})
# Passive, but prints deltas against the baseline that a read of pone_stat_begin sets: only
# read on request (read_stat_end).
STAT_END_FILE = "pone_stat_end"

# pone_info of virt_release: what each line prints before its number, in order, exactly as
# pone_sys.c has it (double spaces, "deamon", "fine watch", and no colon on the last line).
PONE_INFO_LABELS = (
    "slice alloc cnt: ",
    "slice change volatile ok cnt: ",
    "slice out que cnt: ",
    "virt page merge count : ",
    "slice que change watch  cnt: ",
    "slice mem  que free cnt: ",
    "slice protect err cnt: ",
    "virt page merge count err : ",
    "slice out watch que cnt: ",
    "slice new insert cnt: ",
    "slice merge cnt: ",
    "slice insert sd tree err cnt: ",
    "slice change ref err  cnt: ",
    "slice fix free cnt: ",
    "slice volatile free cnt: ",
    "slice other free cnt: ",
    "slice watch free cnt: ",
    "slice sys free cnt: ",
    "slice mem watch reuse cnt: ",
    "data map key  cnt: ",
    "data unmap key cnt: ",
    "delete sd tree ok cnt: ",
    "delete sd tree no found cnt: ",
    "delete merge page cnt: ",
    "insert sd tree ok cnt: ",
    "slice pre fix check cnt: ",
    "slice deamon find volatile  cnt: ",
    "slice deamon fine watch cnt: ",
    "slice deamon in que fail  cnt: ",
    "deamon task state: ",
    "slice copy pte  count  : ",
    "slice copy pte1  count  : ",
    "tree page free  cnt: ",
    "page recycle count ",
)
# pone_stat_end prints pone_info's lines 1-29 and 31-32 (as deltas).
STAT_END_LABELS = PONE_INFO_LABELS[:29] + PONE_INFO_LABELS[30:32]

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT = re.compile(r"-?[0-9]+", re.ASCII)
# "label: value" or "label value"; the label may hold spaces (not end in a colon), the value
# may not.
_LINE = re.compile(r"\s*(?P<label>.*?[^\s:])(?:\s*:\s*|\s+)(?P<value>\S+)\s*", re.ASCII)


def normalize_label(label: str) -> str:
    """Collapse runs of whitespace to one space and strip: the key of a counter."""
    return " ".join(label.split())


def _key(printed: str) -> str:
    return normalize_label(printed.rstrip().removesuffix(":"))


PONE_INFO_KEYS = tuple(_key(p) for p in PONE_INFO_LABELS)


def detect_dialect(roots: Roots) -> str | None:
    """The interface dialect of /sys/kernel/mm/pone, or None when it is missing (or holds none
    of the known files)."""
    d = roots.pone_dir
    if (d / "pone_abstract").exists():
        return GUIDE
    if (d / "pone_recycle_run").exists():
        return VIRT_RELEASE
    if (d / "pone_info").exists():
        return EARLY
    return None


def split_line(line: str) -> tuple[str, str] | None:
    """("normalized label", "value text") of a `label: value` or `label value` line, or None."""
    m = _LINE.fullmatch(line)
    if m is None:
        return None
    return normalize_label(m["label"]), m["value"]


def parse_value(text: str) -> int:
    """The number of a single-value file: a signed 64-bit integer, surrounding whitespace
    (none, "\\n", "\\r\\n", spaces) tolerated."""
    s = text.strip()
    if not s:
        raise ValueError("empty value")
    if not _INT.fullmatch(s):
        raise ValueError(f"not an integer: {s[:40]!r}")
    n = int(s)
    if not _INT64_MIN <= n <= _INT64_MAX:
        raise ValueError(f"out of signed 64-bit range: {s[:40]}")
    return n


def parse_counters(text: str, problems: list[str] | None = None) -> dict[str, int]:
    """Counters of pone_info, pone_stat_end or pone_abstract: `label: N` or `label N` lines,
    CRLF or LF, any labels (unknown ones kept).

    Lines that cannot be used (blank, no number, a value outside int64) are skipped and
    described in `problems` when a list is given, so a truncated or garbled file still yields
    every counter it has. A repeated label is reported too; the last value wins.
    """
    def note(n: int, what: str, line: str) -> None:
        if problems is not None:
            problems.append(f"line {n}: {what}: {line.strip()[:60]!r}")

    counters: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        pair = split_line(line)
        if pair is None:
            note(n, "blank line" if not line.strip() else "no value", line)
            continue
        label, value = pair
        try:
            number = parse_value(value)
        except ValueError as e:
            note(n, str(e), line)
            continue
        if label in counters:
            note(n, "repeated label, the last value wins", line)
        counters[label] = number
    return counters


@dataclass
class PoneSnapshot:
    """One passive poll of /sys/kernel/mm/pone.

    `reasons` says what could not be read or parsed (one line each, file name first); the
    rest holds whatever could be.
    """

    dialect: str | None
    knobs: dict[str, int] = field(default_factory=dict)
    info: dict[str, int] = field(default_factory=dict)  # pone_info
    abstract: dict[str, int] = field(default_factory=dict)  # pone_abstract (guide only)
    reasons: list[str] = field(default_factory=list)


def _read(roots: Roots, name: str) -> str:
    return (roots.pone_dir / name).read_text(encoding="utf-8", errors="replace")


def _read_or_reason(roots: Roots, name: str, reasons: list[str]) -> str | None:
    try:
        return _read(roots, name)
    except FileNotFoundError:
        reasons.append(f"{name}: missing")
    except OSError as e:
        reasons.append(f"{name}: {e.strerror or e}")
    return None


def _read_counters(roots: Roots, name: str, reasons: list[str]) -> dict[str, int]:
    text = _read_or_reason(roots, name, reasons)
    if text is None:
        return {}
    problems: list[str] = []
    counters = parse_counters(text, problems)
    reasons.extend(f"{name}: {p}" for p in problems)
    return counters


def read_pone(roots: Roots) -> PoneSnapshot:
    """The passive poll: the dialect, the knobs, pone_info and (guide) pone_abstract.

    Never reads SIDE_EFFECT_FILES nor pone_stat_end. A file that is missing, unreadable or
    garbled becomes a line in `reasons`, never an exception.
    """
    dialect = detect_dialect(roots)
    snap = PoneSnapshot(dialect)
    if dialect is None:
        snap.reasons.append(f"{roots.pone_dir}: missing (not a pone kernel)")
        return snap
    for name in KNOB_DEFAULTS[dialect]:
        if name in OPTIONAL_FILES and not (roots.pone_dir / name).exists():
            continue
        text = _read_or_reason(roots, name, snap.reasons)
        if text is None:
            continue
        try:
            snap.knobs[name] = parse_value(text)
        except ValueError as e:
            snap.reasons.append(f"{name}: {e}")
    snap.info = _read_counters(roots, "pone_info", snap.reasons)
    if dialect == GUIDE:
        snap.abstract = _read_counters(roots, "pone_abstract", snap.reasons)
    return snap


def read_stat_end(roots: Roots, problems: list[str] | None = None) -> dict[str, int]:
    """pone_stat_end: counter deltas since the last read of pone_stat_begin (or since boot).

    Only on explicit request: its meaning depends on who last read pone_stat_begin. Raises
    OSError when the file cannot be read.
    """
    return parse_counters(_read(roots, STAT_END_FILE), problems)


# --- renderers: what the kernel prints, for the emulated host ---------------------------------

def _render_lines(labels: tuple[str, ...], values: Mapping[str, int]) -> str:
    return "".join(f"{printed}{values.get(_key(printed), 0)}\r\n" for printed in labels)


def render_pone_info(values: Mapping[str, int]) -> str:
    """pone_info as virt_release prints it: 34 CRLF lines; a counter not in `values` is 0 and
    keys that pone_info does not print are ignored."""
    return _render_lines(PONE_INFO_LABELS, values)


def render_stat_end(values: Mapping[str, int]) -> str:
    """pone_stat_end as virt_release prints it, `values` being the deltas.

    Like the kernel, "slice out que cnt" is always 0 (pone_sys.c subtracts the counter from
    itself).
    """
    return _render_lines(STAT_END_LABELS, {**values, "slice out que cnt": 0})


def render_value(n: int, dialect: str) -> str:
    """A single-value file. virt_release and early print a bare number with no newline
    (sprintf "%d"). No source of the guide release is public: we print "N\n", the usual
    sysfs convention, so that both layouts run through the parsers."""
    if dialect == GUIDE:
        return f"{n}\n"
    if dialect in (VIRT_RELEASE, EARLY):
        return str(n)
    raise ValueError(f"unknown pone dialect: {dialect!r}")


def render_abstract(merged: int, reclaimed: int) -> str:
    """pone_abstract of the guide release.

    No public copy of the code that prints it exists. This layout is our decision: two CRLF
    lines, "page merge count: N" and "page reclaim count: N", consistent with what is known
    (the authors' scripts take the 4th whitespace field of the line that starts with
    "page reclaim count") and with the kernel's other multi-line files.
    """
    return f"page merge count: {merged}\r\npage reclaim count: {reclaimed}\r\n"


# What the side-effect files print (pone_sys.c): pone_debug prints pone_file_watch, an
# all-ones unsigned long, with "%ld".
_STAT_BEGIN_TEXT = "begin stat\r\n"
_SD_TREE_TEXT = "check dmesg buffer11111"
_DEBUG_VALUE = -1


def render_tree(dialect: str, counters: Mapping[str, int],
                knobs: Mapping[str, int]) -> dict[str, str]:
    """File name -> content of every file of `dialect`'s /sys/kernel/mm/pone.

    `counters` are pone_info's (normalized labels); `knobs` override the boot defaults (a
    knob with an unknown default, pone_daemon_reclaim_period, is only written when given).
    pone_stat_end holds the deltas since boot, which is what the kernel prints before
    pone_stat_begin is first read. For the guide, pone_abstract shows merged pages as
    "slice merge cnt" - "delete merge page cnt" (as the authors' scripts compute them) and
    reclaimed pages as "page recycle count" (pages currently released). The early kernel
    printed a longer pone_info with other labels; its emulated tree uses virt_release's.
    """
    files: dict[str, str] = {}
    for name, default in KNOB_DEFAULTS[dialect].items():
        value = knobs.get(name, default)
        if value is not None:
            files[name] = render_value(value, dialect)
    names = DIALECT_FILES[dialect]
    files["pone_info"] = render_pone_info(counters)
    files["pone_debug"] = render_value(_DEBUG_VALUE, dialect)
    files["pone_sd_tree"] = _SD_TREE_TEXT
    if "pone_stat_end" in names:
        files["pone_stat_end"] = render_stat_end(counters)
        files["pone_stat_begin"] = _STAT_BEGIN_TEXT
    if "pone_abstract" in names:
        files["pone_abstract"] = render_abstract(
            counters.get("slice merge cnt", 0) - counters.get("delete merge page cnt", 0),
            counters.get("page recycle count", 0))
    return files
