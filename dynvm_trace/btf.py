"""Just enough of the kernel's BTF (/sys/kernel/btf/vmlinux) to find where a struct member
lives, so a probe reads kernel memory at the offset this kernel really uses (the installed
headers may be for another kernel). A pure function of the bytes."""

from __future__ import annotations

import struct

from .paths import Roots

MAGIC = 0xEB9F
_STRUCT, _UNION = 4, 5
# bytes of trailing data per kind: fixed, or per member (vlen)
_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_PER_MEMBER = {_STRUCT: 12, _UNION: 12, 6: 8, 13: 8, 15: 12, 19: 12}


class BTFError(ValueError):
    pass


def member_offset(data: bytes, struct_name: str, member: str) -> int | None:
    """Byte offset of `member` (a direct member) in `struct struct_name`, or None when the
    struct or member is not described. Raises BTFError on a blob that is not BTF."""
    if len(data) < 24:
        raise BTFError("too short for a BTF header")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != MAGIC:
        raise BTFError(f"bad magic {magic:#x}")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    types = hdr_len + type_off
    strings = hdr_len + str_off
    if hdr_len < 24 or types + type_len > len(data) or strings + str_len > len(data):
        raise BTFError(f"truncated: the header describes {max(types + type_len, strings + str_len)}"
                       f" bytes, the blob has {len(data)}")
    try:
        return _find_member(data, types, type_len, strings, strings + str_len, struct_name,
                            member)
    except (struct.error, ValueError) as e:  # a type record or a name runs off its section
        raise BTFError(f"garbled type section: {e}") from None


def _find_member(data: bytes, types: int, type_len: int, strings: int, strings_end: int,
                 struct_name: str, member: str) -> int | None:
    def name(off: int) -> str:
        if strings + off >= strings_end:
            raise ValueError(f"name offset {off} past the string section")
        end = data.index(b"\0", strings + off, strings_end)
        return data[strings + off:end].decode(errors="replace")

    pos, end = types, types + type_len
    while pos < end:
        if pos + 12 > end:
            raise ValueError(f"a type record at {pos} runs past the type section")
        name_off, info, _size = struct.unpack_from("<III", data, pos)
        pos += 12
        kind, vlen, kind_flag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        if kind == _STRUCT and name(name_off) == struct_name:
            if pos + 12 * vlen > end:
                raise ValueError(f"struct {struct_name}'s members run past the type section")
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                if name(m_name) == member:
                    bits = m_off & 0xFFFFFF if kind_flag else m_off
                    return bits // 8
            return None
        pos += _FIXED.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
    return None


def kernel_member_offset(roots: Roots, struct_name: str, member: str) -> int | None:
    """The running kernel's offset of struct_name.member, or None when there is no BTF or
    it does not describe them."""
    try:
        data = roots.sys("kernel", "btf", "vmlinux").read_bytes()
        return member_offset(data, struct_name, member)
    except (OSError, BTFError):
        return None
