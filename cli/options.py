"""Options shared by several commands, declared once."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from dynvm_trace.paths import Roots
from dynvm_trace.sources.pacing import parse_speed
from dynvm_trace.sources.select import SOURCE_NAMES, SourceOptions


def _speed(ctx, param, value):  # noqa: ARG001
    try:
        return parse_speed(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _positive(ctx, param, value):  # noqa: ARG001
    if value is not None and value <= 0:
        raise click.BadParameter("must be a positive number of seconds")
    return value


def roots_options(f):
    """--sysfs-root / --proc-root: point every kernel file at another tree (fixtures, emulated)."""
    @click.option("--sysfs-root", type=click.Path(file_okay=False, path_type=Path),
                  help="read /sys from this directory instead ($DYNVM_SYSFS_ROOT)")
    @click.option("--proc-root", type=click.Path(file_okay=False, path_type=Path),
                  help="read /proc from this directory instead ($DYNVM_PROC_ROOT)")
    @functools.wraps(f)
    def wrapper(*args, sysfs_root, proc_root, **kwargs):
        env = click.get_current_context().obj
        if sysfs_root or proc_root:
            env.roots = Roots.from_env(sysfs_root or env.roots.sysfs, proc_root or env.roots.proc)
        return f(*args, **kwargs)
    return wrapper


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="machine-readable output")(f)


def timing_options(default_interval: float = 1.0):
    def decorate(f):
        f = click.option("--duration", type=float, callback=_positive,
                         help="stop after this many seconds (of source time)")(f)
        f = click.option("--interval", type=float, default=default_interval, show_default=True,
                         callback=_positive, help="seconds between updates")(f)
        return f
    return decorate


def source_options(default_speed: str):
    """--source and what each source needs; hands the command a SourceOptions as `source_opts`."""
    def decorate(f):
        @click.option("--source", type=click.Choice(SOURCE_NAMES), default="auto", show_default=True,
                      help="where events come from; auto: pone, then ksm, then the emulated host")
        @click.option("--log", type=click.Path(dir_okay=False, path_type=Path),
                      help="replay: the event log to read")
        @click.option("--scenario", default="demo", show_default=True,
                      help="emulate: a shipped scenario name or a TOML file")
        @click.option("--seed", type=int, default=1, show_default=True, help="emulate: random seed")
        @click.option("--speed", default=default_speed, show_default=True, callback=_speed,
                      help="emulate/replay: 'max' (as fast as possible) or a factor of real time")
        @click.option("--dialect", type=click.Choice(["guide", "virt_release"]),
                      help="emulate: the pone sysfs dialect (default: the scenario's)")
        @click.option("--emulated-sysfs", type=click.Path(file_okay=False, path_type=Path),
                      help="emulate: write the emulated /sys tree here (a sysfs root)")
        @click.option("--pid", "pids", type=int, multiple=True,
                      help="ksm: also track this process's COW breaks, discards and refaults "
                           "(repeat the option)")
        @functools.wraps(f)
        def wrapper(*args, source, log, scenario, seed, speed, dialect, emulated_sysfs, pids,
                    **kwargs):
            opts = SourceOptions(source=source, log=log, scenario=scenario, seed=seed,
                                 speed=speed, dialect=dialect, emulated_sysfs=emulated_sysfs,
                                 pids=pids)
            return f(*args, source_opts=opts, **kwargs)
        return wrapper
    return decorate
