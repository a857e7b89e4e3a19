"""The ksm probes' ring buffer records (probes/ksm.c, struct event), and the bulk events of a
batch (merges, unmerges, COW breaks, refaults) kept as those records' columns, not as one dict
per event.

A recorder under a COW-fault storm spent most of its time per event building a dict and encoding
it (~0.8 us an event on the project's machine, docs/performance.md), time taken from the
workload it watches. Here the JSON lines are built column-wise with numpy: the rows that print
alike (same kind, process, optional fields and digit counts) are one fixed-width block filled a
column of characters at a time. The lines are byte for byte what jsonio.dumps_lines writes for
records(), the dicts, which the views still get on demand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import jsonio

# A ring buffer record and its event kinds: keep in step with struct event and the kinds' enum
# in probes/ksm.c.
EVENT = np.dtype([("ts", "<u8"), ("mm", "<u8"), ("pfn", "<u8"), ("addr", "<u8"), ("arg", "<u8"),
                  ("arg2", "<u8"), ("kind", "<u4"), ("pid", "<u4")])
E_MERGE_NEW, E_MERGE_EXISTING, E_MERGE_ZERO, E_MERGE_FAIL, E_UNMERGE, E_SCAN_START, \
    E_SCAN_END, E_ENTER, E_EXIT, E_COW, E_RELEASE, E_REFAULT, E_RELEASE_PAGES = range(13)
BULK_KINDS = (E_MERGE_NEW, E_MERGE_EXISTING, E_MERGE_ZERO, E_UNMERGE, E_COW, E_REFAULT)
_INTO = {E_MERGE_NEW: "new", E_MERGE_EXISTING: "existing", E_MERGE_ZERO: "zero"}
_POW10 = np.array([10 ** i for i in range(20)], dtype=np.uint64)
# the four ASCII digits of 0..9999: numbers are cut into base-10000 limbs (a quarter of the
# divisions of one per digit) and each limb's digits are looked up
_LIMB = np.frombuffer(b"".join(b"%04d" % i for i in range(10000)), dtype=np.uint32)

Who = dict[str, Any]


def _layout(kind: int, src: str, who: Who, has_addr: bool) -> tuple[list[bytes], list[str]]:
    """A row's JSON as constant pieces around its integer fields: pieces[0] column[0] pieces[1]
    column[1] ... pieces[-1], keys in the order records() gives them."""
    fields: list[tuple[str, str | None]] = []  # (key, column); column None: a constant member
    rest: dict[str, Any] = {"src": src, **who}
    if kind in _INTO:
        fields = [("pfn", "pfn"), ("into", None)]
    elif kind == E_UNMERGE:
        rest["reason"] = "ksm page removed"
        fields = [("pfn", "pfn")]
    elif kind == E_REFAULT:
        fields = [("pages", "arg")]
    if has_addr:
        fields.append(("addr", "addr"))
    pieces = [jsonio.dumps({"kind": _kind_name(kind), "ts": 0})[:-2]]  # {"kind":..,"ts":
    columns = ["ts"]
    pending = [jsonio.dumps(rest)[1:-1]]  # constant members not yet in a piece
    for key, column in fields:
        if column is None:
            pending.append(jsonio.dumps({key: _INTO[kind]})[1:-1])
            continue
        pieces.append(b"," + b",".join([*pending, jsonio.dumps(key) + b":"]))
        columns.append(column)
        pending = []
    pieces.append(b"".join(b"," + m for m in pending) + b"}\n")
    return pieces, columns


def _kind_name(kind: int) -> str:
    return ("merge" if kind in _INTO else "unmerge" if kind == E_UNMERGE
            else "cow_break" if kind == E_COW else "reclaim_refault")


def _digits(values: np.ndarray) -> np.ndarray:
    """Decimal digit count of each value (0 has one)."""
    return np.maximum(np.searchsorted(_POW10, values, side="right"), 1)


def _ascii(values: np.ndarray, width: int) -> np.ndarray:
    """The last `width` decimal digits of each value, as ASCII: an (n, width) byte array."""
    limbs = -(-width // 4)
    out = np.empty((len(values), limbs), dtype=np.uint32)  # four ASCII digits each
    rest, limb = values.copy(), np.empty_like(values)  # reused: no fresh arrays per limb
    for k in range(limbs - 1, -1, -1):
        np.divmod(rest, np.uint64(10000), out=(rest, limb))
        out[:, k] = _LIMB[limb]
    return out.view(np.uint8)[:, limbs * 4 - width:]


class EventColumns:
    """Bulk events in time order: a structured array with the ring buffer's fields (ts, pid,
    pfn, addr, arg, kind) and who each pid is (`who(pid)`: pid, comm, vm)."""

    def __init__(self, events: np.ndarray, who: Callable[[int], Who], src: str):
        self.events = events
        self.src = src
        self._whos = {pid: who(pid) for pid in np.unique(events["pid"]).tolist()}

    def __len__(self) -> int:
        return len(self.events)

    @property
    def ts(self) -> np.ndarray:
        return self.events["ts"]

    def kind_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k, n in enumerate(np.bincount(self.events["kind"], minlength=1).tolist()):
            if n:
                out[_kind_name(k)] = out.get(_kind_name(k), 0) + n
        return out

    def records(self) -> list[dict[str, Any]]:
        """The events as records (the event model's dicts)."""
        out = []
        for ts, pid, pfn, addr, arg, kind in zip(*(self.events[c].tolist() for c in (
                "ts", "pid", "pfn", "addr", "arg", "kind"))):
            rec: dict[str, Any] = {"kind": _kind_name(kind), "ts": ts, "src": self.src,
                                   **self._whos[pid]}
            if kind in _INTO:
                rec.update(pfn=pfn, into=_INTO[kind])
            elif kind == E_UNMERGE:
                rec.update(reason="ksm page removed", pfn=pfn)
            elif kind == E_REFAULT:
                rec["pages"] = arg
            if addr:
                rec["addr"] = addr
            out.append(rec)
        return out

    def json_lines(self) -> tuple[memoryview, np.ndarray]:
        """The records' JSON lines (as jsonio.dumps_lines writes them), and where each line
        ends in those bytes. A view, not a copy, where the lines are one block already: a
        recorder touching less fresh memory per event pays fewer page faults."""
        ev = self.events
        n = len(ev)
        if not n:
            return memoryview(b""), np.zeros(0, dtype=np.int64)
        has_addr = ev["addr"] != 0
        shape = (ev["kind"].astype(np.int64) * 2 + has_addr) * (1 << 32) + ev["pid"]
        blocks: list[tuple[np.ndarray, np.ndarray]] = []  # (row indexes, fixed-width rows)
        for s in np.unique(shape).tolist():
            kind, addr_bit, pid = s >> 33, (s >> 32) & 1, s & 0xFFFFFFFF
            pieces, columns = _layout(kind, self.src, self._whos[pid], bool(addr_bit))
            rows = np.flatnonzero(shape == s)
            # rows of one shape whose integers have the same digit counts print alike
            widths = np.stack([_digits(ev[c][rows]) for c in columns], axis=1)
            packed = (widths << (5 * np.arange(len(columns)))).sum(axis=1)
            for key in np.unique(packed).tolist():
                sub = rows[packed == key]
                w = [(key >> (5 * i)) & 31 for i in range(len(columns))]
                blocks.append((sub, self._block(sub, pieces, columns, w)))
        return self._in_order(n, blocks)

    def _block(self, rows: np.ndarray, pieces: list[bytes], columns: list[str],
               widths: list[int]) -> np.ndarray:
        """The lines of `rows` (alike: same pieces, same digit counts) as a 2-D byte array."""
        out = np.empty((len(rows), sum(map(len, pieces)) + sum(widths)), dtype=np.uint8)
        at = 0
        for i, piece in enumerate(pieces):
            out[:, at:at + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            at += len(piece)
            if i < len(columns):
                w = widths[i]
                out[:, at:at + w] = _ascii(self.events[columns[i]][rows], w)
                at += w
        return out

    @staticmethod
    def _in_order(n: int, blocks: list[tuple[np.ndarray, np.ndarray]]) -> tuple[memoryview, np.ndarray]:
        """The blocks' rows put back in time order: one slice per run of consecutive rows
        from the same block. (Gathering byte by byte instead made index arrays of the whole
        output's size, slower for the long runs a recorder sees: ksmd merges a process's pages
        in a row, a faulting process breaks its own in a row.)"""
        if len(blocks) == 1:
            rows, data = blocks[0]
            return memoryview(data.reshape(-1)), np.arange(1, n + 1, dtype=np.int64) * data.shape[1]
        block_of = np.empty(n, dtype=np.int64)
        index_in = np.empty(n, dtype=np.int64)
        for b, (rows, _) in enumerate(blocks):
            block_of[rows] = b
            index_in[rows] = np.arange(len(rows))
        widths = np.array([data.shape[1] for _, data in blocks], dtype=np.int64)
        starts = np.flatnonzero(np.diff(block_of, prepend=-1))
        stops = np.append(starts[1:], n)
        raw = [memoryview(data.reshape(-1)) for _, data in blocks]
        parts = [raw[b][first * widths[b]:(first + stop - start) * widths[b]]
                 for b, first, start, stop in zip(block_of[starts].tolist(),
                                                  index_in[starts].tolist(),
                                                  starts.tolist(), stops.tolist())]
        return memoryview(b"".join(parts)), np.cumsum(widths[block_of])
