"""The ksm source's pure parts, without a kernel: compile flags from what the kernel has,
who counts as in KSM, the decoding of ring buffer records into the event model, where a
tracked process maps its fds' files (what the kernel translates punch holes through), and the
seeding of the merged page sets (into a stand-in for the BPF map)."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import struct
from collections import Counter

import numpy as np
import pytest

from dynvm_trace import jsonio
from dynvm_trace.alerts import interleave
from dynvm_trace.bpf_host import FIELDS, RAW, TRACEPOINTS
from dynvm_trace import ksm_columns as kc
from dynvm_trace.logfile import LogWriter
from dynvm_trace.paths import Roots
from dynvm_trace.procfs import Mapping
from dynvm_trace.sources import ksm
from dynvm_trace.sources.base import Batch
from dynvm_trace import ksm_fd_maps
from dynvm_trace.ksm_fd_maps import FdMaps, FileRange, fd_ranges, shared_file_ranges
from dynvm_trace.sources.ksm import EVENT, MAX_CHUNKS, KsmSource, _defines, in_ksm, page_set_chunks


def test_defines_follow_the_tracepoints_present():
    flags = _defines({"ksm:ksm_merge_with_ksm_page": RAW, "ksm:ksm_start_scan": FIELDS,
                      "ksm:ksm_stop_scan": RAW, "ksm:ksm_enter": RAW,
                      "syscalls:sys_enter_madvise": FIELDS}, 24, True, 8)
    assert "-DHAVE_SCAN" in flags and "-DSTREAM" in flags and "-DRMAP_ADDR_OFF=24" in flags
    assert "-DHAVE_ENTER" not in flags  # ksm_exit missing: the pair is not usable
    assert "-DHAVE_MADVISE" not in flags  # sys_exit_madvise missing
    assert "-DRINGBUF_PAGES=8" in flags
    assert not any(f.startswith("-DHAVE_FAULT") for f in flags)
    assert sorted(f for f in flags if f.startswith("-DRAW_")) == [
        "-DRAW_ksm_enter", "-DRAW_ksm_merge_with_ksm_page", "-DRAW_ksm_stop_scan"]


def test_defines_without_btf_or_stream():
    flags = _defines({}, None, False, 8)
    assert "-DRMAP_ADDR_OFF=-1" in flags and "-DSTREAM" not in flags
    assert "-DTASK_MM_OFF=-1" in flags and "-DTASK_MM_OFF=2360" in _defines({}, 24, True, 8, 2360)
    assert not any(f.startswith(("-DHAVE_", "-DRAW_")) for f in flags)


def test_every_raw_program_has_its_define_and_a_fields_twin():
    """Each tracepoint bpf_host may attach raw has a RAW_<name> program in probes/ksm.c, and
    a tracepoint program for when it cannot."""
    source = ksm._probe_source()
    for tp in TRACEPOINTS:
        fields_probe = f"TRACEPOINT_PROBE({tp.system}, {tp.name})"
        assert fields_probe in source, fields_probe
        raw = f"#ifdef RAW_{tp.name}\nRAW_TRACEPOINT_PROBE({tp.name})"
        assert (raw in source) == bool(tp.raw_args), tp.path


# Counter indices of probes/ksm.c whose COUNTERS name is not their own name in lower case.
RENAMED_COUNTERS = {"C_ENTER": "ksm_enter", "C_EXIT": "ksm_exit", "C_COW": "cow_break",
                    "C_RELEASE": "reclaim_release", "C_RELEASE_PAGES": "released_pages",
                    "C_REFAULT": "reclaim_refault", "C_CHUNKS_FULL": "page_set_full"}


def test_counters_name_the_probe_counter_indices_in_order():
    enum = re.search(r"enum \{\s*(C_MERGE_NEW.*?),\s*N_COUNTERS", ksm._probe_source(), re.S)[1]
    indices = [c.strip() for c in enum.split(",")]
    assert [RENAMED_COUNTERS.get(c, c[2:].lower()) for c in indices] == list(ksm.COUNTERS)


def test_in_ksm():
    assert not in_ksm(None) and not in_ksm({})
    assert not in_ksm({"ksm_rmap_items": 0, "ksm_merging_pages": 0, "ksm_mergeable": False})
    assert in_ksm({"ksm_rmap_items": 1})
    assert in_ksm({"ksm_merge_any": True})


def source(tmp_path, make_tree) -> KsmSource:
    """A KsmSource with no kernel behind it: just what taking events in uses."""
    make_tree({"proc/42/comm": "qemu-kvm\n", "proc/7/comm": "python3\n"})
    src = object.__new__(KsmSource)
    src.roots = Roots(tmp_path / "sys", tmp_path / "proc")
    src._chunks, src._comms, src._vm_names = [], {}, {42: "guest1"}
    src._bulk, src._held = [], []
    return src


def decode(src: KsmSource) -> list[dict]:
    """The events taken from the ring as the records of one batch; the JSON lines its columns
    make must be exactly those records' lines."""
    src._take_in()
    batch = src._release_held(None)
    if batch is None:
        return []
    if batch.columns is not None:
        view, ends = batch.columns.json_lines()
        data = bytes(view)
        assert data == jsonio.dumps_lines(batch.columns.records())
        assert ends[-1] == len(data) and len(ends) == len(batch.columns)
    return batch.records


