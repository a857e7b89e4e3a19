"""Read a BPF ring buffer in bulk: its pages mapped into this process, records copied out into a
numpy structured array per call, no Python callback per record.

bcc 0.26's RingBuf only offers libbpf's consume with a ctypes callback per record (~1 µs of
Python each, which at ~250 k records/s is a quarter of a CPU). The ring's layout is the kernel's
(kernel/bpf/ringbuf.c, the same as libbpf's ring_buffer__consume reads):

- map offset 0, one page, read-write: the consumer position (u64);
- map offset PAGE_SIZE, read-only: the producer position (u64), then from the next page the
  data area, mapped twice in a row so a record that wraps is contiguous;
- each record: an 8-byte header (u32 length with BUSY (bit 31: reserved, not yet committed) and
  DISCARD (bit 30) flags, u32 page offset), the sample, padded to 8 bytes.

This reader takes rings whose records all have one size (the probe writes one struct): it reads
the headers first, stops at the first record still being written (busy), then copies the
committed records at once and moves the consumer position past them. Positions are read and
written as single aligned 8-byte loads and stores (numpy views of the mapped pages).
"""

from __future__ import annotations

import mmap

import numpy as np

HDR_SIZE = 8
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30


class RingBufError(Exception):
    pass


def record_dtype(sample: np.dtype) -> np.dtype:
    """The dtype of one record in the ring: the header, then `sample`, padded to 8 bytes."""
    fields = [("rb_len", "<u4"), ("rb_pg_off", "<u4")]
    fields += [(name, sample.fields[name][0]) for name in sample.names]
    size = (HDR_SIZE + sample.itemsize + 7) & ~7
    return np.dtype({"names": [f[0] for f in fields], "formats": [f[1] for f in fields],
                     "offsets": [0, 4] + [HDR_SIZE + sample.fields[n][1] for n in sample.names],
                     "itemsize": size})


class RingReader:
    """Bulk reader of one ring whose records all hold a `sample` (a numpy dtype).

    `consumer` (writable), `producer` and `data` are buffers: the mapped pages (open()) or, in
    tests, bytearrays laid out the same way (`data` twice the ring's size)."""

    def __init__(self, consumer, producer, data, size: int, sample: np.dtype):
        if size <= 0 or size & (size - 1):
            raise RingBufError(f"ring size {size} is not a power of 2")
        self.size, self.mask = size, size - 1
        self.sample = np.dtype(sample)
        self.rec = record_dtype(self.sample)
        if size % self.rec.itemsize:
            raise RingBufError(f"ring size {size} is not a multiple of the record size "
                               f"{self.rec.itemsize}")
        self._cons = np.frombuffer(consumer, dtype="<u8", count=1)
        self._prod = np.frombuffer(producer, dtype="<u8", count=1)
        self._data = data
        self._maps: list[mmap.mmap] = []

    @classmethod
    def open(cls, map_fd: int, size: int, sample: np.dtype) -> "RingReader":
        """Map the ring of a BPF_MAP_TYPE_RINGBUF map (its fd and max_entries, in bytes)."""
        page = mmap.PAGESIZE
        cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=0)
        prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                         offset=page)
        reader = cls(cons, memoryview(prod)[:8], memoryview(prod)[page:], size, sample)
        reader._maps = [cons, prod]
        return reader

    def pending(self) -> int:
        """Bytes written by the producer and not yet read."""
        return int(self._prod[0]) - int(self._cons[0])

    def read(self, max_records: int) -> np.ndarray:
        """Up to max_records committed records (fields of `sample`, discarded ones left out),
        oldest first; the consumer position moves past every record returned or discarded."""
        cons = int(self._cons[0])
        prod = int(self._prod[0])
        step = self.rec.itemsize
        avail = prod - cons
        if avail % step:
            raise RingBufError(f"{avail} bytes pending is not a whole number of "
                               f"{step}-byte records: a record of another size is in the ring")
        n = min(avail // step, max_records)
        if n <= 0:
            return np.empty(0, dtype=self.sample)
        off = cons & self.mask
        # Headers first (a record's header is committed after its sample is written), then
        # the samples of the records committed by then.
        lens = np.frombuffer(self._data, dtype="<u4", count=n * (step // 4), offset=off)
        lens = lens[:: step // 4].copy()
        busy = np.flatnonzero(lens & BUSY_BIT)
        if busy.size:
            n = int(busy[0])
            lens = lens[:n]
            if n == 0:
                return np.empty(0, dtype=self.sample)
        if np.any((lens & ~np.uint32(DISCARD_BIT)) != self.sample.itemsize):
            raise RingBufError("a record of another size is in the ring")
        recs = np.frombuffer(self._data, dtype=self.rec, count=n, offset=off).copy()
        self._cons[0] = cons + n * step
        keep = (lens & DISCARD_BIT) == 0
        out = np.empty(int(keep.sum()), dtype=self.sample)
        for name in self.sample.names:
            out[name] = recs[name][keep]
        return out

    def close(self) -> None:
        self._cons = self._prod = self._data = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view still exported: unmapped when it goes
                pass
        self._maps = []

