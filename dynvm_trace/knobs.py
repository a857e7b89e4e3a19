"""The tunables of pone (per dialect) and KSM: list them, validate and set them, read back.

The pone kernel never rejects a write (its store functions ignore parse errors and a scan
period below 5000 is clamped), so a write is only known to have worked after reading the
file back. KSM rejects bad values itself (EINVAL, EBUSY); that is reported as one line.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

from . import exitcodes
from .ksm_sysfs import KSM_COUNTER_FILES
from .paths import Roots
from .pone_sysfs import (DIALECT_FILES, KNOB_DEFAULTS, OPTIONAL_FILES, SIDE_EFFECT_FILES,
                         detect_dialect, parse_value)

PONE = "pone"
KSM = "ksm"


@dataclass(frozen=True)
class KnobSpec:
    interface: str  # PONE or KSM
    name: str  # the file name
    lo: int
    hi: int | None  # None: no upper bound of ours (the kernel may still refuse)
    default: int | None  # None: not known
    optional: bool  # listed only when its file exists

    @property
    def range(self) -> str:
        if self.hi is None:
            return f">= {self.lo}"
        if self.hi - self.lo <= 2:
            return "|".join(str(n) for n in range(self.lo, self.hi + 1))
        return f"{self.lo}..{self.hi}"

    def path(self, roots: Roots) -> Path:
        return (roots.pone_dir if self.interface == PONE else roots.ksm_dir) / self.name


# dialect -> knob -> (lo, hi). Guide: "must be > 5000". virt_release clamps lower values to
# 5000, so 5000 is its effective minimum.
_PONE_RANGES: dict[str, dict[str, tuple[int, int | None]]] = {
    "guide": {"pone_nice": (-20, 19), "pone_daemon_scan_period": (5001, None),
              "pone_daemon_run": (0, 1), "pone_reclaim_run": (0, 1), "pone_run": (0, 1),
              "pone_divide_thread_enable": (0, 1), "pone_daemon_reclaim_period": (1, None)},
    "virt_release": {"pone_run": (0, 1), "pone_recycle_run": (0, 1),
                     "pone_deamon_scan_period": (5000, None),
                     "pone_divide_thread_enable": (0, 1)},
    "early": {},
}
PONE_KNOBS: dict[str, tuple[KnobSpec, ...]] = {
    dialect: tuple(KnobSpec(PONE, name, lo, hi, KNOB_DEFAULTS[dialect][name],
                            name in OPTIONAL_FILES)
                   for name, (lo, hi) in ranges.items())
    for dialect, ranges in _PONE_RANGES.items()
}
KSM_KNOBS: tuple[KnobSpec, ...] = tuple(
    KnobSpec(KSM, name, lo, hi, default, True) for name, lo, hi, default in (
        ("run", 0, 2, 0),
        ("pages_to_scan", 0, None, 100),
        ("sleep_millisecs", 0, None, 20),
        ("max_page_sharing", 2, None, 256),
        ("merge_across_nodes", 0, 1, 1),
        ("use_zero_pages", 0, 1, 0),
        ("smart_scan", 0, 1, 1),
    ))

# Files that are never set: counters, debug and side-effect files.
_PONE_KNOB_NAMES = {name for ranges in _PONE_RANGES.values() for name in ranges}
READ_ONLY = frozenset(
    {name for files in DIALECT_FILES.values() for name in files} - _PONE_KNOB_NAMES
) | frozenset(KSM_COUNTER_FILES)


@dataclass(frozen=True)
class Knob:
    interface: str
    name: str
    value: int | None  # None: could not be read, see reason
    default: int | None  # None: not known (shown as "?")
    range: str
    reason: str | None = None

    @property
    def default_text(self) -> str:
        return "?" if self.default is None else str(self.default)


class KnobError(Exception):
    """A knob could not be set; str() is one line, exit_code an exitcodes constant."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class SetResult:
    interface: str
    name: str
    path: Path
    requested: int
    before: int | None  # None: could not be read before the write
    after: int | None  # None: could not be read back, see readback_error
    readback_error: str | None = None

    @property
    def taken(self) -> bool:
        return self.after == self.requested

    @property
    def message(self) -> str:
        if self.taken:
            return f"{self.name}: {self.before} -> {self.after}"
        if self.after is None:
            return (f"{self.name}: wrote {self.requested} but could not read it back: "
                    f"{self.readback_error}")
        return f"{self.name}: not taken: the kernel kept {self.after}"

    @property
    def exit_code(self) -> int:
        return exitcodes.OK if self.taken else exitcodes.FAILURE


