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
from pathlib import Path
from typing import Any, BinaryIO

from . import __version__, jsonio
from .events import FORMAT_VERSION

FORMAT_NAME = "dynvm-trace-log"
BLOCK = 1 << 20  # bytes read at a time

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

    def write(self, records: list[dict[str, Any]]) -> None:
        self._f.write(jsonio.dumps_lines(records))
        self.records += len(records)

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
        self._lines = self._numbered_lines()
        self.header = self._read_header()

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self._warn_user(msg)

    def _numbered_lines(self) -> Iterator[tuple[int, list[bytes], bool]]:
        """(number of the first line, lines, whether the last of them ended without newline)."""
        carry, lineno = b"", 1
        for block in _blocks(self.path, self.warn):
            lines = (carry + block).split(b"\n")
            carry = lines.pop()
            if lines:
                yield lineno, lines, False
                lineno += len(lines)
        if carry:
            yield lineno, [carry], True

    def _read_header(self) -> dict[str, Any]:
        first = next(self._lines, None)
        if first is None or not first[1][0].strip():
            raise LogFormatError(self.path, 1, "empty file: a log starts with a header record")
        start, lines, _ = first
        try:
            header = jsonio.loads(lines[0])
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
        self._rest = (start + 1, lines[1:], False) if len(lines) > 1 else None
        return header

    def batches(self) -> Iterator[list[dict[str, Any]]]:
        if self._rest is not None:
            yield from self._decode(*self._rest)
        for start, lines, unterminated in self._lines:
            yield from self._decode(start, lines, unterminated)

    def records(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches():
            yield from batch

    def _decode(self, start: int, lines: list[bytes], unterminated: bool) -> Iterator[list[dict]]:
        if not lines:
            return
        try:  # fast path: one parse for the whole block
            batch = jsonio.loads(b"[" + b",".join(lines) + b"]")
            if all(type(r) is dict and "kind" in r for r in batch):
                yield batch
                return
        except jsonio.JSONDecodeError:
            pass
        yield self._decode_slowly(start, lines, unterminated)

    def _decode_slowly(self, start: int, lines: list[bytes], unterminated: bool) -> list[dict]:
        batch = []
        for i, line in enumerate(lines):
            lineno = start + i
            if not line.strip():
                continue
            try:
                rec = jsonio.loads(line)
            except jsonio.JSONDecodeError:
                if unterminated and i == len(lines) - 1:
                    self.warn(f"{self.path}:{lineno}: last line is cut short (recorder killed?); ignored")
                    continue
                raise LogFormatError(self.path, lineno, "not valid JSON") from None
            if type(rec) is not dict or not isinstance(rec.get("kind"), str):
                raise LogFormatError(self.path, lineno, "not an event record (a JSON object with a kind)")
            batch.append(rec)
        return batch


def read_log(path: str | os.PathLike, warn: Warn | None = None) -> LogReader:
    return LogReader(path, warn)
