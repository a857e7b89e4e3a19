"""Run dynvm-trace commands in-process against fixture trees, with captured output."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from cli.main import main
from dynvm_trace.environment import Environment
from dynvm_trace.paths import Roots


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(*argv: str, roots: Roots | None = None, is_root: bool = False) -> Result:
    """`dynvm-trace ARGV...` in this process, with the given roots (a fixture tree)."""
    out, err = io.StringIO(), io.StringIO()
    env = Environment(stdout=out, stderr=err, roots=roots or Roots(Path("/nonexistent/sys"),
                                                                   Path("/nonexistent/proc")),
                      is_root=is_root)
    code = main(list(argv), env)
    return Result(code, out.getvalue(), err.getvalue())


def proc_entry(pid: int, comm: str, ksm_stat: str | None = None, cmdline: bytes = b"") -> dict:
    """The files of one process in a fixture proc tree (paths relative to the tree's root)."""
    files: dict[str, str | bytes] = {f"proc/{pid}/comm": comm + "\n",
                                     f"proc/{pid}/cmdline": cmdline or comm.encode() + b"\0"}
    if ksm_stat is not None:
        files[f"proc/{pid}/ksm_stat"] = ksm_stat
    return files
