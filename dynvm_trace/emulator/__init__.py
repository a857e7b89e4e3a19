"""The emulated pone host (`--source emulate`): a model of what the patched kernel does.

- scenario.py  — TOML scenarios: load_scenario(name_or_path), list_scenarios(), ScenarioError,
                 scale_scenario(n_vms, memory_bytes) (the `scaleN` family)
- model.py     — Host: guest RAM as numpy arrays, the pone daemon and ppr; yields Chunks
- sysfs_tree.py — EmulatedPoneTree: the emulated /sys/kernel/mm/pone (atomic writes, knobs read back)
- sources/emulate.py — EmulateSource(scenario, seed, speed, dialect, sysfs_root): the Source

Decisions (inferred from kernel/pone.md and the recorded fixtures; tests/test_emulator_*.py
hold them):
- Pipeline: a page written at t is aged by the first base cycle after t, write-protected by the
  next merge scan (slice deamon find volatile / slice out que / slice que change watch +1) and
  inserted by the merge scan after that (slice deamon fine watch / slice out watch que /
  insert sd tree ok +1, and slice merge cnt or slice new insert cnt +1). The recording needs
  the aging stage: its fill was not write-protected at +2 s, and not merged at +12 s.
- slice alloc cnt and slice change volatile ok cnt +1 per page that gets a new host page in a
  tracked process (first touch, COW copy, write to a sole tree page, refault); a write to a
  write-protected page not yet inserted: slice mem watch reuse + slice change volatile ok +1.
- A write to a tree page: delete sd tree ok + slice pre fix check +1; if its group keeps other
  sharers, also delete merge page cnt +1 and a cow_break event. Exit: the same per tree page,
  with unmerge events (reason "exit"), and page recycle count drops by the VM's released pages
  (vm_exit carries them as `released`).
- ppr: a guest free writes the ppr mark into each page (so a merged page is COW-broken first),
  emits reclaim_report(pages); the next base cycle (pone_run, daemon and pone_recycle_run /
  pone_reclaim_run on) releases it: find volatile / out que +1, virt page merge count and page
  recycle count +1, content becomes the zero page; a bad slot (`fail` fraction): virt page
  merge count err +1, slice que change watch +1, and it goes on to the merge path.
  reclaim_release / reclaim_refault: one record per contiguous run of pages (pages = length).
- pone_run 0: the daemon does nothing and pages first touched meanwhile are never tracked.
- Fake pfns: page g's host frame is g + total_pages * generation (mod 256), the generation
  counting the new host pages it got; a group's kept pfn is its first page's frame.
- Failure modes (pone.md): `pin` frees pages that hold an extra reference: their release fails
  every base cycle (virt page merge count err, find volatile and out que +N each cycle, a
  failed reclaim_release per run; no slice que change watch: they stay marked). `crash_worker`:
  the one worker of the emulated 2-vCPU host (spthrd_1) dies: it leaves the `workers` group
  (spthrd_1, spthrd_divide, spdeamon with fake pids 97-99); the daemon still ages pages and
  finds aged, watch and marked pages every cycle (find volatile / fine watch rise by them each
  time) but nothing is write-protected, inserted, merged or released (out que stops).
- Not modelled: data map/unmap key cnt, the free counters, merge errors (all stay 0).
"""

from .model import Host
from .scenario import Scenario, ScenarioError, list_scenarios, load_scenario, scale_scenario

__all__ = ["Host", "Scenario", "ScenarioError", "list_scenarios", "load_scenario",
           "scale_scenario"]
