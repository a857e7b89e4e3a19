"""Run the command line in-process (HTTPie's model) and compare with golden files."""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dynvm_trace.cli.main import main
from dynvm_trace.environment import Environment
from dynvm_trace.paths import Roots

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(args: list[str], roots: Roots | None = None) -> Result:
    env = Environment(stdout=io.StringIO(), stderr=io.StringIO(),
                      roots=roots or Roots(Path("/nonexistent-sys"), Path("/nonexistent-proc")))
    code = main([str(a) for a in args], env)
    return Result(code, env.stdout.getvalue(), env.stderr.getvalue())


def normalize(text: str) -> str:
    """Blank out what depends on the machine that ran the test: its kernel, host name and the
    directory the repository is in."""
    text = text.replace(str(REPO), "<repo>")
    return re.sub(r"(?m)^(kernel|host)( +).*$", r"\1\2<machine>", text)


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/golden/NAME; DYNVM_UPDATE_GOLDEN=1 rewrites it after an intended change."""
    path = GOLDEN / name
    if os.environ.get("DYNVM_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def proc_entry(pid: int, comm: str, ksm_stat: str | None = None, cmdline: bytes = b"") -> dict:
    """The files of one process in a fixture proc tree (paths relative to the tree's root)."""
    files: dict[str, str | bytes] = {f"proc/{pid}/comm": comm + "\n",
                                     f"proc/{pid}/cmdline": cmdline or comm.encode() + b"\0"}
    if ksm_stat is not None:
        files[f"proc/{pid}/ksm_stat"] = ksm_stat
    return files
