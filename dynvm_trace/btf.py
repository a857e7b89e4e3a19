"""Just enough of the kernel's BTF (/sys/kernel/btf/vmlinux) for the probes to trust what they
read: where a struct member lives (the installed headers may be for another kernel), and the
argument types of a raw tracepoint (which the probes read by position). Pure functions of the
bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

from .paths import Roots

MAGIC = 0xEB9F
_INT, _PTR, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC_PROTO, _TYPE_TAG, _ENUM64 = 9, 10, 11, 13, 18, 19
# bytes of trailing data per kind: fixed, or per member (vlen)
_FIXED = {_INT: 4, 3: 12, 14: 4, 17: 4}
_PER_MEMBER = {_STRUCT: 12, _UNION: 12, _ENUM: 8, _FUNC_PROTO: 8, 15: 12, _ENUM64: 12}
_QUALIFIERS = {_VOLATILE: "volatile", _CONST: "const", _RESTRICT: "restrict"}


class BTFError(ValueError):
    pass


@dataclass(frozen=True)
class _Type:
    kind: int
    name: str
    vlen: int
    kind_flag: int
    ref: int  # size or referenced type id, by kind
    extra: int  # where its trailing data starts in the blob


class BTF:
    """The type section of one BTF blob, read once. Raises BTFError on a blob that is not BTF
    or whose records run off their sections."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("too short for a BTF header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BTFError(f"bad magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        types, strings = hdr_len + type_off, hdr_len + str_off
        if hdr_len < 24 or types + type_len > len(data) or strings + str_len > len(data):
            raise BTFError(f"truncated: the header describes {max(types + type_len, strings + str_len)}"
                           f" bytes, the blob has {len(data)}")
        self._data, self._strings, self._strings_end = data, strings, strings + str_len
        try:
            self._types = [_Type(0, "void", 0, 0, 0, 0)] + self._read_types(types, types + type_len)
        except (struct.error, ValueError) as e:  # a type record or a name runs off its section
            raise BTFError(f"garbled type section: {e}") from None
        self._by_name: dict[tuple[int, str], int] = {}
        for i, t in enumerate(self._types):
            self._by_name.setdefault((t.kind, t.name), i)

    def _name(self, off: int) -> str:
        if self._strings + off >= self._strings_end:
            raise ValueError(f"name offset {off} past the string section")
        end = self._data.index(b"\0", self._strings + off, self._strings_end)
        return self._data[self._strings + off:end].decode(errors="replace")

    def _read_types(self, pos: int, end: int) -> list[_Type]:
        out = []
        while pos < end:
            if pos + 12 > end:
                raise ValueError(f"a type record at {pos} runs past the type section")
            name_off, info, ref = struct.unpack_from("<III", self._data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            out.append(_Type(kind, self._name(name_off), vlen, info >> 31, ref, pos + 12))
            pos += 12 + _FIXED.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
            if pos > end:
                raise ValueError(f"type {len(out)}'s data runs past the type section")
        return out

    def _type(self, type_id: int) -> _Type:
        if type_id >= len(self._types):
            raise BTFError(f"type id {type_id} not in the type section")
        return self._types[type_id]

    def member_offset(self, struct_name: str, member: str) -> int | None:
        """Byte offset of `member` (a direct member) in `struct struct_name`, or None when
        the struct or member is not described."""
        t = self._types[self._by_name.get((_STRUCT, struct_name), 0)]
        for i in range(t.vlen if t.kind == _STRUCT else 0):
            m_name, _m_type, m_off = struct.unpack_from("<III", self._data, t.extra + 12 * i)
            if self._name(m_name) == member:
                return (m_off & 0xFFFFFF if t.kind_flag else m_off) // 8
        return None

    def type_name(self, type_id: int, _depth: int = 0) -> str:
        """A type as C spells it: `long unsigned int`, `struct pt_regs *`, `u32`."""
        if _depth > 32:
            raise BTFError(f"type {type_id}: a chain of references too long (a loop?)")
        t = self._type(type_id)
        if t.kind == _TYPE_TAG:  # an annotation, not part of the C type
            return self.type_name(t.ref, _depth + 1)
        if t.kind == _PTR:
            inner = self.type_name(t.ref, _depth + 1)
            return inner + ("*" if inner.endswith("*") else " *")
        if t.kind in _QUALIFIERS:
            return f"{_QUALIFIERS[t.kind]} {self.type_name(t.ref, _depth + 1)}"
        if t.kind in (_STRUCT, _UNION, _FWD):  # a FWD's kind_flag: a union
            union = t.kind == _UNION or (t.kind == _FWD and t.kind_flag)
            return f"{'union' if union else 'struct'} {t.name}"
        if t.kind in (_ENUM, _ENUM64):
            return f"enum {t.name}"
        return t.name

    def tracepoint_args(self, name: str) -> tuple[str, ...] | None:
        """The C types of a tracepoint's arguments as a raw tracepoint program gets them
        (its TP_PROTO, from the kernel's `btf_trace_<name>` typedef), or None when BTF does
        not describe it. BTFError when it names types the blob does not have."""
        t = self._types[self._by_name.get((_TYPEDEF, f"btf_trace_{name}"), 0)]
        if t.kind != _TYPEDEF or self._type(t.ref).kind != _PTR:
            return None
        proto = self._type(self._type(t.ref).ref)
        if proto.kind != _FUNC_PROTO or proto.vlen < 1:
            return None
        params = [struct.unpack_from("<II", self._data, proto.extra + 8 * i)[1]
                  for i in range(proto.vlen)]
        return tuple(self.type_name(p) for p in params[1:])  # the first is the probe's data


@lru_cache(maxsize=4)
def _parsed(path: str, _identity: tuple[int, int, int]) -> BTF:
    with open(path, "rb") as f:
        return BTF(f.read())


def kernel_btf(roots: Roots) -> BTF | None:
    """The running kernel's BTF (parsed once per file), or None when there is none or it is
    not readable BTF."""
    path = roots.sys("kernel", "btf", "vmlinux")
    try:
        st = path.stat()
        return _parsed(str(path), (st.st_ino, st.st_size, st.st_mtime_ns))
    except (OSError, BTFError):
        return None


def kernel_member_offset(roots: Roots, struct_name: str, member: str) -> int | None:
    """The running kernel's offset of struct_name.member, or None when there is no BTF or
    it does not describe them."""
    btf = kernel_btf(roots)
    return btf.member_offset(struct_name, member) if btf else None
