"""The emulated /sys/kernel/mm/pone tree: written with pone_sysfs.render_tree, knobs read back.

Files are written under `<sysfs root>/kernel/mm/pone/` atomically (a temporary file in the same
directory, then rename), and only when their content changed. Before each write the knob files
are read back: a value that differs from what we wrote last was written by someone else (an
operator, a test, `dynvm-trace knobs`) and is handed to the model, which stores it the way the
kernel does (bad values ignored, scan periods below 5000 clamped), so the next write shows the
value the kernel would show.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .. import pone_sysfs
from ..paths import Roots
from .scenario import KNOB_FILES


class EmulatedPoneTree:
    def __init__(self, sysfs_root: str | os.PathLike, dialect: str):
        self.roots = Roots(sysfs=Path(sysfs_root))
        self.dir = self.roots.pone_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dialect = dialect
        self._written: dict[str, str] = {}
        # file name -> canonical knob name, for this dialect
        self.knob_files = {files[dialect]: canon for canon, files in KNOB_FILES.items()
                           if files.get(dialect) and files[dialect] in pone_sysfs.KNOB_DEFAULTS[dialect]}

    def knob_values(self, knobs: Mapping[str, int]) -> dict[str, int]:
        """Canonical knobs -> {file name: value} for this dialect."""
        return {f: knobs[c] for f, c in self.knob_files.items() if c in knobs}

    def read_changed_knobs(self) -> dict[str, int]:
        """Canonical knob -> value for every knob file whose content is not what we wrote last
        (and parses as a number; anything else is ignored, as the kernel ignores it)."""
        changed: dict[str, int] = {}
        for fname, canon in self.knob_files.items():
            if fname not in self._written:
                continue
            try:
                text = (self.dir / fname).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if text == self._written[fname]:
                continue
            del self._written[fname]  # rewrite it next time, with the value the kernel keeps
            try:
                changed[canon] = pone_sysfs.parse_value(text)
            except ValueError:
                continue
        return changed

    def write(self, counters: Mapping[str, int], knobs: Mapping[str, int]) -> None:
        files = pone_sysfs.render_tree(self.dialect, counters, self.knob_values(knobs))
        for name, content in files.items():
            if self._written.get(name) == content and (self.dir / name).exists():
                continue
            _atomic_write(self.dir / name, content)
            self._written[name] = content


def _atomic_write(path: Path, content: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
