"""The shipped run1 scenario reproduces the counters the real patched kernel printed
(fixtures/pone-virt_release/run1-merge-cow.txt), sample by sample."""

from __future__ import annotations

import re

import pytest

from conftest import FIXTURES
from dynvm_trace.pone_sysfs import normalize_label
from emulator_helpers import SEC, run

RUN1 = FIXTURES / "pone-virt_release" / "run1-merge-cow.txt"
FILL_AT = 11.5
# Not modelled: the kernel's key map/unmap bookkeeping (about 4 per inserted page).
NOT_MODELLED = {"data map key cnt", "data unmap key cnt"}


def fixture_samples() -> list[tuple[float, dict[str, int]]]:
    """(uptime, pone_info) of every `--- pone_info @ uptime T` section of the recording."""
    samples: list[tuple[float, dict[str, int]]] = []
    cur: dict[str, int] | None = None
    for line in RUN1.read_text().splitlines():
        m = re.match(r"--- pone_info @ uptime ([0-9.]+)", line)
        if m:
            cur = {}
            samples.append((float(m.group(1)), cur))
            continue
        if line.startswith(("---", "===")):
            cur = None
            continue
        if cur is None or line.startswith(("MemFree", "AnonPages", "VmRSS")):
            continue
        lm = re.fullmatch(r"(.*?)\s*:?\s*(-?\d+)", line)
        if lm:
            cur[normalize_label(lm.group(1).rstrip(" :"))] = int(lm.group(2))
    return samples


@pytest.fixture(scope="module")
def run1():
    return run("run1", interval_s=0.5)


def test_fixture_parses():
    samples = fixture_samples()
    assert len(samples) == 19
    assert all(len(v) == 34 for _, v in samples)
    assert samples[2][1]["slice merge cnt"] == 65535


def test_every_recorded_sample_is_reproduced(run1):
    """At each uptime the recording sampled pone_info, the emulated counters are the same."""
    for uptime, recorded in fixture_samples():
        emulated = run1.at(uptime)
        diff = {k: (v, emulated[k]) for k, v in recorded.items()
                if k not in NOT_MODELLED and emulated[k] != v}
        assert not diff, f"uptime {uptime}: label: (recorded, emulated) {diff}"


def test_merge_timing_and_counts(run1):
    first = next(r for r in run1.counters() if r["values"]["slice merge cnt"])
    assert first["values"]["slice merge cnt"] == 65535
    assert first["values"]["slice new insert cnt"] == 8196
    assert first["values"]["insert sd tree ok cnt"] == 73731
    delay = first["ts"] / SEC - FILL_AT
    assert 10 <= delay <= 25, delay
    # all at once, in one merge scan: exactly 65,535 merge events in the scan that did them
    merges = run1.of("merge")
    first_merges = [r for r in merges if r["ts"] < 100 * SEC]
    assert len(first_merges) == 65535
    assert len({r["pfn"] for r in first_merges}) == 1
    assert first_merges[0]["into"] == "new" and first_merges[1]["into"] == "existing"
    assert max(r["ts"] for r in first_merges) - min(r["ts"] for r in first_merges) < SEC


def test_cow_break_then_remerge(run1):
    cows = run1.of("cow_break")
    assert len(cows) == 2000
    t_write = min(r["ts"] for r in cows)
    assert {r["addr"] for r in cows} == {i * run1.source.scenario.page_size for i in range(2000)}
    before = run1.at(t_write / SEC - 1)
    after_write = next(r["values"] for r in run1.counters() if r["ts"] >= t_write
                       and r["values"]["delete merge page cnt"] == 2000)
    assert after_write["delete sd tree ok cnt"] == 2001  # + the one unique page written too
    remerges = [r for r in run1.of("merge") if r["ts"] > t_write]
    assert len(remerges) == 1999
    assert len({r["pfn"] for r in remerges}) == 1  # merged with each other
    assert {r["pfn"] for r in remerges}.isdisjoint({r["pfn"] for r in cows})
    # the recording shows them merged again within 15.2 s of the write (three base cycles)
    assert max(r["ts"] for r in remerges) - t_write <= 15 * SEC
    assert run1.at(max(r["ts"] for r in remerges) / SEC + 1)["slice merge cnt"] == \
        before["slice merge cnt"] + 1999


def test_exit_deletes_every_tree_entry(run1):
    last = run1.last
    assert last["delete merge page cnt"] == last["slice merge cnt"] == 67534
    assert last["delete sd tree ok cnt"] == last["insert sd tree ok cnt"] == 75733
    assert len(run1.of("cow_break")) + len(run1.of("unmerge")) == last["delete merge page cnt"]
    assert len(run1.of("merge")) == last["slice merge cnt"]
    assert {r["reason"] for r in run1.of("unmerge")} == {"exit"}
    assert len(run1.of("vm_exit")) == 1


PPR = """
scan_period = 20000
dialect = "virt_release"
duration = 40
[[vm]]
name = "pprwork"
pages = 8192
[[step]]
at = 0.6
vm = "pprwork"
action = "fill"
pattern = "unique"
[[step]]
at = 1.2
vm = "pprwork"
action = "free"
start = 1
count = 997
[[step]]
at = 1.2
vm = "pprwork"
action = "free"
start = 2000
count = 53
fail = 1.0
[[step]]
at = 11.5
vm = "pprwork"
action = "touch"
start = 1
count = 101
"""


def test_ppr_release_refault_numbers():
    """fixtures/pone-virt_release/ppr-release-refault.txt: 997 good marks + 53 bad slots,
    then writes into 101 released pages (scan period 20000)."""
    from emulator_helpers import scenario
    r = run(scenario(PPR), interval_s=0.1)
    before = r.at(1.3)
    after = r.at(6.2)  # "INFO t+5s after marking"
    assert after["virt page merge count"] == 997
    assert after["virt page merge count err"] == 53
    assert after["page recycle count"] == 997
    assert after["slice deamon find volatile cnt"] - before["slice deamon find volatile cnt"] == 1050
    assert after["slice out que cnt"] - before["slice out que cnt"] == 1050
    assert after["slice que change watch cnt"] - before["slice que change watch cnt"] == 53
    assert after["slice merge cnt"] == 0 and after["slice new insert cnt"] == 0
    refault = r.at(11.6)  # "INFO right after refault"
    assert refault["page recycle count"] == 896
    assert refault["slice alloc cnt"] - after["slice alloc cnt"] == 101
    assert sum(x["pages"] for x in r.of("reclaim_refault")) == 101
    assert {x["status"] for x in r.of("reclaim_release")} == {"released", "failed"}
