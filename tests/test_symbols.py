"""symbols: kallsyms / System.map parsing on the recorded kernel's symbol table and on literal
texts, and vmlinux-style ELF reading (symbols + DWARF inlined-only functions) on a small ELF
built here with gcc."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PONE_FIXTURES, write_tree
from dynvm_trace import symbols as S
from dynvm_trace.paths import Roots

KALLSYMS = PONE_FIXTURES / "kallsyms-subset.txt"


@pytest.fixture(scope="module")
def kallsyms() -> S.SymbolTable:
    return S.parse_kallsyms(KALLSYMS.read_text(), str(KALLSYMS))


# --- the recorded kernel's kallsyms ----------------------------------------------------------

def test_fixture_counts(kallsyms):
    assert kallsyms.origin == S.KALLSYMS
    assert kallsyms.problems == []
    assert len(kallsyms) == 515
    assert kallsyms.count("T") == 248
    assert kallsyms.count("t") == 134
    assert kallsyms.count("Tt") == 382
    assert kallsyms.count("B") == 95
    assert kallsyms.count("D") == 27
    assert kallsyms.count("d") == 11
    assert len(kallsyms.names) == 488
    assert not kallsyms.addresses_hidden
    assert kallsyms.inlined is None and not kallsyms.has_dwarf
    assert kallsyms.describe() == f"kallsyms {KALLSYMS}: 515 symbols (382 text)"


def test_fixture_duplicates(kallsyms):
    dups = kallsyms.duplicates()
    assert {n: len(v) for n, v in dups.items()} == {"cpumask_weight": 27, "pagefault_enable": 2}
    assert kallsyms.addresses("pagefault_enable") == [0xffffffff811f18df, 0xffffffff816ccdd0]
    assert all(s.type == "t" and s.module is None for s in dups["cpumask_weight"])


def test_fixture_names_pone_md_calls_duplicate(kallsyms):
    # pone.md: rmap_walk_anon_lock, free_data, cluster_init "exist twice in kallsyms". On the
    # recorded kernel free_data and cluster_init exist once (cluster_init next to its .cold
    # part) and rmap_walk_anon_lock not at all (the fixture README says so).
    assert kallsyms.addresses("free_data") == [0xffffffff811e3720]
    assert kallsyms.addresses("cluster_init") == [0xffffffff811e3fd0]
    assert [s.name for s in kallsyms.variants("cluster_init")] == ["cluster_init.cold"]
    assert kallsyms.lookup("rmap_walk_anon_lock") == []
    assert "rmap_walk_pone_anon" not in kallsyms
    assert "wp_page_copy" not in kallsyms


def test_fixture_data_and_trap_symbols(kallsyms):
    (rmp,) = kallsyms.lookup("release_merge_page")
    assert rmp == S.Symbol("release_merge_page", 0xffffffff83a99580, "B")
    assert rmp.is_data and not rmp.is_text and rmp.is_global
    (psc,) = kallsyms.lookup("process_slice_check")
    assert (psc.type, psc.address) == ("T", 0xffffffff811e3400)


def test_fixture_clones(kallsyms):
    assert [s.name for s in kallsyms.variants("pone_que_stat_init")] == [
        "pone_que_stat_init.part.0", "pone_que_stat_init.part.0.cold"]
    assert [s.name for s in kallsyms.variants("atomic_add_unless")] == [
        "atomic_add_unless.constprop.0"]
    assert "atomic_add_unless" not in kallsyms
    assert sum(1 for s in kallsyms.symbols if s.clone_suffix) == 75


@pytest.mark.parametrize("name, split", [
    ("insert_sd_tree.cold", ("insert_sd_tree", ".cold")),
    ("atomic_add_unless.constprop.0", ("atomic_add_unless", ".constprop.0")),
    ("foo.isra.12", ("foo", ".isra.12")),
    ("pone_que_stat_init.part.0.cold", ("pone_que_stat_init", ".part.0.cold")),
    ("__func__.12345", ("__func__.12345", "")),
    ("change_reverse_ref", ("change_reverse_ref", "")),
    (".cold", (".cold", "")),
])
def test_split_clone_suffix(name, split):
    assert S.split_clone_suffix(name) == split


# --- privilege, modules, garbled lines ---------------------------------------------------------

def test_zeroed_addresses_detected():
    text = "".join(f"{'0' * 16} {line.split()[1]} {line.split()[2]}\n"
                   for line in KALLSYMS.read_text().splitlines())
    table = S.parse_kallsyms(text)
    assert len(table) == 515
    assert table.addresses_hidden
    assert table.addresses("change_reverse_ref") == [0]
    assert table.describe() == "kallsyms: 515 symbols (382 text), addresses hidden (all zero)"


def test_zero_per_cpu_symbols_are_not_hidden_addresses():
    text = ("0000000000000000 A irq_stack_union\n"
            "0000000000000000 D __per_cpu_start\n"
            "ffffffff81000000 T _text\n")
    table = S.parse_kallsyms(text)
    assert not table.addresses_hidden
    assert S.parse_kallsyms("0000000000000000 A x\n").addresses_hidden
    assert not S.parse_kallsyms("").addresses_hidden


def test_module_symbols():
    text = ("ffffffffc03a1000 t vmx_vcpu_run\t[kvm_intel]\n"
            "ffffffffc0300000 T kvm_vm_ioctl\t[kvm]\n"
            "ffffffff8100a160 t kvm_vm_ioctl\n")
    table = S.parse_kallsyms(text)
    assert table.problems == []
    assert table.lookup("vmx_vcpu_run") == [S.Symbol("vmx_vcpu_run", 0xffffffffc03a1000, "t",
                                                     "kvm_intel")]
    assert [s.module for s in table.lookup("kvm_vm_ioctl")] == ["kvm", None]
    assert list(table.duplicates()) == ["kvm_vm_ioctl"]


def test_garbled_lines_are_skipped_and_described():
    text = ("ffffffff811e14f0 T change_reverse_ref\n"
            "ffffffff811e1020 T\n"  # truncated
            "zzzzzzzz T not_hex\n"
            "ffffffff811e13d0 TT two_letters\n"
            "\n"
            "ffffffff811ed2c0 T insert_sd_tree kvm\n"  # 4th field not [module]
            "ffffffff811ed3b0 T delete_sd_tree [kvm] extra\n"
            "ffffffff811e20d0 T pone_slice_dec_mapcount_process\r\n"
            "ffffffff811e2240 T pone_slice_alloc_\x00process\n"
            "ffffffffffffffff0 T too_long_address\n")
    table = S.parse_kallsyms(text)
    assert [s.name for s in table.symbols] == ["change_reverse_ref",
                                               "pone_slice_dec_mapcount_process",
                                               "pone_slice_alloc_\x00process"]
    assert table.problems == [
        "line 2: fewer than 3 fields: 'ffffffff811e1020 T'",
        "line 3: address is not hexadecimal: 'zzzzzzzz T not_hex'",
        "line 4: type is not one letter: 'ffffffff811e13d0 TT two_letters'",
        "line 6: 4th field is not a [module]: 'ffffffff811ed2c0 T insert_sd_tree kvm'",
        "line 7: too many fields: 'ffffffff811ed3b0 T delete_sd_tree [kvm] extra'",
        "line 10: address is not hexadecimal: 'ffffffffffffffff0 T too_long_address'",
    ]


def test_system_map():
    text = ("ffffffff81000000 T _text\n"
            "ffffffff811e14f0 T change_reverse_ref\n"
            "ffffffff811f3251 t insert_sd_tree.cold\n"
            "ffffffff83a99580 B release_merge_page\n"
            "ffffffff8100a160 t kvm_vm_ioctl\t[kvm]\n")
    table = S.parse_system_map(text, "System.map-4.4.1")
    assert table.origin == S.SYSTEM_MAP
    assert [s.name for s in table.symbols] == ["_text", "change_reverse_ref",
                                               "insert_sd_tree.cold", "release_merge_page"]
    assert table.problems == ["line 5: too many fields: 'ffffffff8100a160 t kvm_vm_ioctl\\t[kvm]'"]
    assert [s.name for s in table.variants("insert_sd_tree")] == ["insert_sd_tree.cold"]
    assert table.describe() == "system.map System.map-4.4.1: 4 symbols (3 text)"


def test_read_kallsyms_through_roots(tmp_path):
    roots = Roots(tmp_path / "sys", write_tree(tmp_path / "proc", {
        "kallsyms": "ffffffff811e14f0 T change_reverse_ref\n"}))
    table = S.read_kallsyms(roots)
    assert table.source == str(tmp_path / "proc" / "kallsyms")
    assert table.addresses("change_reverse_ref") == [0xffffffff811e14f0]
    with pytest.raises(S.SymbolsUnavailable, match="No such file"):
        S.read_kallsyms(Roots(tmp_path / "sys", tmp_path / "nowhere"))
    write_tree(tmp_path / "proc2", {"kallsyms": "garbage\n"})
    with pytest.raises(S.SymbolsUnavailable, match="no symbols in it"):
        S.read_kallsyms(Roots(tmp_path / "sys", tmp_path / "proc2"))


def test_load_symbols_precedence(tmp_path):
    write_tree(tmp_path, {"proc/kallsyms": "ffffffff81000001 T from_kallsyms\n",
                          "System.map": "ffffffff81000002 T from_map\n"})
    roots = Roots(tmp_path / "sys", tmp_path / "proc")
    assert S.load_symbols(roots).names == {"from_kallsyms"}
    assert S.load_symbols(roots, system_map=tmp_path / "System.map").names == {"from_map"}
    with pytest.raises(S.SymbolsUnavailable, match="not an ELF file"):
        S.load_symbols(roots, system_map=tmp_path / "System.map", vmlinux=tmp_path / "System.map")


# --- a small ELF built with gcc ----------------------------------------------------------------

C_SOURCE = r"""
static inline int twice(int x) { return x * 2 + 1; }
static int helper(int x) { return x ^ 0x55; }
static inline int both_ways(int x) { return x * 7 - 3; }
int g_counter;
int g_init = 5;
const int g_table[4] = {1, 2, 3, 4};
int (*volatile g_fp)(int) = both_ways;
int normal_function(int x) { return twice(x) + twice(x + 3) + helper(x) + both_ways(x); }
__attribute__((noinline)) int other_function(int x)
{ return twice(x) * helper(x + 1) + g_counter + g_init + g_table[x & 3]; }
int main(int argc, char **argv)
{ (void)argv; return normal_function(argc) + other_function(argc) + g_fp(argc); }
"""


def _build(tmp_path: Path, *flags: str) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: cannot build the test ELF (apt install gcc)")
    src = tmp_path / "t.c"
    src.write_text(C_SOURCE)
    out = tmp_path / ("t" + "".join(f.strip("-") for f in flags))
    subprocess.run([gcc, *flags, "-fno-pie", "-no-pie", "-o", out.name, "t.c"], cwd=tmp_path,
                   check=True, capture_output=True)
    return out


def test_elf_symbols_and_inlined_functions(tmp_path):
    pytest.importorskip("elftools", reason="pyelftools is not installed")
    table = S.read_elf_symbols(_build(tmp_path, "-g", "-O2"))
    assert table.origin == S.VMLINUX
    assert table.problems == []
    types = {n: [s.type for s in table.lookup(n)] for n in
             ("normal_function", "other_function", "main", "g_counter", "g_init", "g_table",
              "g_fp", "both_ways", "twice", "helper")}
    assert types == {"normal_function": ["T"], "other_function": ["T"], "main": ["T"],
                     "g_counter": ["B"], "g_init": ["D"], "g_table": ["R"], "g_fp": ["D"],
                     "both_ways": ["t"],  # its address is taken: an out-of-line copy exists
                     "twice": [], "helper": []}
    assert table.lookup("normal_function")[0].address != 0
    # twice (declared inline) and helper (static, inlined by -O2) exist only inlined.
    assert table.inlined == {"twice": "t.c", "helper": "t.c"}
    assert table.is_inlined_only("twice") and table.is_inlined_only("helper")
    assert not table.is_inlined_only("both_ways")
    assert not table.is_inlined_only("normal_function")
    assert table.has_dwarf


def test_elf_without_dwarf(tmp_path):
    pytest.importorskip("elftools", reason="pyelftools is not installed")
    path = _build(tmp_path, "-O2")
    table = S.read_elf_symbols(path)
    assert table.inlined is None and not table.is_inlined_only("twice")
    assert table.problems == ["no DWARF (built without CONFIG_DEBUG_INFO): inlined-only "
                              "functions not known"]
    assert [s.type for s in table.lookup("normal_function")] == ["T"]
    assert S.read_elf_symbols(_build(tmp_path, "-g", "-O2"), dwarf=False).inlined is None


def test_elf_stripped_and_not_elf(tmp_path):
    pytest.importorskip("elftools", reason="pyelftools is not installed")
    path = _build(tmp_path, "-O2")
    stripped = tmp_path / "stripped"
    shutil.copy(path, stripped)
    strip = shutil.which("strip")
    if strip is None:
        pytest.skip("strip (binutils) is not installed")
    subprocess.run([strip, str(stripped)], check=True)
    with pytest.raises(S.SymbolsUnavailable, match=r"no FUNC/OBJECT symbols no \.symtab"):
        S.read_elf_symbols(stripped)
    with pytest.raises(S.SymbolsUnavailable, match="not an ELF file"):
        S.read_elf_symbols(KALLSYMS)
    with pytest.raises(S.SymbolsUnavailable, match="No such file"):
        S.read_elf_symbols(tmp_path / "missing")
