"""A process that stands in for a VM on a KSM host, driven line by line on stdin:

    (start)      N identical pages, MADV_MERGEABLE (no THP), then prints "ready PID N"
    cow M        writes distinct bytes into pages 0..M-1 (M COW breaks of merged pages)
    release K    MADV_DONTNEED on pages 0..K-1 (private already: no KSM page is involved)
    touch J      writes distinct bytes into pages 0..J-1 again (J refaults)
    storm S      for S seconds, writes the fill bytes again into every page in turn: each write
                 to a merged page is a COW break, and ksmd merges the page again (same bytes)
    memfd P      a second region, file-backed as qemu's memfd guest RAM is: a memfd of P pages
                 mapped MAP_SHARED (no THP), filled
    punch K      fallocate(PUNCH_HOLE | KEEP_SIZE) of the memfd's pages 0..K-1
    discard K    what qemu's ram_block_discard_range does to such RAM: punch K, then
                 MADV_DONTNEED of the same K pages of the memfd's mapping (same thread)
    mtouch J     writes distinct bytes into the memfd's pages 0..J-1 (J refaults after punch)
    fork         a child process that keeps the mergeable region (its pages are the parent's
                 KSM pages, shared by fork) until it is killed; it dies with this process.
                 Answered with "ok CHILD_PID"
    wait         does nothing (the test polls the kernel meanwhile)
    exit

Each command is answered with "ok". Used by tests/test_ksm_live.py, bench/ksm_overhead.py and bench/ksm_capacity.py.

KSM is host-wide: two live test runs or benchmarks at once see each other's merges and move
each other's counters. `exclusive_ksm()` serialises them (an flock on LOCK_PATH).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOCK_PATH = "/run/lock/dynvm-trace-ksm-live.lock"

FILL = 0x5A  # not zero: use_zero_pages must not matter
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
MEMFD_NAME = "dynvm-guest-ram"


@contextmanager
def exclusive_ksm() -> Iterator[None]:
    """Hold the host's KSM for this process: waits while another live test run or benchmark
    holds it."""
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_salted(mem: mmap.mmap, pages: int, salt: int) -> None:
    """Distinct bytes into each of the first `pages` pages: a write fault on every page."""
    ps = mmap.PAGESIZE
    for i in range(pages):
        mem[i * ps:i * ps + 16] = salt.to_bytes(8, "little") + i.to_bytes(8, "little")


def shared_memfd(pages: int) -> tuple[int, mmap.mmap]:
    """A memfd of `pages` pages mapped shared and filled: guest RAM as qemu backs it with
    memory-backend-memfd."""
    fd = os.memfd_create(MEMFD_NAME)
    os.ftruncate(fd, pages * mmap.PAGESIZE)
    mem = mmap.mmap(fd, pages * mmap.PAGESIZE, flags=mmap.MAP_SHARED)
    mem.madvise(mmap.MADV_NOHUGEPAGE)
    page = bytes([FILL]) * mmap.PAGESIZE
    for _ in range(pages):
        mem.write(page)
    return fd, mem


def punch_hole(fd: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE) of [0, length): Python has no binding for it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fork_child() -> int:
    """A child that only waits, keeping the memory it shares with this process; it is killed
    when this process dies (PR_SET_PDEATHSIG)."""
    child = os.fork()
    if child:
        return child
    try:
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        os.close(0)
        while True:
            signal.pause()
    finally:
        os._exit(0)


def main() -> None:
    n = int(sys.argv[1])
    ps = mmap.PAGESIZE
    mem = mmap.mmap(-1, n * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.madvise(mmap.MADV_NOHUGEPAGE)
    page = bytes([FILL]) * ps
    for _ in range(n):  # a page at a time: no n-page temporary
        mem.write(page)
    mem.madvise(mmap.MADV_MERGEABLE)
    print(f"ready {os.getpid()} {n}", flush=True)
    salt = 0
    memfd, shared = -1, None
    children: list[int] = []
    for line in sys.stdin:
        cmd, *arg = line.split()
        count = int(arg[0]) if arg and cmd != "storm" else 0
        if cmd in ("cow", "touch", "mtouch"):
            salt += 1
            write_salted(shared if cmd == "mtouch" else mem, count, salt)
        elif cmd == "memfd":
            memfd, shared = shared_memfd(count)
        elif cmd == "punch":
            punch_hole(memfd, count * ps)
        elif cmd == "discard":  # qemu's order: the file first, then the mapping
            punch_hole(memfd, count * ps)
            shared.madvise(mmap.MADV_DONTNEED, 0, count * ps)
        elif cmd == "storm":
            import time
            end, same = time.monotonic() + float(arg[0]), bytes([FILL]) * 8
            while time.monotonic() < end:
                for i in range(0, n * ps, ps):
                    mem[i:i + 8] = same
        elif cmd == "release":
            mem.madvise(mmap.MADV_DONTNEED, 0, count * ps)
        elif cmd == "fork":
            child = fork_child()
            children.append(child)
            print(f"ok {child}", flush=True)
            continue
        elif cmd == "exit":
            for child in children:
                os.kill(child, 9)
                os.waitpid(child, 0)
            print("ok", flush=True)
            return
        print("ok", flush=True)


if __name__ == "__main__":
    main()