def raw(*events: tuple) -> np.ndarray:
    arr = np.zeros(len(events), dtype=EVENT)
    for i, (ts, kind, pid, pfn, addr, arg, arg2) in enumerate(events):
        arr[i] = (ts, 0xFFFF0000, pfn, addr, arg, arg2, kind, pid)
    return arr


def test_decode_every_kind(tmp_path, make_tree):
    src = source(tmp_path, make_tree)
    neg = lambda e: (-e) & (2**64 - 1)  # noqa: E731 - err as the kernel's s64 in a u64
    src._chunks = [raw(
        (50, kc.E_MERGE_EXISTING, 42, 0x100, 0x7F0000001000, 0, 0),
        (10, kc.E_MERGE_NEW, 42, 0x101, 0x7F0000000000, 0, 0),  # out of order: sorted by ts
        (60, kc.E_MERGE_FAIL, 0, 0x102, 0, neg(errno.EBUSY), 0),
        (70, kc.E_SCAN_START, 0, 0, 0, 9, 1234),
        (80, kc.E_COW, 7, 0, 0x5000, 0, 0),
        (90, kc.E_RELEASE, 7, 0, 0x8000, 4, 1 << 1 | 0),  # madvise, unmapped 1 merged page
        (95, kc.E_RELEASE, 7, 0x200000, 0, 16, 1),         # punch hole, fd not mapped
        (96, kc.E_RELEASE, 7, 0, 0x7F0000400000, 2, 1),    # punch hole at offset 0, mapped
        (99, kc.E_REFAULT, 7, 0, 0x8000, 1, 0),
    ), raw(
        (100, kc.E_ENTER, 7, 0, 0, 0, 0),                   # kept in the kernel: no record
        (110, kc.E_UNMERGE, 0, 0x103, 0, 0, 0),
    )]
    recs = decode(src)
    assert [r["kind"] for r in recs] == ["merge", "merge", "merge_fail", "scan_start",
                                         "cow_break", "unmerge", "reclaim_release",
                                         "reclaim_release", "reclaim_release", "reclaim_refault",
                                         "unmerge"]
    assert src._chunks == []
    new, existing = recs[0], recs[1]
    assert new == {"kind": "merge", "ts": 10, "src": "ksm", "pid": 42, "comm": "qemu-kvm",
                   "vm": "guest1", "pfn": 0x101, "into": "new", "addr": 0x7F0000000000}
    assert existing["into"] == "existing"
    assert recs[2]["reason"] == "EBUSY" and recs[2]["code"] == errno.EBUSY
    assert recs[2]["stage"] == "ksm page" and "pid" not in recs[2]
    assert recs[3]["seq"] == 9 and recs[3]["rmap_entries"] == 1234
    assert recs[4] == {"kind": "cow_break", "ts": 80, "src": "ksm", "pid": 7, "comm": "python3",
                       "addr": 0x5000}
    assert recs[5]["reason"] == "released" and recs[5]["addr"] == 0x8000
    assert recs[6]["pages"] == 4 and recs[6]["discard"] == "madvise"
    assert recs[7]["discard"] == "punch_hole" and recs[7]["offset"] == 0x200000
    assert "addr" not in recs[7]
    assert recs[8] == {"kind": "reclaim_release", "ts": 96, "src": "ksm", "pid": 7,
                       "comm": "python3", "pages": 2, "discard": "punch_hole", "offset": 0,
                       "addr": 0x7F0000400000}
    assert recs[9] == {"kind": "reclaim_refault", "ts": 99, "src": "ksm", "pid": 7,
                       "comm": "python3", "pages": 1, "addr": 0x8000}
    assert recs[10] == {"kind": "unmerge", "ts": 110, "src": "ksm", "reason": "ksm page removed",
                       "pfn": 0x103}


