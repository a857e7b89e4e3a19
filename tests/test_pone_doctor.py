"""pone_doctor: the user guide's installation checks on fixture trees (host and guest), and the
probe-point lines from the recorded kernel's kallsyms."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import PONE_FIXTURES, write_tree
from dynvm_trace import pone_doctor as pd
from dynvm_trace import pone_probes as pp
from dynvm_trace import pone_sysfs
from dynvm_trace import symbols as S
from dynvm_trace.capabilities import Check
from dynvm_trace.paths import Roots

KALLSYMS = PONE_FIXTURES / "kallsyms-subset.txt"
PONE = "kernel/mm/pone/"
THP = "kernel/mm/transparent_hugepage/enabled"
KSM_RUN = "kernel/mm/ksm/run"

LEAK = ("note: at ppr pool registration (mem_pool_reg) the kernel writes host kernel pointers "
        "into the pool header in guest memory: a guest can read host kernel addresses "
        "(defeats KASLR)")


@pytest.fixture(scope="module")
def kallsyms() -> S.SymbolTable:
    return S.parse_kallsyms(KALLSYMS.read_text(), "kallsyms-subset.txt")


def host_tree(tmp_path: Path, **override: str | None) -> tuple[Roots, Path]:
    """A healthy virt_release host (the recorded kernel's idle files), THP never, KSM
    stopped, /dev/kvm present; `override` replaces ({"pone_run": "0"}) or removes (None)
    files, keyed by the path under the sysfs root or a pone file name."""
    files: dict[str, str | None] = {
        PONE + p.name: p.read_text() for p in (PONE_FIXTURES / "sysfs-idle/kernel/mm/pone")
        .iterdir()}
    files[THP] = "always madvise [never]\n"
    files[KSM_RUN] = "0\n"
    for k, v in override.items():
        files[k if "/" in k else PONE + k] = v
    root = write_tree(tmp_path / "sys", {k: v for k, v in files.items() if v is not None})
    dev = write_tree(tmp_path / "dev", {"kvm": ""})
    write_tree(tmp_path / "proc", THREADS)
    return Roots(root, tmp_path / "proc"), dev


def kthread(pid: int, name: str, flags: int = 0x00208040) -> dict[str, str]:
    return {f"{pid}/stat": f"{pid} ({name}) S 2 0 0 0 -1 {flags} 0 0 0 0\n"}


# the threads pone.md saw at boot with 2 vCPUs
THREADS = {**kthread(411, "spthrd_1"), **kthread(412, "spthrd_divide"), **kthread(413, "spdeamon")}


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# --- THP parser ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, mode", [
    ("always madvise [never]\n", "never"),
    ("[always] madvise never\n", "always"),
    ("always [madvise] never", "madvise"),
    ("always defer defer+madvise [madvise] never\n", "madvise"),  # the defrag file's layout
])
def test_parse_thp_mode(text, mode):
    assert pd.parse_thp_mode(text) == mode


@pytest.mark.parametrize("text", ["", "always madvise never\n", "[always] [never]\n", "[]"])
def test_parse_thp_mode_garbled(text):
    with pytest.raises(ValueError, match="no single"):
        pd.parse_thp_mode(text)


# --- host ---------------------------------------------------------------------------------------

def test_healthy_host(tmp_path, kallsyms):
    roots, dev = host_tree(tmp_path)
    checks = pd.pone_checks(roots, kallsyms, dev=dev)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert [c.name for c in checks] == (
        ["pone kernel", "pone threads", "transparent huge pages", "kvm", "ksm off", "ppr info leak",
         "kernel symbols", "probe points (host)"]
        + [f"probe {p.symbol}" for p in pp.PROBE_POINTS if p.side == pp.HOST]
        + ["trap process_slice_check", "trap rmap_walk_pone_anon"])
    c = by_name(checks)
    assert c["pone kernel"].detail == "virt_release dialect, pone_run 1"
    assert c["transparent huge pages"].detail == "never"
    assert c["kvm"].detail == f"{dev}/kvm present"
    assert c["ksm off"].detail == "KSM stopped"
    assert c["ppr info leak"].detail == LEAK
    assert c["kernel symbols"].detail == "kallsyms kallsyms-subset.txt: 515 symbols (382 text)"
    assert c["probe points (host)"].detail == (
        "16 of 16 probe points found; known traps: process_slice_check (never_called), "
        "rmap_walk_pone_anon (inlined)")
    assert c["probe release_merge_page"].detail == "found: B 0xffffffff83a99580 (read by address)"
    assert c["trap process_slice_check"].detail.startswith("never_called: has a symbol but")


@pytest.mark.parametrize("mode, why", [
    ("[always] madvise never\n", "always: anonymous memory is THP-backed"),
    ("always [madvise] never\n", "madvise: qemu asks for huge pages of guest RAM with madvise"),
])
def test_thp_on_fails(tmp_path, mode, why):
    roots, _ = host_tree(tmp_path, **{THP: mode})
    c = pd.check_thp(roots)
    path = roots.sys(*pd.THP_ENABLED)
    assert c == Check("transparent huge pages", False,
                      f"{why}, and pone does not merge THP-backed pages",
                      f"echo never > {path} (and boot with transparent_hugepage=never to keep "
                      "it off)")


def test_thp_absent_or_garbled(tmp_path):
    roots, _ = host_tree(tmp_path, **{THP: None})
    assert pd.check_thp(roots) == Check(
        "transparent huge pages", True, f"{roots.sys(*pd.THP_ENABLED)} not found: the kernel "
        "has no THP")
    roots, _ = host_tree(tmp_path / "g", **{THP: "garbage\n"})
    c = pd.check_thp(roots)
    assert not c.ok and c.detail.endswith("no single [selected] mode in 'garbage'")


def test_ksm_running_fails(tmp_path):
    roots, _ = host_tree(tmp_path, **{KSM_RUN: "1\n"})
    c = pd.check_ksm(roots)
    assert c == Check("ksm off", False, "KSM is running (run = 1) alongside pone: both merge "
                      "the same anonymous guest pages, and KSM's merges are not in pone's "
                      "counters", f"echo 0 > {roots.ksm_dir / 'run'}")
    roots, _ = host_tree(tmp_path / "2", **{KSM_RUN: "2\n"})
    assert pd.check_ksm(roots) == Check("ksm off", True, "KSM stopped, unmerging its pages")
    roots, _ = host_tree(tmp_path / "none", **{KSM_RUN: None})
    assert pd.check_ksm(roots) == Check(
        "ksm off", True, f"{roots.ksm_dir / 'run'} not found: no KSM in this kernel")


def test_pone_run_0_fails(tmp_path, kallsyms):
    roots, dev = host_tree(tmp_path, pone_run="0")
    c = pd.check_pone_kernel(roots)
    assert c == Check("pone kernel", False, "virt_release dialect, pone_run reads 0: no page "
                      "enters pone or ppr", f"echo 1 > {roots.pone_dir / 'pone_run'}")
    failing = [x.name for x in pd.pone_checks(roots, kallsyms, dev=dev) if not x.ok]
    assert failing == ["pone kernel"]


def test_pone_run_garbled_or_missing(tmp_path):
    roots, _ = host_tree(tmp_path, pone_run="on")
    c = pd.check_pone_kernel(roots)
    assert (c.ok, c.detail) == (False, "virt_release dialect, but pone_run: not an integer: 'on'")
    roots, _ = host_tree(tmp_path / "m", pone_run=None)
    assert pd.check_pone_kernel(roots).detail == "virt_release dialect, but pone_run: missing"


def test_early_dialect_has_no_switch(make_tree):
    roots = Roots(make_tree({PONE + "pone_info": "slice alloc cnt: 1\r\n"}))
    assert pd.check_pone_kernel(roots) == Check(
        "pone kernel", True, f"{roots.pone_dir} found (early dialect: no pone_run switch, "
        "merging always on)")


def test_no_pone_dir(tmp_path):
    roots, dev = host_tree(tmp_path)
    roots = Roots(write_tree(tmp_path / "stock", {THP: "[always] madvise never\n",
                                                   KSM_RUN: "1\n"}), tmp_path / "proc")
    checks = pd.pone_checks(roots, None, symbols_reason="/proc/kallsyms: Permission denied",
                            dev=tmp_path / "nodev")
    c = by_name(checks)
    assert [x.name for x in checks] == ["pone kernel", "transparent huge pages", "kvm",
                                        "ksm off", "kernel symbols"]
    assert not any(x.ok for x in checks)
    assert c["pone kernel"].detail == f"{roots.pone_dir} not found: not the Dynamic VM host kernel"
    assert c["pone kernel"].fix.startswith("boot the patched Linux 4.4.1 host kernel")
    assert c["kvm"] == Check("kvm", False, f"{tmp_path}/nodev/kvm not found: KVM is not loaded "
                             "or the CPU has no virtualization support",
                             "modprobe kvm_intel (or kvm_amd); enable VT-x/AMD-V in the firmware")
    assert c["kernel symbols"] == Check(
        "kernel symbols", False, "no symbol table: /proc/kallsyms: Permission denied",
        "run as root to read /proc/kallsyms, or give --system-map FILE or --vmlinux FILE")
    assert pd.info_leak_note(roots, None) is None


def test_stock_kernel_symbols(tmp_path):
    roots = Roots(write_tree(tmp_path / "sys", {THP: "always madvise [never]\n"}),
                  tmp_path / "proc")
    table = S.parse_kallsyms("ffffffff81100000 T msleep\nffffffff81100100 T handle_mm_fault\n")
    checks = pd.pone_checks(roots, table, dev=tmp_path)
    probe = [c for c in checks if c.name.startswith("probe")]
    assert len(probe) == 1 and not probe[0].ok
    assert probe[0].detail.startswith("neither the pone host nor the ppr guest symbols: not a "
                                      "patched kernel; 2 of 18 probe points found")
    assert pd.info_leak_note(roots, table) is None


def test_hidden_addresses_and_missing_point(tmp_path, kallsyms):
    roots, dev = host_tree(tmp_path)
    zero = S.SymbolTable("kallsyms", "/proc/kallsyms",
                         [S.Symbol(s.name, 0, s.type) for s in kallsyms.symbols
                          if s.name != "change_reverse_ref"])
    checks = pd.pone_checks(roots, zero, dev=dev)
    failing = {c.name: c for c in checks if not c.ok}
    assert list(failing) == ["kernel symbols", "probe points (host)", "probe change_reverse_ref",
                             "probe release_merge_page"]
    assert failing["kernel symbols"].fix == ("run as root (or sysctl kernel.kptr_restrict=0) so "
                                             "kallsyms shows addresses")
    assert failing["probe points (host)"].detail == (
        "14 of 16 probe points found; unusable: change_reverse_ref, release_merge_page; known "
        "traps: process_slice_check (never_called), rmap_walk_pone_anon (inlined); "
        "unavailable: merge, merge_fail(change_ref), reclaim_refault")
    assert failing["probe change_reverse_ref"].detail == (
        "missing: no symbol change_reverse_ref in kallsyms: merge, merge_fail(change_ref) "
        "unavailable")
    assert failing["probe change_reverse_ref"].fix.startswith("this kernel lacks it")
    assert failing["probe release_merge_page"].detail.startswith("address_hidden: needs its "
                                                                 "address")


def test_side_effect_files_never_read(tmp_path, kallsyms, monkeypatch):
    roots, dev = host_tree(tmp_path)
    read: list[str] = []
    real = Path.read_text

    def spy(self, *a, **k):
        read.append(self.name)
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", spy)
    pd.pone_checks(roots, kallsyms, dev=dev)
    assert read == ["pone_run", "stat", "stat", "stat", "enabled", "run"]
    assert not set(read) & (pone_sysfs.SIDE_EFFECT_FILES | {pone_sysfs.STAT_END_FILE})


# --- guest --------------------------------------------------------------------------------------

GUEST_SYMS = ("ffffffff81180000 T virt_mark_page_release\n"
              "ffffffff81180100 T virt_mark_page_alloc\n"
              "ffffffff81100000 T msleep\n")


def test_guest_tree_reclaim_on(make_tree):
    roots = Roots(make_tree({PONE + "pone_reclaim_run": "1\n"}))
    assert pd.detect_side(roots, None) == pp.GUEST
    checks = pd.pone_checks(roots, S.parse_kallsyms(GUEST_SYMS))
    assert [(c.name, c.ok) for c in checks] == [
        ("guest reclaim", True), ("kernel symbols", True), ("probe points (guest)", True),
        ("probe virt_mark_page_release", True), ("probe virt_mark_page_alloc", True)]
    assert checks[0].detail == "pone_reclaim_run 1"
    assert checks[2].detail == "2 of 2 probe points found"


def test_guest_reclaim_off(make_tree):
    roots = Roots(make_tree({PONE + "pone_reclaim_run": "0\n"}))
    assert pd.check_guest_reclaim(roots, None) == Check(
        "guest reclaim", False, "pone_reclaim_run reads 0: free pages are not reported to the "
        "host", f"echo 1 > {roots.pone_dir / 'pone_reclaim_run'}")


def test_guest_by_symbols_only(tmp_path):
    roots = Roots(tmp_path / "sys", tmp_path / "proc")
    guest = S.parse_kallsyms(GUEST_SYMS)
    assert pd.detect_side(roots, guest) == pp.GUEST
    assert pd.check_guest_reclaim(roots, guest) == Check(
        "guest reclaim", True, "the guest kernel has free page reclaim (virt_mark_page_release, "
        "virt_mark_page_alloc); no pone_reclaim_run switch")
    stock = S.parse_kallsyms("ffffffff81100000 T msleep\n")
    c = pd.check_guest_reclaim(roots, stock)
    assert (c.ok, c.fix) == (False, "boot a guest kernel built with CONFIG_PPR_MODULE=y")
    assert pd.pone_checks(roots, guest, side=pp.GUEST)[0].ok
    # Forced to the host side, a guest kernel's table has none of the host points.
    host = by_name(pd.pone_checks(roots, guest, side=pp.HOST, dev=tmp_path))
    assert not host["pone kernel"].ok
    assert host["probe points (host)"].detail.startswith(
        "1 of 16 probe points found; unusable: change_reverse_ref,")


# --- doctor(): loading the symbols ---------------------------------------------------------------

def test_doctor_loads_kallsyms_or_says_why(tmp_path):
    roots, dev = host_tree(tmp_path)
    c = by_name(pd.doctor(roots, dev=dev))
    assert not c["kernel symbols"].ok
    assert c["kernel symbols"].detail.startswith(f"no symbol table: {tmp_path}/proc/kallsyms: ")
    write_tree(tmp_path / "proc", {"kallsyms": KALLSYMS.read_text()})
    checks = pd.doctor(roots, dev=dev)
    assert all(x.ok for x in checks) and len(checks) == 26
    c = by_name(pd.doctor(roots, dev=dev, system_map=KALLSYMS))
    assert c["kernel symbols"].detail == f"system.map {KALLSYMS}: 515 symbols (382 text)"


def test_pone_threads_alive_and_a_dead_worker(tmp_path):
    roots, _ = host_tree(tmp_path)
    write_tree(roots.proc, kthread(900, "spthrd_3", flags=0))  # a user process renamed: ignored
    ok = pd.check_threads(roots)
    assert ok.ok and ok.detail == ("spthrd_1 (pid 411, S), spthrd_divide (pid 412, S), "
                                   "spdeamon (pid 413, S)")
    (roots.proc / "411" / "stat").unlink()
    dead = pd.check_threads(roots)
    assert not dead.ok
    assert dead.detail.startswith("a spthrd_<cpu> worker not running (found: spthrd_divide "
                                  "(pid 412, S), spdeamon (pid 413, S))")
    assert "Oops" in dead.fix
