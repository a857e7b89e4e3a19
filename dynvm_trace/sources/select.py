"""Open the source a command asked for; `auto` takes the best one this host offers and says why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import capabilities, exitcodes
from ..paths import Roots
from .base import Source, SourceUnavailable

SOURCE_NAMES = ("auto", "pone", "ksm", "emulate", "replay")


@dataclass
class SourceOptions:
    source: str = "auto"
    log: Path | None = None  # replay
    scenario: str = "demo"  # emulate
    seed: int = 1
    speed: float | None = None  # None: as fast as possible
    dialect: str | None = None  # emulate: override the scenario's pone dialect
    emulated_sysfs: Path | None = None  # emulate: where to write the emulated sysfs tree
    pids: tuple[int, ...] = ()  # ksm: processes to track besides those in KSM and qemu
    stream: bool = True  # ksm: every event as a record; False: per-process tallies (top)


def open_source(opts: SourceOptions, roots: Roots, warn=None) -> tuple[Source, str]:
    """The source, and one line saying which it is and why it was picked."""
    name = opts.source
    if name == "auto":
        if opts.log is not None:
            return _open("replay", opts, roots, warn), f"source: replay of {opts.log} (--log given)"
        pick, passed_over = capabilities.auto_source(roots)
        label = "emulate, the emulated host" if pick == "emulate" else pick
        why = "; ".join(passed_over)
        return _open(pick, opts, roots, warn), f"source: {label}" + (f" ({why})" if why else "")
    return _open(name, opts, roots, warn), f"source: {name}"


def _open(name: str, opts: SourceOptions, roots: Roots, warn) -> Source:
    if name == "replay":
        if opts.log is None:
            raise SourceUnavailable("--source replay needs --log FILE", exitcodes.USAGE)
        from .replay import ReplaySource
        return ReplaySource(opts.log, opts.speed, warn)
    if name == "emulate":
        from ..emulator.scenario import load_scenario
        from .emulate import EmulateSource
        return EmulateSource(load_scenario(opts.scenario), seed=opts.seed, speed=opts.speed,
                             dialect=opts.dialect, sysfs_root=opts.emulated_sysfs)
    if name == "pone":
        from .pone import PoneSource
        return PoneSource(roots, warn=warn)
    from .ksm import KsmSource
    return KsmSource(roots, pids=opts.pids, stream=opts.stream, warn=warn)
