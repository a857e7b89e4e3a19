"""btf.BTF on hand-built BTF blobs: members found, types of every size skipped, bitfield
offsets, raw tracepoint argument types, and truncated or garbled blobs reported as BTFError
(never another crash)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dynvm_trace.bpf_host import check_btf_member
from dynvm_trace.btf import BTF, BTFError, kernel_btf, kernel_member_offset
from dynvm_trace.paths import Roots


class Blob:
    """A BTF blob built type by type (BTF's layout: header, type section, string section)."""

    def __init__(self):
        self.strings = b"\0"
        self.types = b""

    def s(self, text: str) -> int:
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, kind: int, name: str, vlen: int, size: int, extra: bytes = b"",
            kind_flag: int = 0) -> "Blob":
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name) if name else 0, info, size) + extra
        return self

    def struct(self, name: str, members: list[tuple[str, int]], kind_flag: int = 0,
               kind: int = 4) -> "Blob":
        extra = b"".join(struct.pack("<III", self.s(m), 1, off) for m, off in members)
        return self.add(kind, name, len(members), 64, extra, kind_flag)

    def bytes(self) -> bytes:
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types),
                             len(self.types), len(self.strings))
        return header + self.types + self.strings


def kernelish() -> Blob:
    """An int, an array, an enum, a func proto, a var, a datasec, a union named like the
    struct, then struct ksm_rmap_item (address at byte 24) and a struct with bitfields."""
    b = Blob()
    b.add(1, "unsigned long", 0, 8, struct.pack("<I", 64))                       # INT
    b.add(3, "", 0, 0, struct.pack("<III", 1, 1, 16))                            # ARRAY
    b.add(6, "ksm_advisor_type", 2, 4, struct.pack("<iI", 0, 0) * 2)            # ENUM
    b.add(13, "", 3, 0, struct.pack("<II", 0, 1) * 3)                            # FUNC_PROTO
    b.add(14, "ksm_run", 0, 1, struct.pack("<I", 1))                             # VAR
    b.add(15, ".data", 2, 0, struct.pack("<III", 5, 0, 8) * 2)                   # DATASEC
    b.struct("ksm_rmap_item", [("address", 0)], kind=5)                          # UNION: not it
    b.struct("ksm_rmap_item", [("rmap_list", 0), ("anon_vma", 64), ("mm", 128),
                               ("address", 192), ("oldchecksum", 256)])
    b.struct("packed", [("lo", (3 << 24) | 0), ("hi", (5 << 24) | 40)], kind_flag=1)
    return b


def test_finds_the_member_after_types_of_every_size():
    data = kernelish().bytes()
    assert BTF(data).member_offset("ksm_rmap_item", "address") == 24
    assert BTF(data).member_offset("ksm_rmap_item", "rmap_list") == 0
    assert BTF(data).member_offset("ksm_rmap_item", "mm") == 16


def test_bitfield_offsets_use_the_low_24_bits():
    assert BTF(kernelish().bytes()).member_offset("packed", "hi") == 5


@pytest.mark.parametrize("struct_name, member", [("ksm_rmap_item", "nope"),
                                                 ("ksm_stable_node", "address"),
                                                 ("ksm_run", "address")])
def test_not_described_is_none(struct_name, member):
    assert BTF(kernelish().bytes()).member_offset(struct_name, member) is None


def test_empty_type_section_is_none():
    assert BTF(Blob().bytes()).member_offset("ksm_rmap_item", "address") is None


@pytest.mark.parametrize("data", [b"", b"\x9f\xeb", b"\0" * 23, b"\x00\x00" + b"\0" * 30,
                                  b"ELF\x7f" + b"\0" * 40])
def test_not_btf(data):
    with pytest.raises(BTFError):
        BTF(data).member_offset("ksm_rmap_item", "address")


@pytest.mark.parametrize("cut", [30, 60, 100, -20])
def test_truncated_blob_is_btf_error(cut):
    with pytest.raises(BTFError):
        BTF(kernelish().bytes()[:cut])


def test_string_offset_out_of_range_is_btf_error():
    b = Blob()
    b.types = struct.pack("<III", 10_000, 4 << 24, 8)  # a struct whose name is past the end
    with pytest.raises(BTFError):
        BTF(b.bytes())