def test_decode_merges_only_in_order_with_field_order(tmp_path, make_tree):
    src = source(tmp_path, make_tree)
    src._chunks = [raw((5, kc.E_MERGE_ZERO, 0, 0x1, 0, 0, 0)),
                   raw((3, kc.E_MERGE_NEW, 42, 0x2, 0x3000, 0, 0))]
    recs = decode(src)
    assert [list(r) for r in recs] == [
        ["kind", "ts", "src", "pid", "comm", "vm", "pfn", "into", "addr"],
        ["kind", "ts", "src", "pfn", "into"]]
    assert [r["into"] for r in recs] == ["new", "zero"]


def test_decode_nothing_and_unknown_errno(tmp_path, make_tree):
    src = source(tmp_path, make_tree)
    assert decode(src) == []
    src._chunks = [raw((1, kc.E_MERGE_FAIL, 0, 0, 0, (-4000) & (2**64 - 1), 1))]
    rec = decode(src)[0]
    assert rec["code"] == 4000 and rec["reason"] == "4000" and rec["stage"] == "zero page"


def test_decode_gone_process_has_pid_but_no_comm(tmp_path, make_tree):
    src = source(tmp_path, make_tree)
    src._chunks = [raw((1, kc.E_COW, 999, 0, 0x1000, 0, 0))]
    assert decode(src)[0] == {"kind": "cow_break", "ts": 1, "src": "ksm", "pid": 999,
                                "addr": 0x1000}


def test_columns_print_what_their_records_print_for_any_mix():
    """Kinds, processes (unknown ones, names to escape), addresses present or not, and numbers
    of every digit count, interleaved row by row: the column-wise lines are the records'."""
    rng = np.random.default_rng(7)
    n = 997
    ev = np.zeros(n, dtype=EVENT)
    ev["ts"] = np.sort(rng.integers(0, 2**63, n, dtype=np.uint64) >> rng.integers(0, 63, n).astype(np.uint64))
    ev["kind"] = rng.choice(kc.BULK_KINDS, n)
    ev["pid"] = rng.choice([0, 7, 42, 4194303], n)
    ev["addr"] = rng.integers(0, 2**47, n) * (rng.random(n) < 0.8)
    ev["pfn"] = rng.integers(0, 2**40, n, dtype=np.uint64)
    ev["arg"] = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    names = {7: {"pid": 7, "comm": 'a "quoted" \\ name'}, 42: {"pid": 42, "comm": "qemu-kvm", "vm": "gä"},
             4194303: {"pid": 4194303}}
    cols = kc.EventColumns(ev, lambda pid: names.get(pid, {}), "ksm")
    view, ends = cols.json_lines()
    data = bytes(view)
    recs = cols.records()
    assert data == jsonio.dumps_lines(recs)
    assert ends.tolist() == np.cumsum([len(jsonio.dumps(r)) + 1 for r in recs]).tolist()
    assert [jsonio.loads(line) for line in data.splitlines()] == recs
    assert cols.kind_counts() == dict(Counter(r["kind"] for r in recs))


