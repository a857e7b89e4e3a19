"""Kernel symbol tables: /proc/kallsyms, a System.map, or a vmlinux ELF (pyelftools).

One `SymbolTable` model for the three origins, so probe resolution (`pone_probes`) and `doctor`
work the same live and offline:

- `/proc/kallsyms` (read through `Roots.procfs("kallsyms")`): "addr type name [module]" lines.
  Without privilege (kptr_restrict) the kernel prints every address as zeros: the table says
  so (`addresses_hidden`), names are still good for kprobes by name, addresses are not.
- a System.map: the same lines without modules.
- a vmlinux ELF: FUNC and OBJECT symbols of .symtab, typed like kallsyms (T/t/W, D/d, B/b,
  R/r); with DWARF, also the functions that exist only inlined (an abstract instance,
  DW_TAG_subprogram with DW_AT_inline 1 or 3, and no out-of-line instance with code): those
  have no address and cannot take a kprobe.

A name may appear more than once (static functions of the same name in several objects, e.g.
`cpumask_weight`); every address is kept, and a probe on such a name must attach by address.
Compiler clones (`foo.cold`, `foo.constprop.0`, `foo.isra.0`, `foo.part.0`) are separate
symbols, indexed under their base name too so that `variants("foo")` finds them.

The parsers are pure functions of text; pyelftools is imported only by `read_elf_symbols`
(it is Debian's python3-pyelftools).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .paths import Roots

KALLSYMS = "kallsyms"
SYSTEM_MAP = "system.map"
VMLINUX = "vmlinux"

TEXT_TYPES = frozenset("TtWw")
DATA_TYPES = frozenset("DdBbRrVvGgSs")

# Suffixes gcc (and clang) give to local copies of a function: a cold partition, a clone with
# constant arguments propagated, an IPA-SRA clone, a partially inlined part, an LTO-private copy.
_CLONE_SUFFIX = re.compile(r"(?:\.(?:cold|constprop|isra|part|lto_priv|llvm|clone|localalias)"
                           r"(?:\.[0-9a-f]+)?)+", re.ASCII)
_HEX = re.compile(r"[0-9a-fA-F]+", re.ASCII)


class SymbolsUnavailable(Exception):
    """A symbol source that cannot be read or parsed; the message is one line for doctor."""


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    type: str  # the kallsyms / nm letter
    module: str | None = None  # "[kvm]" of a kallsyms line, without the brackets

    @property
    def is_text(self) -> bool:
        return self.type in TEXT_TYPES

    @property
    def is_data(self) -> bool:
        return self.type in DATA_TYPES

    @property
    def is_global(self) -> bool:
        return self.type.isupper()

    @property
    def clone_suffix(self) -> str:
        """".cold", ".constprop.0", ... or "" for a symbol that is not a compiler clone."""
        return split_clone_suffix(self.name)[1]


def split_clone_suffix(name: str) -> tuple[str, str]:
    """("foo", ".isra.0") for "foo.isra.0"; (name, "") when it has no compiler clone suffix."""
    dot = name.find(".")
    if dot <= 0:
        return name, ""
    if _CLONE_SUFFIX.fullmatch(name, dot):
        return name[:dot], name[dot:]
    return name, ""


@dataclass
class SymbolTable:
    """Symbols by name, from one origin (`KALLSYMS`, `SYSTEM_MAP` or `VMLINUX`).

    `problems` has one line per input line or section that could not be used; `inlined`
    (vmlinux with DWARF only, else None: unknown) maps each function that exists only
    inlined to the compile unit where it was first seen.
    """

    origin: str
    source: str = ""  # the file it came from
    symbols: list[Symbol] = field(default_factory=list)
    inlined: dict[str, str] | None = None
    problems: list[str] = field(default_factory=list)
    _by_name: dict[str, list[Symbol]] = field(default_factory=dict, repr=False)
    _by_base: dict[str, list[Symbol]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index(self.symbols)

    def _index(self, symbols: Iterable[Symbol]) -> None:
        for s in symbols:
            self._by_name.setdefault(s.name, []).append(s)
            base, suffix = split_clone_suffix(s.name)
            if suffix:
                self._by_base.setdefault(base, []).append(s)

    def add(self, symbol: Symbol) -> None:
        self.symbols.append(symbol)
        self._index((symbol,))

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def lookup(self, name: str) -> list[Symbol]:
        """Every symbol of exactly this name (several when the name is not unique)."""
        return list(self._by_name.get(name, ()))

    def addresses(self, name: str) -> list[int]:
        return [s.address for s in self._by_name.get(name, ())]

    def variants(self, name: str) -> list[Symbol]:
        """The compiler clones of `name` (`name.cold`, `name.isra.0`, ...), in table order."""
        return list(self._by_base.get(name, ()))

    def is_inlined_only(self, name: str) -> bool:
        """True when DWARF says the function exists only inlined (False when unknown)."""
        return bool(self.inlined) and name in self.inlined and name not in self._by_name

    def duplicates(self) -> dict[str, list[Symbol]]:
        """Names that appear more than once, with all their symbols."""
        return {n: list(v) for n, v in self._by_name.items() if len(v) > 1}

    def count(self, types: str) -> int:
        """How many symbols have one of the type letters in `types` (e.g. "T", "Tt")."""
        return sum(1 for s in self.symbols if s.type in types)

    @property
    def names(self) -> set[str]:
        return set(self._by_name)

    @property
    def addresses_hidden(self) -> bool:
        """True when the addresses were printed as zeros (kallsyms read without privilege).

        Decided on the text symbols (absolute and per-CPU symbols may be 0 legitimately): all
        of them zero. A table without text symbols decides on all its symbols.
        """
        text = [s for s in self.symbols if s.is_text] or self.symbols
        return bool(text) and all(s.address == 0 for s in text)

    @property
    def has_dwarf(self) -> bool:
        return self.inlined is not None

    def describe(self) -> str:
        """One line: where the table came from and what it holds."""
        what = f"{len(self.symbols)} symbols ({self.count('Tt')} text)"
        src = f"{self.origin} {self.source}".rstrip()
        extra = ""
        if self.inlined is not None:
            extra = f", {len(self.inlined)} functions only inlined (DWARF)"
        if self.addresses_hidden:
            extra += ", addresses hidden (all zero)"
        return f"{src}: {what}{extra}"


# --- kallsyms / System.map -----------------------------------------------------------------

def _parse_lines(text: str, origin: str, source: str, modules: bool) -> SymbolTable:
    table = SymbolTable(origin, source)
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        why = None
        module = None
        if len(fields) < 3:
            why = "fewer than 3 fields"
        elif len(fields) > 4 or (len(fields) == 4 and not modules):
            why = "too many fields"
        elif len(fields) == 4 and not (fields[3].startswith("[") and fields[3].endswith("]")
                                       and len(fields[3]) > 2):
            why = "4th field is not a [module]"
        elif not _HEX.fullmatch(fields[0]) or len(fields[0]) > 16:
            why = "address is not hexadecimal"
        elif len(fields[1]) != 1 or not fields[1].isalpha() and fields[1] not in "?-":
            why = "type is not one letter"
        if why is not None:
            table.problems.append(f"line {n}: {why}: {line.strip()[:80]!r}")
            continue
        if len(fields) == 4:
            module = fields[3][1:-1]
        table.add(Symbol(fields[2], int(fields[0], 16), fields[1], module))
    return table


def parse_kallsyms(text: str, source: str = "") -> SymbolTable:
    """A /proc/kallsyms text: "addr type name" or "addr type name\\t[module]" lines.

    Unusable lines are skipped and described in `problems`. When the reader lacked the
    privilege every address is 0: see `SymbolTable.addresses_hidden`.
    """
    return _parse_lines(text, KALLSYMS, source, modules=True)


def parse_system_map(text: str, source: str = "") -> SymbolTable:
    """A System.map text: "addr type name" lines (no modules)."""
    return _parse_lines(text, SYSTEM_MAP, source, modules=False)


def read_kallsyms(roots: Roots) -> SymbolTable:
    """/proc/kallsyms through `roots`. Raises SymbolsUnavailable when it cannot be read."""
    return _read_table(roots.procfs("kallsyms"), parse_kallsyms, "")


def read_system_map(path: str | os.PathLike) -> SymbolTable:
    """A System.map file. Raises SymbolsUnavailable when it cannot be read or holds nothing."""
    return _read_table(Path(path), parse_system_map, " (is it a System.map?)")


def _read_table(path: Path, parse, empty_hint: str) -> SymbolTable:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SymbolsUnavailable(f"{path}: {e.strerror or e}") from e
    table = parse(text, str(path))
    if not table.symbols:
        raise SymbolsUnavailable(f"{path}: no symbols in it{empty_hint}")
    return table


# --- vmlinux (ELF + DWARF) ------------------------------------------------------------------

_SECTION_LETTER = {".bss": "b", ".sbss": "b", ".data": "d", ".sdata": "d", ".rodata": "r"}


def _object_letter(section_name: str) -> str:
    for prefix, letter in _SECTION_LETTER.items():
        if section_name == prefix or section_name.startswith(prefix + "."):
            return letter
    if section_name.startswith(".data") or section_name.startswith(".init.data"):
        return "d"
    if section_name.startswith(".rodata"):
        return "r"
    if "bss" in section_name:
        return "b"
    return "d"


def _elf_symbols(elf, table: SymbolTable) -> None:
    from elftools.elf.sections import SymbolTableSection

    section = elf.get_section_by_name(".symtab")
    if not isinstance(section, SymbolTableSection):
        section = elf.get_section_by_name(".dynsym")
        if not isinstance(section, SymbolTableSection):
            table.problems.append("no .symtab (stripped ELF): no symbols")
            return
        table.problems.append("no .symtab (stripped ELF): only .dynsym read")
    names = [s.name for s in elf.iter_sections()]
    for sym in section.iter_symbols():
        kind = sym["st_info"]["type"]
        bind = sym["st_info"]["bind"]
        shndx = sym["st_shndx"]
        if kind not in ("STT_FUNC", "STT_OBJECT") or not sym.name or shndx == "SHN_UNDEF":
            continue
        if kind == "STT_FUNC":
            letter = "t"
        elif isinstance(shndx, int) and shndx < len(names):
            letter = _object_letter(names[shndx])
        else:
            letter = "d"
        if bind == "STB_WEAK":
            letter = "W" if kind == "STT_FUNC" else "V"
        elif bind == "STB_GLOBAL":
            letter = letter.upper()
        table.add(Symbol(sym.name, sym["st_value"], letter))


_REF_FORMS = frozenset({"DW_FORM_ref1", "DW_FORM_ref2", "DW_FORM_ref4", "DW_FORM_ref8",
                        "DW_FORM_ref_udata"})


def _ref_offset(attr, cu) -> int | None:
    if attr.form in _REF_FORMS:
        return attr.value + cu.cu_offset
    if attr.form == "DW_FORM_ref_addr":
        return attr.value
    return None


def _attr_str(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def inlined_only_functions(dwarf) -> dict[str, str]:
    """Function name -> compile unit, for functions that exist only inlined.

    An abstract instance (a top-level DW_TAG_subprogram with DW_AT_inline 1 "inlined" or 3
    "declared inline and inlined") whose offset no out-of-line instance (a DW_TAG_subprogram
    with DW_AT_abstract_origin and DW_AT_low_pc or DW_AT_ranges) refers to, in any compile
    unit. Functions only inlined in one unit but out of line in another are excluded.
    Only the top-level children of each unit are read (C has no nested functions), so the
    inlined-call trees are skipped via DW_AT_sibling.
    """
    abstract: dict[int, tuple[str, str]] = {}
    concrete: set[int] = set()
    out_of_line_names: set[str] = set()
    for cu in dwarf.iter_CUs():
        top = cu.get_top_DIE()
        cu_name = _attr_str(top.attributes["DW_AT_name"].value) \
            if "DW_AT_name" in top.attributes else f"cu@{cu.cu_offset:#x}"
        for die in top.iter_children():
            if die.tag != "DW_TAG_subprogram":
                continue
            attrs = die.attributes
            has_code = "DW_AT_low_pc" in attrs or "DW_AT_ranges" in attrs
            if "DW_AT_inline" in attrs and attrs["DW_AT_inline"].value in (1, 3) \
                    and "DW_AT_name" in attrs:
                abstract[die.offset] = (_attr_str(attrs["DW_AT_name"].value), cu_name)
            if has_code:
                if "DW_AT_abstract_origin" in attrs:
                    off = _ref_offset(attrs["DW_AT_abstract_origin"], cu)
                    if off is not None:
                        concrete.add(off)
                if "DW_AT_name" in attrs:
                    out_of_line_names.add(_attr_str(attrs["DW_AT_name"].value))
    result: dict[str, str] = {}
    for off, (name, cu_name) in abstract.items():
        if off in concrete or name in out_of_line_names:
            continue
        result.setdefault(name, cu_name)
    # A name that is inlined-only in one unit but has an out-of-line instance (under another
    # abstract DIE) in another unit is not inlined-only.
    with_code = {abstract[o][0] for o in concrete if o in abstract}
    return {n: cu for n, cu in result.items() if n not in with_code}


def read_elf_symbols(path: str | os.PathLike, dwarf: bool = True) -> SymbolTable:
    """FUNC and OBJECT symbols of a vmlinux (any ELF) .symtab, typed like kallsyms, and with
    DWARF (when `dwarf` and the file has it) the functions that exist only inlined.

    A function inlined-only by DWARF but present in .symtab under its own name is not
    reported as inlined (it has an out-of-line copy). Raises SymbolsUnavailable when the file
    cannot be read, is not ELF, or pyelftools is missing. Reading the DWARF of a full vmlinux
    takes a while (its top-level DIEs only, but hundreds of MB of them).
    """
    try:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
    except ImportError as e:
        raise SymbolsUnavailable("reading a vmlinux needs pyelftools "
                                 "(apt install python3-pyelftools)") from e
    try:
        with open(path, "rb") as f:
            try:
                elf = ELFFile(f)
            except ELFError as e:
                raise SymbolsUnavailable(f"{path}: not an ELF file ({e})") from e
            table = SymbolTable(VMLINUX, str(path))
            _elf_symbols(elf, table)
            if dwarf:
                # (has_dwarf_info() is also true for a mere .eh_frame)
                if elf.get_section_by_name(".debug_info") is not None \
                        or elf.get_section_by_name(".zdebug_info") is not None:
                    try:
                        inl = inlined_only_functions(elf.get_dwarf_info())
                    except Exception as e:  # pyelftools raises many kinds on odd DWARF
                        table.problems.append(f"DWARF not usable: {type(e).__name__}: {e}")
                    else:
                        table.inlined = {n: c for n, c in inl.items() if n not in table}
                else:
                    table.problems.append("no DWARF (built without CONFIG_DEBUG_INFO): "
                                          "inlined-only functions not known")
    except OSError as e:
        raise SymbolsUnavailable(f"{path}: {e.strerror or e}") from e
    if not table.symbols:
        raise SymbolsUnavailable(f"{path}: no FUNC/OBJECT symbols "
                                 + "; ".join(table.problems))
    return table


def load_symbols(roots: Roots, system_map: str | os.PathLike | None = None,
                 vmlinux: str | os.PathLike | None = None) -> SymbolTable:
    """The table `doctor` checks against: a vmlinux when given, else a System.map when given,
    else /proc/kallsyms. Raises SymbolsUnavailable with a one-line reason."""
    if vmlinux is not None:
        return read_elf_symbols(vmlinux)
    if system_map is not None:
        return read_system_map(system_map)
    return read_kallsyms(roots)
