"""procfs: vmstat, ksm_stat, comm, the pid list, maps and fds, on literal file contents."""

from __future__ import annotations

import os

import pytest

from dynvm_trace import procfs
from dynvm_trace.paths import Roots

VMSTAT = ("nr_free_pages 903526\n"
          "nr_zone_inactive_anon 1236\n"
          "pgfree 4096123\n"
          "cow_ksm 2048\n"
          "ksm_swpin_copy 0\n")

KSM_STAT_NEW = ("ksm_rmap_items 4096\n"
                "ksm_zero_pages 0\n"
                "ksm_merging_pages 4080\n"
                "ksm_process_profit -12\n"
                "ksm_merge_any: no\n"
                "ksm_mergeable: yes\n")


def test_parse_vmstat():
    v = procfs.parse_vmstat(VMSTAT)
    assert v == {"nr_free_pages": 903526, "nr_zone_inactive_anon": 1236, "pgfree": 4096123,
                 "cow_ksm": 2048, "ksm_swpin_copy": 0}


def test_parse_vmstat_truncated_and_garbled():
    problems = []
    v = procfs.parse_vmstat("cow_ksm 5\nbogus\npgfree 1\nnr_fr", problems)
    assert v == {"cow_ksm": 5, "pgfree": 1}
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 4"]


def test_parse_ksm_stat_new_kernel():
    s = procfs.parse_ksm_stat(KSM_STAT_NEW)
    assert s == {"ksm_rmap_items": 4096, "ksm_zero_pages": 0, "ksm_merging_pages": 4080,
                 "ksm_process_profit": -12, "ksm_merge_any": False, "ksm_mergeable": True}
    assert s["ksm_merge_any"] is False and s["ksm_mergeable"] is True


def test_parse_ksm_stat_old_kernel_crlf_and_garbage():
    s = procfs.parse_ksm_stat("ksm_rmap_items 3\r\n\r\nksm_merging_pages: 2\r\nweird maybe\r\n"
                              "ksm_zero")
    assert s == {"ksm_rmap_items": 3, "ksm_merging_pages": 2}


@pytest.fixture
def proc(make_tree):
    return make_tree({
        "proc/vmstat": VMSTAT,
        "proc/1/comm": "systemd\n",
        "proc/1/ksm_stat": "ksm_rmap_items 0\nksm_merging_pages 0\n",
        "proc/1046/comm": "qemu-system-x86\n",
        "proc/1046/ksm_stat": KSM_STAT_NEW,
        "proc/77/comm": "kworker/0:1 x\n",
        "proc/self/comm": "pytest\n",
        "proc/sys/kernel/ostype": "Linux\n",
    }) / "proc"


def test_readers(proc, tmp_path):
    roots = Roots(tmp_path / "sys", proc)
    assert procfs.read_vmstat(roots)["cow_ksm"] == 2048
    assert procfs.read_ksm_stat(roots, 1046)["ksm_merging_pages"] == 4080
    assert procfs.read_ksm_stat(roots, 1) == {"ksm_rmap_items": 0, "ksm_merging_pages": 0}
    assert procfs.read_comm(roots, 1046) == "qemu-system-x86"
    assert procfs.read_comm(roots, 77) == "kworker/0:1 x"
    assert procfs.list_pids(roots) == [1, 77, 1046]


def test_gone_process_and_old_kernel(proc, tmp_path):
    roots = Roots(tmp_path / "sys", proc)
    assert procfs.read_ksm_stat(roots, 4242) is None
    assert procfs.read_comm(roots, 4242) is None
    assert procfs.read_ksm_stat(roots, 77) is None  # kernel without ksm_stat


def test_read_vmstat_missing_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        procfs.read_vmstat(Roots(tmp_path, tmp_path))


MAPS = ("55d0c8a00000-55d0c8a2c000 r--p 00000000 fe:00 26723                      "
        "/usr/bin/qemu-system-x86_64\n"
        "55d0c9000000-55d0c9400000 rw-p 00000000 00:00 0                          [heap]\n"
        "7f3d40000000-7f3d80000000 rw-s 00000000 00:01 2049                       "
        "/memfd:pc.ram (deleted)\n"
        "7f3d90000000-7f3d90001000 r--s 00001000 103:02 7                         "
        "/var/lib/guest ram (2).img\n"
        "7ffd1c3f2000-7ffd1c413000 rw-p 00000000 00:00 0 \n")


def test_parse_maps():
    maps = procfs.parse_maps(MAPS)
    assert [m.path for m in maps] == ["/usr/bin/qemu-system-x86_64", "[heap]",
                                      "/memfd:pc.ram (deleted)", "/var/lib/guest ram (2).img", ""]
    ram = maps[2]
    assert (ram.start, ram.end, ram.perms, ram.offset, ram.inode) == (
        0x7F3D40000000, 0x7F3D80000000, "rw-s", 0, 2049)
    assert ram.dev == os.makedev(0, 1) and ram.shared and not maps[0].shared
    assert maps[3].dev == os.makedev(0x103, 2) and maps[3].offset == 0x1000
    assert maps[1].inode == 0


def test_parse_maps_truncated_and_garbled():
    text = ("bogus\n"
            "7f3d40000000-7f3d80000000 rw-s 00000000 00:01\n"          # no inode
            "7f3d40000000-7f3d80000000 rw-s 00000000 zz:01 5 /x\n"     # bad device
            "7f3d40000000-7f3d80000000 rw-s 00000000 fffffffff:01 5\n" # device out of range
            "7f3d80000000-7f3d40000000 rw-s 00000000 00:01 5\n"        # end before start
            "7f3d40000000-7f3d80000000 rw 00000000 00:01 5\n"          # short perms
            "\n"
            "7f3d40000000-7f3d40001000 rw-s 00000000 00:01 6 /memfd:a (deleted)\r\n"
            "7f3d50000000-7f3d5")                                      # cut short
    maps = procfs.parse_maps(text)
    assert [(m.start, m.inode, m.path) for m in maps] == [
        (0x7F3D40000000, 6, "/memfd:a (deleted)")]
    assert procfs.parse_maps("") == []


@pytest.fixture
def fds(tmp_path, make_tree):
    """A process (pid 42) with fds 3 (a file), 5 (closed while the directory is read) and
    the maps that go with them."""
    make_tree({"data/ram.img": "x" * 4096, "proc/42/maps": MAPS})
    fd_dir = tmp_path / "proc/42/fd"
    fd_dir.mkdir()
    (fd_dir / "3").symlink_to(tmp_path / "data/ram.img")
    (fd_dir / "5").symlink_to(tmp_path / "data/gone")
    (fd_dir / "notes").symlink_to(tmp_path / "data/ram.img")  # not an fd: ignored
    return Roots(tmp_path / "sys", tmp_path / "proc")


def test_fd_readers(fds, tmp_path):
    st = os.stat(tmp_path / "data/ram.img")
    assert procfs.read_fd_files(fds, 42) == {3: (st.st_dev, st.st_ino)}
    assert procfs.read_fd_block_size(fds, 42, 3) == os.statvfs(tmp_path / "data/ram.img").f_bsize
    assert procfs.read_fd_block_size(fds, 42, 5) is None
    assert procfs.read_maps(fds, 42)[2].path == "/memfd:pc.ram (deleted)"


def test_fd_readers_gone_process(fds):
    assert procfs.read_fd_files(fds, 4242) is None
    assert procfs.read_fd_block_size(fds, 4242, 3) is None
    assert procfs.read_maps(fds, 4242) is None