def test_writer_splices_listed_records_and_alerts_between_column_lines(tmp_path):
    ev = np.zeros(5, dtype=EVENT)
    ev["ts"] = [10, 20, 30, 30, 40]
    ev["kind"] = kc.E_COW
    ev["pid"] = 7
    ev["addr"] = [0x1000, 0x2000, 0x3000, 0x4000, 0x5000]
    listed = [{"kind": "scan_start", "ts": 5, "src": "ksm", "seq": 1},
              {"kind": "lost", "ts": 30, "src": "ksm", "count": 2},
              {"kind": "counters", "ts": 50, "src": "ksm", "group": "ksm", "values": {}}]
    alerts = [{"kind": "alert", "ts": 21, "src": "ksm", "alert": "x"}]
    batch = Batch(50, listed, kc.EventColumns(ev, lambda pid: {"pid": pid}, "ksm"))
    with LogWriter(tmp_path / "a.jsonl", {"kind": "header"}) as w:
        w.write(interleave(batch.dict_records, alerts), batch.columns)
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines()[1:]
    got = [(r["kind"], r["ts"]) for r in map(jsonio.loads, lines)]
    assert got == [("scan_start", 5), ("cow_break", 10), ("cow_break", 20), ("alert", 21),
                   ("cow_break", 30), ("cow_break", 30), ("lost", 30), ("cow_break", 40),
                   ("counters", 50)]
    assert w.records == 9 and len(batch) == 8
    assert [(r["kind"], r["ts"]) for r in batch.records] == [x for x in got if x[0] != "alert"]
    assert batch.kind_counts() == {"cow_break": 5, "scan_start": 1, "lost": 1, "counters": 1}


def mapping(start: int, end: int, offset: int, inode: int, perms: str = "rw-s") -> Mapping:
    return Mapping(start, end, perms, offset, os.makedev(0, 1), inode, f"/memfd:{inode}")


def test_shared_file_ranges_join_what_continues_in_file_and_memory():
    maps = [mapping(0x7000_0020_0000, 0x7000_0040_0000, 0x20_0000, 9),  # one mmap split in two:
            mapping(0x7000_0000_0000, 0x7000_0020_0000, 0, 9),           # this and the above
            mapping(0x7000_0040_0000, 0x7000_0041_0000, 0x50_0000, 9),  # continues in memory only
            mapping(0x6000_0000_0000, 0x6000_0000_1000, 0x1000, 9),     # below, later in the file
            mapping(0x5000_0000_0000, 0x5000_0010_0000, 0, 8, "rw-p"),  # private
            Mapping(0x4000_0000_0000, 0x4000_0000_1000, "rw-s", 0, 0, 0, "")]  # no file
    dev = os.makedev(0, 1)
    assert shared_file_ranges(maps) == {(dev, 9): [
        FileRange(0, 0x40_0000, 0x7000_0000_0000),
        FileRange(0x1000, 0x1000, 0x6000_0000_0000),
        FileRange(0x50_0000, 0x1_0000, 0x7000_0040_0000)]}
    assert shared_file_ranges([]) == {}


class FakeTable:
    """The bcc table fd_maps as FdMaps uses it."""

    class Leaf(ctypes.Structure):
        class FileMap(ctypes.Structure):
            _fields_ = [("offset", ctypes.c_uint64), ("len", ctypes.c_uint64),
                        ("start", ctypes.c_uint64)]
        _fields_ = [("m", FileMap * ksm_fd_maps.FD_MAPS)]

    def __init__(self):
        self.items: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        self.writes = 0

    @staticmethod
    def Key(pid: int, fd: int) -> tuple[int, int]:  # noqa: N802 - bcc's name
        return pid, fd

    def __setitem__(self, key, leaf) -> None:
        self.items[key] = [(m.offset, m.len, m.start) for m in leaf.m]
        self.writes += 1

    def __delitem__(self, key) -> None:
        del self.items[key]