def _specs(roots: Roots) -> list[KnobSpec]:
    """The knobs of this host's interfaces; optional ones only when their file exists."""
    dialect = detect_dialect(roots)
    specs = list(PONE_KNOBS[dialect]) if dialect else []
    if roots.ksm_dir.is_dir():
        specs.extend(KSM_KNOBS)
    return [s for s in specs if not s.optional or s.path(roots).exists()]


def _read(path: Path) -> int:
    return parse_value(path.read_text(encoding="utf-8", errors="replace"))


def _reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing"
    return (e.strerror if isinstance(e, OSError) else None) or str(e)


def list_knobs(roots: Roots) -> list[Knob]:
    """The knobs of the detected interface(s) with their current values (pone first)."""
    knobs = []
    for spec in _specs(roots):
        try:
            value, reason = _read(spec.path(roots)), None
        except (OSError, ValueError) as e:
            value, reason = None, _reason(e)
        knobs.append(Knob(spec.interface, spec.name, value, spec.default, spec.range, reason))
    return knobs


def _write_text(path: Path, text: str) -> None:
    # One write(2) of the whole value, as sysfs stores expect.
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def _validate(spec: KnobSpec, value: str) -> int:
    try:
        n = parse_value(value)
    except ValueError as e:
        raise KnobError(f"{spec.name}: {e}", exitcodes.USAGE) from None
    if n < spec.lo or (spec.hi is not None and n > spec.hi):
        raise KnobError(f"{spec.name}: {n} is out of range ({spec.range})", exitcodes.USAGE)
    return n


def set_knob(roots: Roots, name: str, value: str) -> SetResult:
    """Validate `value`, write it to knob `name`, read it back.

    Raises KnobError for a bad name or value (USAGE), a missing permission (NOT_PERMITTED) or
    a write the kernel refused (FAILURE). A write the kernel accepted but did not apply (pone
    ignores and clamps) is a SetResult with taken False.
    """
    if name in READ_ONLY:
        why = " (reading it changes kernel state)" if name in SIDE_EFFECT_FILES else ""
        raise KnobError(f"{name} is a read-only counter or debug file, not a knob{why}",
                        exitcodes.USAGE)
    specs = {s.name: s for s in _specs(roots)}
    spec = specs.get(name)
    if spec is None:
        valid = ", ".join(specs) or "none"
        raise KnobError(f"unknown knob {name!r}; knobs on this host: {valid}", exitcodes.USAGE)
    n = _validate(spec, value)
    path = spec.path(roots)
    try:
        before = _read(path)
    except (OSError, ValueError):
        before = None
    try:
        _write_text(path, str(n))
    except PermissionError:
        raise KnobError(f"writing {path}: permission denied: run as root",
                        exitcodes.NOT_PERMITTED) from None
    except OSError as e:
        hint = (": the kernel allows this change only while nothing is merged (set run=2 "
                "first)" if e.errno == errno.EBUSY else "")
        raise KnobError(f"writing {path}: the kernel refused {n}: "
                        f"{e.strerror or e}{hint}", exitcodes.FAILURE) from None
    try:
        after, error = _read(path), None
    except (OSError, ValueError) as e:
        after, error = None, _reason(e)
    return SetResult(spec.interface, name, path, n, before, after, error)
