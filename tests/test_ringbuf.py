"""The bulk ring buffer reader on hand-built rings laid out as the kernel lays them out."""

from __future__ import annotations

import numpy as np
import pytest

from dynvm_trace.ringbuf import BUSY_BIT, DISCARD_BIT, RingBufError, RingReader, record_dtype

SAMPLE = np.dtype([("ts", "<u8"), ("a", "<u8"), ("kind", "<u4"), ("pid", "<u4")])
SIZE = 1024  # 32 records of 32 bytes (8 header + 24 sample)


class Ring:
    """A producer writing records the way the kernel's ringbuf does, into plain buffers."""

    def __init__(self, size: int = SIZE):
        self.size = size
        self.cons = bytearray(8)
        self.prod = bytearray(8)
        self.data = bytearray(2 * size)  # the data area is mapped twice in a row
        self.rec = record_dtype(SAMPLE)
        self.pos = 0
        self.reader = RingReader(self.cons, self.prod, self.data, size, SAMPLE)

    def write(self, ts: int, flags: int = 0, length: int = SAMPLE.itemsize) -> None:
        rec = np.zeros(1, dtype=self.rec)
        rec["rb_len"] = length | flags
        rec["ts"], rec["a"], rec["kind"], rec["pid"] = ts, ts * 10, ts % 7, 42
        raw = rec.tobytes()
        off = self.pos % self.size
        for base in (off, off + self.size):  # both mappings see the same bytes
            end = min(base + len(raw), 2 * self.size)
            self.data[base:end] = raw[: end - base]
        if off + len(raw) > self.size:  # wrapped: the start of the first mapping too
            self.data[0: off + len(raw) - self.size] = raw[self.size - off:]
        self.pos += self.rec.itemsize
        self.prod[:] = self.pos.to_bytes(8, "little")

    def consumer(self) -> int:
        return int.from_bytes(self.cons, "little")


def test_record_layout():
    rec = record_dtype(SAMPLE)
    assert rec.itemsize == 32 and rec.fields["ts"][1] == 8 and rec.fields["pid"][1] == 28


def test_reads_in_order_with_a_budget_and_moves_the_consumer():
    ring = Ring()
    for ts in range(1, 11):
        ring.write(ts)
    first = ring.reader.read(4)
    assert first["ts"].tolist() == [1, 2, 3, 4] and first["a"].tolist() == [10, 20, 30, 40]
    assert ring.consumer() == 4 * 32
    rest = ring.reader.read(100)
    assert rest["ts"].tolist() == list(range(5, 11)) and (rest["pid"] == 42).all()
    assert ring.consumer() == ring.pos and len(ring.reader.read(100)) == 0


def test_wraps_around_the_end_of_the_ring():
    ring = Ring()
    for ts in range(1, 31):
        ring.write(ts)
    assert len(ring.reader.read(100)) == 30
    for ts in range(31, 51):  # 20 more: past the end of the 32-record ring
        ring.write(ts)
    got = ring.reader.read(100)
    assert got["ts"].tolist() == list(range(31, 51))
    assert got["a"].tolist() == [10 * t for t in range(31, 51)]


def test_stops_at_a_record_still_being_written_and_skips_discarded_ones():
    ring = Ring()
    ring.write(1)
    ring.write(2, DISCARD_BIT)
    ring.write(3)
    ring.write(4, BUSY_BIT)
    ring.write(5)
    assert ring.reader.read(100)["ts"].tolist() == [1, 3]
    assert ring.consumer() == 3 * 32  # past the discarded one, not past the busy one
    assert len(ring.reader.read(100)) == 0
    off = 3 * 32  # the producer commits record 4
    word = int.from_bytes(ring.data[off:off + 4], "little") & ~BUSY_BIT
    ring.data[off:off + 4] = word.to_bytes(4, "little")
    assert ring.reader.read(100)["ts"].tolist() == [4, 5]


def test_a_record_of_another_size_is_an_error():
    ring = Ring()
    ring.write(1, length=16)
    with pytest.raises(RingBufError):
        ring.reader.read(10)


def test_sizes_checked():
    with pytest.raises(RingBufError):
        RingReader(bytearray(8), bytearray(8), bytearray(2000), 1000, SAMPLE)