@pytest.fixture
def fd_maps(tmp_path, make_tree) -> FdMaps:
    """FdMaps over a fake table and a /proc where pid 42 maps a file (fd 3) shared in three
    ranges (fd 4 is not mapped) and a private one (fd 6)."""
    make_tree({"data/ram": "", "data/other": "", "data/private": "", "proc/42/comm": "qemu-kvm\n"})
    fd_dir = tmp_path / "proc/42/fd"
    fd_dir.mkdir()
    for fd, name in ((3, "ram"), (4, "other"), (6, "private")):
        (fd_dir / str(fd)).symlink_to(tmp_path / "data" / name)

    def line(start: int, end: int, offset: int, name: str, perms: str = "rw-s") -> str:
        st = os.stat(tmp_path / "data" / name)
        return (f"{start:x}-{end:x} {perms} {offset:08x} {os.major(st.st_dev):02x}:"
                f"{os.minor(st.st_dev):02x} {st.st_ino} {tmp_path / 'data' / name}\n")
    (tmp_path / "proc/42/maps").write_text(
        line(0x7F0000000000, 0x7F0000200000, 0, "ram")
        + line(0x7F0000400000, 0x7F0000401000, 0x400000, "ram")
        + line(0x7E0000000000, 0x7E0000001000, 0x1000, "ram")
        + line(0x7D0000000000, 0x7D0000001000, 0, "private", "rw-p"))
    return FdMaps(FakeTable(), Roots(tmp_path / "sys", tmp_path / "proc"), lambda msg: None)


def test_fd_ranges_of_a_tracked_process(fd_maps, monkeypatch):
    roots = fd_maps.roots
    assert fd_ranges(roots, 42) == {3: (FileRange(0, 0x200000, 0x7F0000000000),
                                        FileRange(0x1000, 0x1000, 0x7E0000000000),
                                        FileRange(0x400000, 0x1000, 0x7F0000400000))}
    assert fd_ranges(roots, 4242) == {}  # gone
    monkeypatch.setattr(ksm_fd_maps, "FD_MAPS", 2)
    assert len(fd_ranges(roots, 42)[3]) == 2  # the first ones in file order
    # hugetlbfs: its block is the huge page; left out (a huge page refaults in one fault)
    monkeypatch.setattr(ksm_fd_maps, "read_fd_block_size", lambda roots, pid, fd: 2 << 20)
    assert fd_ranges(roots, 42) == {}


def test_refresh_fd_maps_writes_what_changed_and_drops_what_went(fd_maps, tmp_path):
    table = fd_maps.table
    fd_maps.refresh({42})
    assert table.items == {(42, 3): [(0, 0x200000, 0x7F0000000000),
                                     (0x1000, 0x1000, 0x7E0000000000),
                                     (0x400000, 0x1000, 0x7F0000400000),
                                     (0, 0, 0)]}  # len 0: unused
    fd_maps.refresh({42})
    assert table.writes == 1  # nothing changed: nothing written
    fd_maps.refresh(set())  # no longer tracked: its entries go
    assert table.items == {} and fd_maps.written == {}
    fd_maps.refresh({42})
    (tmp_path / "proc/42/fd/3").unlink()  # the fd is closed
    fd_maps.refresh({42})
    assert table.items == {} and fd_maps.written == {}


def test_the_source_refreshes_fd_maps_of_its_tracked_processes_only_with_punch_holes(fd_maps):
    src = object.__new__(KsmSource)
    src.tracked, src._fd_maps = {42}, None  # no fallocate tracepoints: nothing to keep
    src._refresh_fd_maps()
    src._fd_maps = fd_maps
    src._refresh_fd_maps()
    assert list(fd_maps.table.items) == [(42, 3)]


