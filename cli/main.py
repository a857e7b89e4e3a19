"""The `dynvm-trace` command: one click group; each command lives in a module of this package."""

from __future__ import annotations

import sys

import click

from dynvm_trace import __version__, exitcodes
from dynvm_trace.environment import Environment
from dynvm_trace.logfile import LogFormatError
from dynvm_trace.sources.base import SourceUnavailable

from . import import_cmd, inspect_cmds, live, report_cmds, stream


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dynvm-trace")
def cli() -> None:
    """Trace page merging (pone, KSM) and free page reclaim (ppr, free page reporting) on KVM
    hosts: live, recorded and emulated, per VM, checked against the kernel's own counters."""


for command in (inspect_cmds.doctor, inspect_cmds.status, inspect_cmds.knobs, stream.emulate,
                stream.record, stream.trace, live.top, report_cmds.report, report_cmds.compare,
                import_cmd.import_recording):
    cli.add_command(command)


def _user_error_codes() -> dict[type, int]:
    from dynvm_trace.emulator.scenario import ScenarioError
    return {LogFormatError: exitcodes.BAD_INPUT, ScenarioError: exitcodes.BAD_INPUT,
            PermissionError: exitcodes.NOT_PERMITTED}


def main(argv: list[str] | None = None, env: Environment | None = None) -> int:
    """Run a command line; returns the exit code (tests call this in-process with their env)."""
    env = env or Environment()
    try:
        result = cli.main(args=argv, prog_name="dynvm-trace", obj=env, standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show(file=env.stderr)
        return e.exit_code
    except click.exceptions.Abort:
        return exitcodes.INTERRUPTED
    except SourceUnavailable as e:
        env.error(str(e))
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - user errors are one line; anything else is a bug
        code = getattr(e, "exit_code", None) or next(
            (c for t, c in _user_error_codes().items() if isinstance(e, t)), None)
        if code is None:
            raise
        env.error(str(e))
        return code
    return result if isinstance(result, int) else exitcodes.OK


def entry() -> None:
    sys.exit(main())
