"""Table layout shared by the commands."""

from __future__ import annotations

from rich.table import Table


def table(first: str, *numeric: str, text: tuple[str, ...] = ()) -> Table:
    """A borderless table: text columns (`first`, then `text`), then right-aligned numbers."""
    t = Table(box=None, pad_edge=False, header_style="bold")
    for name in (first, *text):
        t.add_column(name)
    for name in numeric:
        t.add_column(name, justify="right")
    return t
