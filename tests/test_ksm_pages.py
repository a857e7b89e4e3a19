"""ksm_pages: mergeable VMAs from smaps, pagemap entries, kpageflags, and the KSM pages of a
process found through them, on literal file contents (truncated and garbled ones included)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from dynvm_trace import ksm_pages
from dynvm_trace.ksm_pages import KsmPageFinder, PagesUnreadable
from dynvm_trace.paths import Roots

PAGE = 4096
SMAPS = ("00400000-00401000 r--p 00000000 08:01 1234                       /usr/bin/python3.11\n"
         "Size:                  4 kB\n"
         "Rss:                   4 kB\n"
         "VmFlags: rd mr mw me dw sd\n"
         "01000000-01004000 rw-p 00000000 00:00 0 \n"
         "Size:                 16 kB\n"
         "Anonymous:            16 kB\n"
         "THPeligible:           0\n"
         "VmFlags: rd wr mr mw me ac sd nh mg\n"
         "01400000-01500000 rw-p 00000000 00:00 0                          [heap]\n"
         "Size:               1024 kB\n"
         "VmFlags: rd wr mr mw me ac sd\n"
         "02000000-02010000 rw-s 00000000 00:01 77                         /memfd:guest (deleted)\n"
         "VmFlags: rd wr sh mr mw me ms sd\n"
         "7ffd0000-7ffd1000 rw-p 00000000 00:00 0                          [stack]\n"
         "VmFlags: rd wr mr mw me gd ac mg\n")
PRESENT, SWAPPED, EXCLUSIVE, SOFT_DIRTY = 1 << 63, 1 << 62, 1 << 56, 1 << 55
KSM, ANON, UPTODATE = 1 << 21, 1 << 12, 1 << 3


def entries(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def test_mergeable_ranges_by_the_mg_flag():
    assert ksm_pages.parse_mergeable_ranges(SMAPS) == [(0x1000000, 0x1004000),
                                                       (0x7FFD0000, 0x7FFD1000)]


def test_mergeable_ranges_merge_any_adds_anonymous_private_vmas():
    # the heap (anonymous, private) too; not the file mapping nor the shared memfd
    assert ksm_pages.parse_mergeable_ranges(SMAPS, merge_any=True) == [
        (0x1000000, 0x1004000), (0x1400000, 0x1500000), (0x7FFD0000, 0x7FFD1000)]


def test_mergeable_ranges_truncated():
    cut = SMAPS[:SMAPS.index("VmFlags: rd wr mr mw me gd ac mg")] + "VmFl"
    assert ksm_pages.parse_mergeable_ranges(cut) == [(0x1000000, 0x1004000)]
    # with merge_any the stack counts without its VmFlags line
    assert ksm_pages.parse_mergeable_ranges(cut, merge_any=True)[-1] == (0x7FFD0000, 0x7FFD1000)
    assert ksm_pages.parse_mergeable_ranges("") == []
    assert ksm_pages.parse_mergeable_ranges("01000000-010") == []


def test_mergeable_ranges_garbled():
    text = ("VmFlags: rd wr mg\n"  # no VMA before it
            "garbage line\n"
            "05000000-04000000 rw-p 00000000 00:00 0\n"  # end before start
            "VmFlags: rd wr mg\n"
            "06000000-06001000 rw-p 00000000 00:00 0\r\n"
            "VmFlags: rd wr mgx\r\n"  # not the mg flag
            "07000000-07002000 rw-p 00000000 00:00 0\r\n"
            "Rss: 8 kB\r\n"
            "VmFlags: rd wr mg\r\n"
            "VmFlags: rd wr mg\n")  # a second VmFlags line: its VMA is counted once
    assert ksm_pages.parse_mergeable_ranges(text) == [(0x7000000, 0x7002000)]


def test_present_pfns():
    data = entries(PRESENT | EXCLUSIVE | 0x1234,   # present: the PFN without the flag bits
                   0,                              # not present
                   SWAPPED | (5 << 5) | 3,         # swapped: no PFN
                   PRESENT | SOFT_DIRTY | ((1 << 55) - 1),
                   PRESENT) + b"\x01\x02\x03"      # present, PFN hidden; a partial entry
    index, pfns = ksm_pages.present_pfns(data)
    assert index.tolist() == [0, 3, 4]
    assert pfns.tolist() == [0x1234, (1 << 55) - 1, 0]
    index, pfns = ksm_pages.present_pfns(b"")
    assert len(index) == len(pfns) == 0


def test_ksm_flags():
    data = entries(KSM | ANON | UPTODATE, ANON | UPTODATE, 0, KSM) + b"\xff" * 7
    assert ksm_pages.ksm_flags(data).tolist() == [True, False, False, True]
    assert ksm_pages.ksm_flags(b"\x00\x00").tolist() == []


def pagemap(first_vpn: int, *values: int) -> bytes:
    """A pagemap file: `values` are the entries of pages first_vpn, first_vpn + 1, ..."""
    return bytes(8 * first_vpn) + entries(*values)


def kpageflags(flags: dict[int, int], pfns: int) -> bytes:
    return entries(*(flags.get(pfn, 0) for pfn in range(pfns)))


FAR = ksm_pages.KPF_WINDOW + 3  # a PFN in the second window of kpageflags


@pytest.fixture
def proc(make_tree):
    mg = "01000000-01004000 rw-p 00000000 00:00 0\nVmFlags: rd wr mr mw me ac mg\n"
    return make_tree({
        "proc/kpageflags": kpageflags({5: KSM | UPTODATE, 6: ANON | UPTODATE, FAR: KSM},
                                      FAR + 1),
        # pages 0x1000-0x1003: KSM page 5, not present, anonymous page 6, KSM page FAR
        "proc/42/smaps": SMAPS,
        "proc/42/pagemap": pagemap(0x1000, PRESENT | 5, 0, PRESENT | EXCLUSIVE | 6,
                                   PRESENT | FAR),
        # maps KSM page 5 too; its pagemap ends (is cut short) after the first page
        "proc/43/smaps": mg,
        "proc/43/pagemap": pagemap(0x1000, PRESENT | 5),
        # an unprivileged reader's view: present, PFN 0
        "proc/44/smaps": mg,
        "proc/44/pagemap": pagemap(0x1000, PRESENT, PRESENT),
        "proc/45/smaps": "",  # a zombie
    }) / "proc"


def test_finder_ksm_pages(proc, tmp_path):
    with KsmPageFinder(Roots(tmp_path / "sys", proc), PAGE) as finder:
        assert finder.ksm_pages(42).tolist() == [0x1000, 0x1003]
        assert finder.ksm_pages(43).tolist() == [0x1000]
        assert finder.ksm_pages(45).tolist() == []
        assert finder._windows_read == {0, 1}  # each window once, for both processes


def test_finder_small_slices_and_windows(proc, tmp_path, monkeypatch):
    monkeypatch.setattr(ksm_pages, "PAGEMAP_SLICE", 3)
    monkeypatch.setattr(ksm_pages, "KPF_WINDOW", 4)
    with KsmPageFinder(Roots(tmp_path / "sys", proc), PAGE) as finder:
        assert finder.ksm_pages(42).tolist() == [0x1000, 0x1003]
        assert finder._windows_read == {1, FAR // 4}


def test_finder_process_gone(proc, tmp_path):
    with KsmPageFinder(Roots(tmp_path / "sys", proc), PAGE) as finder:
        with pytest.raises(FileNotFoundError):
            finder.ksm_pages(4242)


def test_finder_pfns_hidden(proc, tmp_path):
    with KsmPageFinder(Roots(tmp_path / "sys", proc), PAGE) as finder:
        with pytest.raises(PagesUnreadable, match=r"44/pagemap shows no PFNs \(needs CAP_SYS"):
            finder.ksm_pages(44)


def test_finder_without_kpageflags(tmp_path):
    (tmp_path / "proc").mkdir()
    with pytest.raises(PagesUnreadable, match="kpageflags .*CONFIG_PROC_PAGE_MONITOR"):
        KsmPageFinder(Roots(tmp_path / "sys", tmp_path / "proc"), PAGE)


def test_finder_kpageflags_not_permitted(proc, tmp_path, monkeypatch):
    def refuse(path, flags):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(ksm_pages.os, "open", refuse)
    with pytest.raises(PagesUnreadable, match=r"kpageflags: permission denied \(needs root\)"):
        KsmPageFinder(Roots(tmp_path / "sys", proc), PAGE)


def test_finder_ksm_pages_are_page_numbers_of_the_page_size(make_tree, tmp_path):
    # 16 KiB pages: 0x1000000 is page 0x400
    proc = make_tree({"proc/kpageflags": kpageflags({5: KSM}, 6),
                      "proc/7/smaps": "01000000-01008000 rw-p 00000000 00:00 0\nVmFlags: mg\n",
                      "proc/7/pagemap": pagemap(0x400, 0, PRESENT | 5)}) / "proc"
    with KsmPageFinder(Roots(tmp_path / "sys", proc), 16384) as finder:
        pages = finder.ksm_pages(7)
    assert pages.tolist() == [0x401] and pages.dtype == np.uint64
