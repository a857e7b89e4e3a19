"""Event log files: JSON Lines (`.jsonl`, or gzip-compressed `.jsonl.gz`), a header first.

Reading streams the file in blocks, so memory stays constant whatever its size; records come
out in batches (lists) because the whole pipeline works on batches.

What is tolerated and what is an error (docs/event-log.md says the same):
- a last line cut short, or a gzip stream that ends early (a recorder killed mid-write):
  a warning, and every complete record before it is read;
- an empty file, a first record that is not a header, an unknown format version, any other
  line that is not a JSON object with a kind, a corrupt gzip stream: LogFormatError naming
  the file and the line.
"""

from __future__ import annotations

import gzip
import os
import platform
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from . import __version__, jsonio
from .events import FORMAT_VERSION

if TYPE_CHECKING:
    from .ksm_columns import EventColumns

FORMAT_NAME = "dynvm-trace-log"
BLOCK = 1 << 20  # bytes read at a time
# Bytes of lines parsed by one orjson call. Records of a small piece stay in the CPU cache
# while the aggregators read them, and the memory they are freed to is reused for the next
# piece instead of being returned to the OS and faulted in again: measured 2x faster than
# parsing whole 1 MiB blocks (docs/performance.md).
PARSE = 1 << 16

Warn = Callable[[str], None]


class LogFormatError(Exception):
    """A log that cannot be read; str() names the file and, where it applies, the line."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path, self.line, self.message = str(path), line, message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


def make_header(source: str, clock: str, page_size: int, anchor_ts: int,
                anchor_unix_ns: int | None = None, **extra: Any) -> dict[str, Any]:
    """The first record of a log. `anchor_ts` on the log's clock happened at `anchor_unix_ns`."""
    uname = platform.uname()
    header = {
        "kind": "header", "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "tool_version": __version__, "source": source, "kernel": uname.release,
        "host": socket.gethostname(), "page_size": page_size, "clock": clock,
        "wall_anchor": {"ts": anchor_ts,
                        "unix_ns": time.time_ns() if anchor_unix_ns is None else anchor_unix_ns},
    }
    header.update(extra)
    return header


def is_gzip(path: str | os.PathLike) -> bool:
    return str(path).endswith(".gz")