def test_refresh_fd_maps_warns_once_about_an_unreadable_process(fd_maps, monkeypatch):
    src = object.__new__(KsmSource)  # its _warn_once: said the first time only
    warnings: list[str] = []
    src.warn, src._warned = warnings.append, set()
    fd_maps.warn_once = src._warn_once

    def denied(roots, pid):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(ksm_fd_maps, "read_maps", denied)
    fd_maps.refresh({42})
    fd_maps.refresh({42})
    assert warnings == ["cannot read the file mappings of pid 42 (Permission denied): its punch "
                        "holes are counted in punch_untracked_pages"]


def test_page_set_chunks():
    pages = np.array([0x1003, 0, 1, 63, 64, 511, 512 + 130, 0x1003], dtype=np.uint64)
    chunks, words = page_set_chunks(pages)
    assert chunks.tolist() == [0, 1, 8]
    assert words[0].tolist() == [1 | 2 | 1 << 63, 1, 0, 0, 0, 0, 0, 1 << 63]
    assert words[1].tolist() == [0, 0, 1 << 2, 0, 0, 0, 0, 0]  # page 130 of chunk 1
    assert words[2].tolist() == [1 << 3, 0, 0, 0, 0, 0, 0, 0]
    chunks, words = page_set_chunks(np.zeros(0, dtype=np.uint64))
    assert chunks.shape == (0,) and words.shape == (0, 8)


class ChunkKey(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("chunk", ctypes.c_uint64)]


class Bits(ctypes.Structure):
    _fields_ = [("w", ctypes.c_uint64 * 8)]


class MergedMap:
    """Stands in for bcc's table of the `merged` map: Key, Leaf, get, item assignment (a
    full map refuses a new key with a bare Exception, as bcc does)."""
    Key, Leaf = ChunkKey, Bits

    def __init__(self, capacity: int = 1 << 18):
        self.chunks: dict[tuple[int, int], list[int]] = {}
        self.capacity = capacity

    def get(self, key):
        words = self.chunks.get((key.pid, key.chunk))
        return None if words is None else Bits((ctypes.c_uint64 * 8)(*words))

    def __setitem__(self, key, leaf):
        if (key.pid, key.chunk) not in self.chunks and len(self.chunks) >= self.capacity:
            raise Exception("Could not update table: Argument list too long")
        self.chunks[(key.pid, key.chunk)] = list(leaf.w)


KSM_SMAPS = "01000000-01400000 rw-p 00000000 00:00 0\nVmFlags: rd wr mr mw me ac mg\n"


def seeding_source(tmp_path, make_tree, capacity: int = 1 << 18,
                   kpageflags: bool = True) -> tuple[KsmSource, MergedMap, list[str]]:
    """A KsmSource with no kernel behind it: what _seed_merged uses. pid 42 has KSM pages
    0x1000, 0x1001 (chunk 8) and 0x1200 (chunk 9); pid 43 has 0x1000."""
    flags = struct.pack("<8Q", *([0] * 5 + [1 << 21, 0, 0]))  # PFN 5 is a KSM page
    present = 1 << 63
    files = {"proc/42/smaps": KSM_SMAPS,
             "proc/42/pagemap": bytes(8 * 0x1000) + struct.pack("<3Q", present | 5, present | 5,
                                                                present | 6)
             + bytes(8 * 0x1FD) + struct.pack("<Q", present | 5),
             "proc/43/smaps": KSM_SMAPS,
             "proc/43/pagemap": bytes(8 * 0x1000) + struct.pack("<Q", present | 5),
             "proc/44/smaps": KSM_SMAPS}
    if kpageflags:
        files["proc/kpageflags"] = flags
    make_tree(files)
    src = object.__new__(KsmSource)
    src.roots = Roots(tmp_path / "sys", tmp_path / "proc")
    merged = MergedMap(capacity)
    warnings: list[str] = []
    src.bpf, src.warn, src.rmap_addr_off = {"merged": merged}, warnings.append, 24
    src.seeded, src.seed_incomplete = {}, None
    return src, merged, warnings


