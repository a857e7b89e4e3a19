"""One injected environment for the command line (HTTPie's model): output streams, consoles,
the kernel-file roots. Tests build one around StringIO and run commands in-process."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console

from .paths import Roots

PLAIN_WIDTH = 100  # columns for output that is not a terminal: stable for pipes and golden files


@dataclass
class Environment:
    stdout: TextIO = field(default_factory=lambda: sys.stdout)
    stderr: TextIO = field(default_factory=lambda: sys.stderr)
    roots: Roots = field(default_factory=Roots.from_env)

    def __post_init__(self) -> None:
        self.stdout_isatty = _isatty(self.stdout)
        self.console = _console(self.stdout, self.stdout_isatty)

    def out(self, text: str = "") -> None:
        """Plain text to stdout, exactly as given (no markup, no wrapping)."""
        self.stdout.write(text + "\n")

    def warn(self, message: str) -> None:
        self.stderr.write(f"dynvm-trace: warning: {message}\n")

    def error(self, message: str) -> None:
        self.stderr.write(f"dynvm-trace: error: {message}\n")

    def note(self, message: str) -> None:
        self.stderr.write(f"dynvm-trace: {message}\n")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _console(stream: TextIO, tty: bool) -> Console:
    if tty:
        return Console(file=stream)
    return Console(file=stream, width=PLAIN_WIDTH, no_color=True, highlight=False,
                   force_terminal=False, emoji=False)
