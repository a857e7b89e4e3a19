"""The one root indirection for every kernel file the tool reads or writes.

Like psutil's PROCFS_PATH and node_exporter's --path.sysfs: all code builds paths through a
`Roots`, so tests and the emulated host point the whole tool at a fixture tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSFS_ENV = "DYNVM_SYSFS_ROOT"
PROCFS_ENV = "DYNVM_PROC_ROOT"


@dataclass(frozen=True)
class Roots:
    sysfs: Path = Path("/sys")
    proc: Path = Path("/proc")

    @classmethod
    def from_env(cls, sysfs: str | os.PathLike | None = None,
                 proc: str | os.PathLike | None = None) -> "Roots":
        """Explicit values win, then $DYNVM_SYSFS_ROOT / $DYNVM_PROC_ROOT, then /sys and /proc."""
        return cls(Path(sysfs or os.environ.get(SYSFS_ENV) or "/sys"),
                   Path(proc or os.environ.get(PROCFS_ENV) or "/proc"))

    def sys(self, *parts: str) -> Path:
        return self.sysfs.joinpath(*parts)

    def procfs(self, *parts: str) -> Path:
        return self.proc.joinpath(*parts)

    @property
    def pone_dir(self) -> Path:
        return self.sys("kernel", "mm", "pone")

    @property
    def ksm_dir(self) -> Path:
        return self.sys("kernel", "mm", "ksm")

    @property
    def is_live(self) -> bool:
        """True when the roots are the real kernel's, not a fixture or emulated tree."""
        return self.sysfs == Path("/sys") and self.proc == Path("/proc")


def page_size() -> int:
    return os.sysconf("SC_PAGESIZE")