def test_seed_merged_ors_into_the_page_set(tmp_path, make_tree):
    src, merged, warnings = seeding_source(tmp_path, make_tree)
    merged.chunks[(42, 8)] = [0, 0, 0, 0, 1 << 5, 0, 0, 0]  # a merge seen since the attach
    src._seed_merged({42: {"ksm_merging_pages": 3}, 43: {"ksm_mergeable": True},
                      44: {"ksm_merging_pages": 0},  # nothing merged: not read
                      4242: {"ksm_merging_pages": 9}})  # exited meanwhile
    assert merged.chunks == {(42, 8): [0b11, 0, 0, 0, 1 << 5, 0, 0, 0],
                             (42, 9): [1, 0, 0, 0, 0, 0, 0, 0],
                             (43, 8): [1, 0, 0, 0, 0, 0, 0, 0]}
    assert src.seeded == {42: 3, 43: 1} and warnings == []
    assert src._seed_fields() == {"seeded_merged_pages": {"42": 3, "43": 1}}


def test_seed_merged_without_kpageflags_warns_once(tmp_path, make_tree):
    src, merged, warnings = seeding_source(tmp_path, make_tree, kpageflags=False)
    src._seed_merged({42: {"ksm_merging_pages": 3}, 43: {"ksm_merging_pages": 1}})
    assert merged.chunks == {} and src.seeded == {}
    assert warnings == [f"pages merged before tracing started are not known: no "
                        f"{tmp_path}/proc/kpageflags (a kernel without CONFIG_PROC_PAGE_MONITOR); "
                        f"their COW breaks are not seen"]
    assert src._seed_fields() == {"seeded_merged_pages": {},
                                  "seed_incomplete": src.seed_incomplete}


def test_seed_merged_stops_at_a_full_page_set(tmp_path, make_tree):
    src, merged, warnings = seeding_source(tmp_path, make_tree, capacity=1)
    src._seed_merged({42: {"ksm_merging_pages": 3}, 43: {"ksm_merging_pages": 1}})
    assert list(merged.chunks) == [(42, 8)]
    assert src.seeded == {42: 2}  # not 43: seeding stopped
    assert warnings == [f"pid 42: 1 merged pages, and those of any process after it, are not "
                        f"in the merged page set (Could not update table: Argument list too "
                        f"long; it holds at most {MAX_CHUNKS} chunks); their COW breaks "
                        f"are not seen"]
    assert src._seed_fields()["seed_incomplete"] in warnings[0]


def test_nothing_to_seed_reads_nothing(tmp_path, make_tree):
    src, merged, warnings = seeding_source(tmp_path, make_tree, kpageflags=False)
    src._seed_merged({44: {"ksm_merging_pages": 0}})  # kpageflags is not even opened
    assert merged.chunks == {} and warnings == [] and src.seed_incomplete is None
    assert src._seed_fields() == {"seeded_merged_pages": {}}


def test_no_seed_fields_without_the_rmap_address(tmp_path, make_tree):
    src, _, _ = seeding_source(tmp_path, make_tree)
    src.rmap_addr_off = None  # no COW breaks at all: the source does not seed
    assert src._seed_fields() == {}


def test_tally_counts_missing_from_one_read_are_not_counted_again(tmp_path, make_tree):
    """A process's merges move from its mm's entry to its tallies at ksm_exit; an exit between
    the reads of the two maps leaves them out of that read only."""
    src = source(tmp_path, make_tree)
    src._tallied = {}
    counts = []
    for now in ({(7, kc.E_MERGE_EXISTING): 5}, {}, {(7, kc.E_MERGE_EXISTING): 5},
                {(7, kc.E_MERGE_EXISTING): 6, (7, kc.E_COW): 2}):
        counts.append([r["counts"] for r in src._tally_records(1, 2, now)])
    assert counts == [[{"merge": 5}], [], [], [{"merge": 1, "cow_break": 2}]]