class LogWriter:
    """Writes a header, then batches of records. Use as a context manager; close() flushes."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = Path(path)
        self._f: BinaryIO = (gzip.open(self.path, "wb", compresslevel=3) if is_gzip(path)
                             else open(self.path, "wb"))
        self.records = 0
        self._f.write(jsonio.dumps(header) + b"\n")

    def write(self, records: list[dict[str, Any]], columns: EventColumns | None = None) -> None:
        """Records in time order; with a batch's `columns` (Batch.columns), its column events
        too: they go in as the columns' own JSON lines, and the records are spliced in where
        their times fall, after column events of the same time."""
        if columns is None:
            self._f.write(jsonio.dumps_lines(records))
            self.records += len(records)
            return
        view, ends = columns.json_lines()
        cuts = np.searchsorted(columns.ts, [r["ts"] for r in records], side="right")
        parts: list[bytes | memoryview] = []
        done = 0
        for cut, rec in zip(cuts.tolist(), records):
            upto = int(ends[cut - 1]) if cut else 0
            parts += [view[done:upto], jsonio.dumps(rec) + b"\n"]
            done = upto
        parts.append(view[done:])
        self._f.writelines(parts)  # no joined copy of the batch
        self.records += len(columns) + len(records)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "LogWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _blocks(path: Path, warn: Warn) -> Iterator[bytes]:
    """Decompressed bytes of the file, a block at a time (multi-member gzip included)."""
    with open(path, "rb") as f:
        if not is_gzip(path):
            yield from iter(lambda: f.read(BLOCK), b"")
            return
        d = zlib.decompressobj(wbits=31)
        got_data = False
        try:
            for raw in iter(lambda: f.read(BLOCK), b""):
                got_data = True
                out = d.decompress(raw)
                while d.eof and d.unused_data:  # next gzip member
                    rest = d.unused_data
                    d = zlib.decompressobj(wbits=31)
                    out += d.decompress(rest)
                yield out
        except zlib.error as e:
            raise LogFormatError(path, None, f"corrupt gzip stream ({e})") from None
        if got_data and not d.eof:
            warn(f"{path}: gzip stream ends early (recorder killed?); read what was complete")


class LogReader:
    """`header` is read on open; iterate `batches()` for the records."""

    def __init__(self, path: str | os.PathLike, warn: Warn | None = None):
        self.path = Path(path)
        self.warnings: list[str] = []
        self._warn_user: Warn = warn or (lambda msg: None)
        if not self.path.exists():
            raise LogFormatError(path, None, "no such file")
        self._pieces_left = self._pieces()
        self.header = self._read_header()

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self._warn_user(msg)

    def _pieces(self) -> Iterator[tuple[bytes, bool]]:
        """Whole lines, at most about PARSE bytes of them without the last newline, and whether
        that last line ended without one (the end of a file cut short)."""
        carry = b""
        for block in _blocks(self.path, self.warn):
            data = carry + block
            end = data.rfind(b"\n")
            if end < 0:
                carry = data
                continue
            carry = data[end + 1:]
            pos = 0
            while pos <= end:
                stop = data.rfind(b"\n", pos, pos + PARSE) if pos + PARSE < end else end
                if stop < pos:  # a line longer than PARSE
                    stop = data.find(b"\n", pos + PARSE)
                yield data[pos:stop], False
                pos = stop + 1
        if carry:
            yield carry, True

    def _read_header(self) -> dict[str, Any]:
        first = next(self._pieces_left, None)
        line, newline, rest = (b"", b"", b"") if first is None else first[0].partition(b"\n")
        if not line.strip():
            raise LogFormatError(self.path, 1, "empty file: a log starts with a header record")
        try:
            header = jsonio.loads(line)
        except jsonio.JSONDecodeError:
            raise LogFormatError(self.path, 1, "first line is not JSON: not a dynvm-trace log") from None
        if not isinstance(header, dict) or header.get("kind") != "header" \
                or header.get("format") != FORMAT_NAME:
            raise LogFormatError(self.path, 1, "missing header: the first record must be a "
                                               f"{FORMAT_NAME} header")
        version = header.get("version")
        if version != FORMAT_VERSION:
            raise LogFormatError(self.path, 1, f"format version {version!r} is not supported "
                                               f"(this dynvm-trace reads version {FORMAT_VERSION})")
        self._rest = (rest, first[1]) if newline else None
        self._rest_offset = len(line) + 1
        return header

    def batches(self) -> Iterator[list[dict[str, Any]]]:
        """The records, a batch per piece of about PARSE bytes of the file."""
        pieces = self._pieces_left if self._rest is None else chain([self._rest], self._pieces_left)
        offset = self._rest_offset
        for piece, unterminated in pieces:
            batch = self._decode_fast(piece)
            if batch is None:
                batch = self._decode_slowly(offset, piece.split(b"\n"), unterminated)
            if batch:
                yield batch
            offset += len(piece) + 1

    def records(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches():
            yield from batch

    @staticmethod
    def _decode_fast(piece: bytes) -> list[dict] | None:
        """The records of a piece with one parse, or None when a line needs a closer look."""
        try:
            batch = jsonio.loads(b"[" + piece.replace(b"\n", b",") + b"]")
        except jsonio.JSONDecodeError:
            return None
        return batch if all(type(r) is dict and "kind" in r for r in batch) else None

    def _decode_slowly(self, offset: int, lines: list[bytes], unterminated: bool) -> list[dict]:
        """The records of lines that start at byte `offset` of the (decompressed) file, one
        line at a time, to find and name the line that is wrong."""
        batch = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = jsonio.loads(line)
            except jsonio.JSONDecodeError:
                lineno = self._line_at(offset) + i
                if unterminated and i == len(lines) - 1:
                    self.warn(f"{self.path}:{lineno}: last line is cut short (recorder killed?); ignored")
                    continue
                raise LogFormatError(self.path, lineno, "not valid JSON") from None
            if type(rec) is not dict or not isinstance(rec.get("kind"), str):
                raise LogFormatError(self.path, self._line_at(offset) + i,
                                     "not an event record (a JSON object with a kind)")
            batch.append(rec)
        return batch

    def _line_at(self, offset: int) -> int:
        """The number of the line that starts at byte `offset` of the (decompressed) file.
        Only a bad line needs it, so the file is read again rather than counted all along."""
        seen, lineno = 0, 1
        for block in _blocks(self.path, lambda msg: None):
            if seen + len(block) >= offset:
                return lineno + block.count(b"\n", 0, offset - seen)
            lineno += block.count(b"\n")
            seen += len(block)
        return lineno