def tracepoint_blob(params: list[int], name: str = "page_fault_user") -> Blob:
    """The types a kernel's BTF gives a tracepoint's arguments: btf_trace_<name>, a typedef
    of a pointer to a func proto whose first parameter is the probe's data (void *). Type ids:
    1 long unsigned int, 2 void *, 4 struct pt_regs *, 6 u32, 7 const struct pt_regs *,
    8 void **, 13 int."""
    b = Blob()
    b.add(1, "long unsigned int", 0, 8, struct.pack("<I", 64))       # 1
    b.add(2, "", 0, 0)                                                # 2: void *
    b.struct("pt_regs", [("ip", 0)])                                  # 3
    b.add(2, "", 0, 3)                                                # 4: struct pt_regs *
    b.add(1, "unsigned int", 0, 4, struct.pack("<I", 32))             # 5
    b.add(8, "u32", 0, 5)                                             # 6: typedef
    b.add(10, "", 0, 4)                                               # 7: const struct pt_regs *
    b.add(2, "", 0, 2)                                                # 8: void **
    b.add(13, "", len(params), 0, b"".join(struct.pack("<II", 0, t) for t in params))  # 9
    b.add(2, "", 0, 9)                                                # 10
    b.add(8, f"btf_trace_{name}", 0, 10)                              # 11
    b.add(8, "btf_trace_not_a_pointer", 0, 9)                         # 12
    b.add(1, "int", 0, 4, struct.pack("<I", (1 << 24) | 32))          # 13
    return b


def test_tracepoint_args_are_the_prototype_after_the_data_pointer():
    btf = BTF(tracepoint_blob([2, 1, 4, 1]).bytes())
    assert btf.tracepoint_args("page_fault_user") == ("long unsigned int", "struct pt_regs *",
                                                      "long unsigned int")
    assert btf.tracepoint_args("ksm_enter") is None  # not described
    assert btf.tracepoint_args("not_a_pointer") is None


def test_type_names_as_c_spells_them():
    btf = BTF(tracepoint_blob([2, 6, 7, 8, 0]).bytes())
    assert btf.tracepoint_args("page_fault_user") == ("u32", "const struct pt_regs *",
                                                      "void **", "void")


@pytest.mark.parametrize("blob", [
    tracepoint_blob([2, 99]),                    # a parameter of a type id it lacks
    tracepoint_blob([2, 14]).add(2, "", 0, 14),  # 14: a pointer to itself
])
def test_tracepoint_args_garbled_is_btf_error(blob):
    with pytest.raises(BTFError):
        BTF(blob.bytes()).tracepoint_args("page_fault_user")


def test_kernel_member_offset_never_raises(tmp_path):
    roots = Roots(tmp_path / "sys", tmp_path / "proc")
    assert kernel_member_offset(roots, "ksm_rmap_item", "address") is None  # no BTF file
    btf = tmp_path / "sys" / "kernel" / "btf" / "vmlinux"
    btf.parent.mkdir(parents=True)
    btf.write_bytes(kernelish().bytes()[:70])  # truncated
    assert kernel_member_offset(roots, "ksm_rmap_item", "address") is None
    btf.write_bytes(kernelish().bytes())
    assert kernel_member_offset(roots, "ksm_rmap_item", "address") == 24


def test_doctor_check_names_the_offset_or_the_fix(tmp_path):
    roots = Roots(tmp_path / "sys", tmp_path / "proc")
    missing = check_btf_member(roots, "ksm_rmap_item", "address", "COW breaks")
    assert not missing.ok and missing.name == "BTF ksm_rmap_item.address"
    assert "no COW breaks" in missing.detail and "CONFIG_DEBUG_INFO_BTF" in missing.fix
    btf = tmp_path / "sys" / "kernel" / "btf" / "vmlinux"
    btf.parent.mkdir(parents=True)
    btf.write_bytes(kernelish().bytes())
    found = check_btf_member(roots, "ksm_rmap_item", "address", "COW breaks")
    assert found.ok and found.detail == "offset 24 (COW breaks)"


def test_running_kernel_if_it_has_btf():
    path = Path("/sys/kernel/btf/vmlinux")
    if not path.exists():
        pytest.skip("no /sys/kernel/btf/vmlinux here")
    off = kernel_member_offset(Roots(), "ksm_rmap_item", "address")
    assert off is None or 0 <= off < 128
    args = kernel_btf(Roots()).tracepoint_args("page_fault_user")
    assert args is None or len(args) == 3
