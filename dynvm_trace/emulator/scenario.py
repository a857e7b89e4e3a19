"""Scenarios of the emulated pone host: TOML files (stdlib tomllib), loaded and validated.

A scenario names the VMs (qemu processes with guest RAM), the pone knobs, and a timeline of
workload steps. Every mistake is a ScenarioError whose message names the file and the field,
e.g. ``demo.toml: step[3].action: unknown action 'fil' (one of fill, write, free, pin, touch,
exit, set, crash_worker)``.

Format (times in seconds of emulated time since the start; sizes are pages (int) or byte
strings such as "4GiB", "512MiB", "64KiB", converted with the page size)::

    name = "run1"                 # optional, default: the file's stem
    description = "..."           # optional
    dialect = "virt_release"      # optional: "guide" (default) or "virt_release"
    scan_period = 5000            # optional, ms (pone_[daemon|deamon]_scan_period), default 20000
    duration = 215                # optional, seconds; default: last step + 30 s
    page_size = 4096              # optional; default the host's page size

    [knobs]                       # optional initial knobs (canonical names, any dialect)
    run = 1                       # pone_run
    recycle_run = 1               # pone_recycle_run / pone_reclaim_run
    daemon_run = 1                # pone_daemon_run (guide)

    [[vm]]
    name = "vm1"
    comm = "qemu-system-x86"      # default; any other comm is ignored by pone
    memory = "4GiB"               # or: pages = 1048576 (exactly one of the two)
    start = 0.0                   # optional, seconds
    pid = 1046                    # optional, default 1000 + 16 * index

    [[step]]
    at = 11.5                     # seconds
    vm = "vm1"                    # required except for actions "set" and "crash_worker"
    action = "fill"               # fill | write | free | pin | touch | exit | set | crash_worker
    start = 0                     # first page: index or byte offset string; default 0
    count = 65536                 # pages or size string; default: to the end of guest RAM
    sample = 1000                 # optional: that many pages drawn at random from the range
    only = "any"                  # optional filter before sampling: any | present | merged |
                                  #   released  (touch defaults to "released")
    pattern = "identical"         # fill/write/touch: zero | identical | unique | sampled |
                                  #   increment (write/touch only) | mix
    value = "os-image"            # identical/sampled: a content name shared across steps/VMs
    distinct = 300                # sampled: number of distinct contents in the pool
    mix = { zero = 0.2, identical = 0.3, sampled = 0.2, unique = 0.3 }  # pattern "mix"
    fail = 0.05                   # free: fraction of pages with a bad slot (release fails)
    knob = "run"                  # set: canonical knob name ...
    value = 0                     # ... and its value (set only: an integer)
    worker = "spthrd_1"           # crash_worker: the thread that dies (default spthrd_1)

The kernel's own failure modes (kernel/pone.md, "Failure modes of the kernel itself"):

- ``pin`` frees pages like ``free`` (same fields but ``fail``), and the pages also hold an extra
  reference (pinned, e.g. by I/O): their release fails in every base cycle from then on
  (``virt page merge count err`` +N each cycle, a ``reclaim_release`` record with status
  ``failed`` per run of pages each cycle) until the guest writes them again.
- ``crash_worker`` (no vm): the worker thread dies (an Oops, as from a negative pool id in a
  mark). It leaves the ``workers`` counters group. The emulated host has 2 vCPUs, so one worker,
  ``spthrd_1``, does all the write-protect, insert, merge and release work: from then on the daemon
  still finds pages and queues them (``slice deamon find volatile cnt`` and ``slice deamon fine
  watch cnt`` keep rising, the same pages found again every cycle) but nothing is served
  (``slice out que cnt`` stops; no merges, no releases). ``spthrd_divide`` may be named too
  (it leaves the group; nothing else changes: the emulator does not model cluster splitting).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..paths import page_size as host_page_size

QEMU_COMM = "qemu-system-x86"
DIALECTS = ("guide", "virt_release")
ACTIONS = ("fill", "write", "free", "pin", "touch", "exit", "set", "crash_worker")
CRASHABLE_WORKERS = ("spthrd_1", "spthrd_divide")
PATTERNS = ("zero", "identical", "unique", "sampled", "increment", "mix")
MIX_PATTERNS = ("zero", "identical", "unique", "sampled")
ONLY = ("any", "present", "merged", "released")
# canonical knob name -> file name per dialect (None: the dialect has no such knob)
KNOB_FILES: dict[str, dict[str, str | None]] = {
    "run": {"guide": "pone_run", "virt_release": "pone_run"},
    "recycle_run": {"guide": "pone_reclaim_run", "virt_release": "pone_recycle_run"},
    "scan_period": {"guide": "pone_daemon_scan_period", "virt_release": "pone_deamon_scan_period"},
    "daemon_run": {"guide": "pone_daemon_run", "virt_release": None},
    "divide_thread_enable": {"guide": "pone_divide_thread_enable",
                             "virt_release": "pone_divide_thread_enable"},
    "nice": {"guide": "pone_nice", "virt_release": None},
}
KNOB_DEFAULTS = {"run": 1, "recycle_run": 1, "scan_period": 20000, "daemon_run": 1,
                 "divide_thread_enable": 1, "nice": 0}

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


class ScenarioError(Exception):
    """A scenario that cannot be used; str() names the file and the field."""

    def __init__(self, where: str, field_name: str | None, message: str):
        self.where, self.field, self.message = where, field_name, message
        super().__init__(f"{where}: {field_name}: {message}" if field_name else f"{where}: {message}")


@dataclass
class VMSpec:
    name: str
    pages: int
    comm: str = QEMU_COMM
    start: float = 0.0
    pid: int = 0

    @property
    def tracked(self) -> bool:
        """pone tracks only tasks whose comm is exactly qemu-system-x86."""
        return self.comm == QEMU_COMM


@dataclass
class Step:
    at: float
    action: str
    vm: str | None = None
    start: int = 0
    count: int | None = None  # None: to the end of guest RAM
    sample: int | None = None
    only: str = "any"
    pattern: str = "unique"
    value: str | int | None = None
    distinct: int = 256
    mix: dict[str, float] = field(default_factory=dict)
    fail: float = 0.0
    knob: str | None = None
    worker: str | None = None  # crash_worker
    index: int = 0  # position in the file, for messages


@dataclass
class Scenario:
    name: str
    vms: list[VMSpec]
    steps: list[Step]
    duration: float
    scan_period: int = 20000
    dialect: str = "guide"
    page_size: int = 4096
    knobs: dict[str, int] = field(default_factory=dict)
    description: str = ""
    source: str = "<scenario>"

    def vm(self, name: str) -> VMSpec:
        return next(v for v in self.vms if v.name == name)

    @property
    def total_pages(self) -> int:
        return sum(v.pages for v in self.vms)


# --- field helpers ------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, where: str, page_size: int):
        self.where, self.page_size = where, page_size

    def err(self, fld: str, msg: str) -> ScenarioError:
        return ScenarioError(self.where, fld, msg)

    def get(self, table: dict, key: str, fld: str, types: type | tuple, required: bool = False,
            default: Any = None) -> Any:
        if key not in table:
            if required:
                raise self.err(fld, "missing (required)")
            return default
        v = table[key]
        tt = types if isinstance(types, tuple) else (types,)
        if isinstance(v, bool) and bool not in tt or not isinstance(v, tt):
            names = " or ".join("number" if t is float else t.__name__ for t in tt)
            raise self.err(fld, f"should be {names}, not {type(v).__name__} ({v!r})")
        return v

    def number(self, table: dict, key: str, fld: str, required: bool = False,
               default: float | None = None, minimum: float = 0.0) -> float | None:
        v = self.get(table, key, fld, (int, float), required, default)
        if v is None:
            return None
        if not math.isfinite(v) or v < minimum:
            raise self.err(fld, f"must be a finite number >= {minimum:g}, not {v!r}")
        return float(v)

    def pages(self, value: Any, fld: str, allow_zero: bool = True) -> int:
        """Pages from an int, or from a byte size string ("4GiB")."""
        if isinstance(value, bool):
            raise self.err(fld, f"should be a page count or a size string, not {value!r}")
        if isinstance(value, int):
            n = value
        elif isinstance(value, str):
            m = _SIZE.fullmatch(value)
            if not m or m.group(2).lower() not in _UNITS:
                raise self.err(fld, f"not a size: {value!r} (e.g. 4096, \"4GiB\", \"512MiB\")")
            nbytes = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if nbytes % self.page_size:
                raise self.err(fld, f"{value!r} is not a multiple of the page size {self.page_size}")
            n = int(nbytes) // self.page_size
        else:
            raise self.err(fld, f"should be a page count or a size string, not {type(value).__name__}")
        if n < 0 or (n == 0 and not allow_zero):
            raise self.err(fld, f"must be {'>= 0' if allow_zero else '> 0'}, not {value!r}")
        return n

    def unknown(self, table: dict, allowed: set[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.err(f"{prefix}{key}", "unknown field")


_TOP = {"name", "description", "dialect", "scan_period", "duration", "page_size", "knobs",
        "vm", "step", "seed"}
_VM = {"name", "comm", "memory", "pages", "start", "pid"}
_STEP = {"at", "vm", "action", "start", "count", "sample", "only", "pattern", "value",
         "distinct", "mix", "fail", "knob", "worker"}


def parse_scenario(data: dict[str, Any], where: str = "<scenario>", name: str | None = None,
                   page_size: int | None = None) -> Scenario:
    """Validate a decoded TOML document; raises ScenarioError naming `where` and the field."""
    ctx = _Ctx(where, 4096)
    ctx.unknown(data, _TOP, "")
    ps = ctx.get(data, "page_size", "page_size", int, default=page_size or host_page_size())
    if ps <= 0 or ps & (ps - 1):
        raise ctx.err("page_size", f"must be a power of two > 0, not {ps}")
    ctx.page_size = ps
    sc_name = ctx.get(data, "name", "name", str, default=name or "scenario")
    desc = ctx.get(data, "description", "description", str, default="")
    dialect = ctx.get(data, "dialect", "dialect", str, default="guide")
    if dialect not in DIALECTS:
        raise ctx.err("dialect", f"unknown dialect {dialect!r} (one of {', '.join(DIALECTS)})")
    period = ctx.get(data, "scan_period", "scan_period", int, default=20000)
    if period <= 0:
        raise ctx.err("scan_period", f"must be > 0 ms, not {period}")
    knobs_t = ctx.get(data, "knobs", "knobs", dict, default={})
    knobs: dict[str, int] = {}
    for k, v in knobs_t.items():
        if k not in KNOB_FILES:
            raise ctx.err(f"knobs.{k}", f"unknown knob (one of {', '.join(KNOB_FILES)})")
        knobs[k] = ctx.get(knobs_t, k, f"knobs.{k}", int)

    vm_list = ctx.get(data, "vm", "vm", list, required=True)
    if not vm_list:
        raise ctx.err("vm", "at least one [[vm]] is needed")
    vms: list[VMSpec] = []
    for i, t in enumerate(vm_list):
        p = f"vm[{i}]."
        if not isinstance(t, dict):
            raise ctx.err(f"vm[{i}]", "should be a table ([[vm]])")
        ctx.unknown(t, _VM, p)
        vname = ctx.get(t, "name", p + "name", str, required=True)
        if any(v.name == vname for v in vms):
            raise ctx.err(p + "name", f"duplicate VM name {vname!r}")
        if ("memory" in t) == ("pages" in t):
            raise ctx.err(p + "memory", "give exactly one of memory (a size) or pages (a count)")
        if "memory" in t:
            pages = ctx.pages(ctx.get(t, "memory", p + "memory", (str, int)), p + "memory", False)
        else:
            pages = ctx.pages(ctx.get(t, "pages", p + "pages", int), p + "pages", False)
        vms.append(VMSpec(
            name=vname, pages=pages,
            comm=ctx.get(t, "comm", p + "comm", str, default=QEMU_COMM),
            start=ctx.number(t, "start", p + "start", default=0.0),
            pid=ctx.get(t, "pid", p + "pid", int, default=1000 + 16 * i)))
        if vms[-1].pid <= 0:
            raise ctx.err(p + "pid", "must be > 0")
    by_name = {v.name: v for v in vms}

    step_list = ctx.get(data, "step", "step", list, default=[])
    steps: list[Step] = []
    exited: dict[str, float] = {}
    for i, t in enumerate(step_list):
        p = f"step[{i}]."
        if not isinstance(t, dict):
            raise ctx.err(f"step[{i}]", "should be a table ([[step]])")
        ctx.unknown(t, _STEP, p)
        at = ctx.number(t, "at", p + "at", required=True)
        action = ctx.get(t, "action", p + "action", str, required=True)
        if action not in ACTIONS:
            raise ctx.err(p + "action", f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
        st = Step(at=at, action=action, index=i)
        if action == "set":
            st.knob = ctx.get(t, "knob", p + "knob", str, required=True)
            if st.knob not in KNOB_FILES:
                raise ctx.err(p + "knob", f"unknown knob {st.knob!r} (one of {', '.join(KNOB_FILES)})")
            st.value = ctx.get(t, "value", p + "value", int, required=True)
            steps.append(st)
            continue
        if "worker" in t and action != "crash_worker":
            raise ctx.err(p + "worker", f"not a field of action {action!r}")
        if action == "crash_worker":
            for k in t:
                if k not in ("at", "action", "worker"):
                    raise ctx.err(p + k, "not a field of action 'crash_worker'")
            st.worker = ctx.get(t, "worker", p + "worker", str, default="spthrd_1")
            if st.worker not in CRASHABLE_WORKERS:
                raise ctx.err(p + "worker", f"unknown worker {st.worker!r} (one of "
                                            f"{', '.join(CRASHABLE_WORKERS)})")
            steps.append(st)
            continue
        st.vm = ctx.get(t, "vm", p + "vm", str, required=True)
        vm = by_name.get(st.vm)
        if vm is None:
            raise ctx.err(p + "vm", f"no [[vm]] named {st.vm!r}")
        if at < vm.start:
            raise ctx.err(p + "at", f"{at:g} s is before VM {vm.name!r} starts ({vm.start:g} s)")
        if st.vm in exited and at >= exited[st.vm]:
            raise ctx.err(p + "at", f"VM {vm.name!r} has exited at {exited[st.vm]:g} s")
        if action == "exit":
            exited[st.vm] = at
            steps.append(st)
            continue
        st.start = ctx.pages(ctx.get(t, "start", p + "start", (int, str), default=0), p + "start")
        if "count" in t:
            st.count = ctx.pages(ctx.get(t, "count", p + "count", (int, str)), p + "count")
        if st.start + (st.count or 0) > vm.pages or st.start >= vm.pages:
            raise ctx.err(p + "count" if "count" in t else p + "start",
                          f"pages {st.start}..{st.start + (st.count or 0)} are outside VM "
                          f"{vm.name!r} ({vm.pages} pages)")
        if "sample" in t:
            st.sample = ctx.get(t, "sample", p + "sample", int)
            if st.sample < 0:
                raise ctx.err(p + "sample", f"must be >= 0, not {st.sample}")
        st.only = ctx.get(t, "only", p + "only", str, default="released" if action == "touch" else "any")
        if st.only not in ONLY:
            raise ctx.err(p + "only", f"unknown filter {st.only!r} (one of {', '.join(ONLY)})")
        if action in ("free", "pin"):
            for k in ("pattern", "value", "distinct", "mix") + (("fail",) if action == "pin" else ()):
                if k in t:
                    raise ctx.err(p + k, f"not a field of action {action!r}")
            st.fail = ctx.number(t, "fail", p + "fail", default=0.0)
            if st.fail > 1:
                raise ctx.err(p + "fail", f"a fraction 0..1, not {st.fail}")
        else:
            if "fail" in t:
                raise ctx.err(p + "fail", f"not a field of action {action!r}")
            st.pattern = ctx.get(t, "pattern", p + "pattern", str, default="unique")
            if st.pattern not in PATTERNS:
                raise ctx.err(p + "pattern", f"unknown pattern {st.pattern!r} (one of {', '.join(PATTERNS)})")
            if st.pattern == "increment" and action == "fill":
                raise ctx.err(p + "pattern", "'increment' changes existing content: use it with write or touch")
            st.value = ctx.get(t, "value", p + "value", (str, int), default=None)
            st.distinct = ctx.get(t, "distinct", p + "distinct", int, default=256)
            if st.distinct <= 0:
                raise ctx.err(p + "distinct", f"must be > 0, not {st.distinct}")
            if st.pattern == "mix":
                mix = ctx.get(t, "mix", p + "mix", dict, required=True)
                for k in mix:
                    if k not in MIX_PATTERNS:
                        raise ctx.err(f"{p}mix.{k}", f"unknown pattern (one of {', '.join(MIX_PATTERNS)})")
                    ctx.number(mix, k, f"{p}mix.{k}")
                if sum(mix.values()) <= 0:
                    raise ctx.err(p + "mix", "fractions must add up to more than 0")
                st.mix = {k: float(mix[k]) for k in MIX_PATTERNS if k in mix}
            elif "mix" in t:
                raise ctx.err(p + "mix", "only with pattern = \"mix\"")
        steps.append(st)
    steps.sort(key=lambda s: s.at)  # stable: same-time steps keep file order

    last = max([s.at for s in steps] + [v.start for v in vms] + [0.0])
    duration = ctx.number(data, "duration", "duration", default=last + 30.0)
    if duration <= 0:
        raise ctx.err("duration", "must be > 0 s")
    return Scenario(name=sc_name, vms=vms, steps=steps, duration=duration, scan_period=period,
                    dialect=dialect, page_size=ps, knobs=knobs, description=desc, source=where)


# --- loading -------------------------------------------------------------------------------------

def _shipped() -> dict[str, Any]:
    base = resources.files("dynvm_trace.scenarios")
    return {p.name[:-5]: p for p in base.iterdir() if p.name.endswith(".toml")}


def list_scenarios() -> list[tuple[str, str]]:
    """(name, description) of the shipped scenarios (dynvm_trace/scenarios/*.toml), plus
    `scale64` of the generated `scale<N>[x<GiB>]` family (N VMs of 4 GiB by default)."""
    out = []
    for name, path in sorted(_shipped().items()):
        try:
            desc = tomllib.loads(path.read_text(encoding="utf-8")).get("description", "")
        except (OSError, tomllib.TOMLDecodeError):
            desc = "(unreadable)"
        out.append((name, str(desc)))
    out.append(("scale64", "generated: 64 qemu VMs x 4 GiB (67 M pages of 4 KiB); also "
                           "scale<N> and scale<N>x<GiB>"))
    return sorted(out)


_SCALE = re.compile(r"scale(\d+)(?:x(\d+)(?:gib|g)?)?", re.I)


def load_scenario(name_or_path: str | Path, page_size: int | None = None) -> Scenario:
    """A shipped scenario by name ("run1", "demo", ...), a generated `scale<N>[x<GiB>]`, or a
    TOML file by path. Raises ScenarioError (naming the file and field) when it is invalid or
    does not exist."""
    s = str(name_or_path)
    shipped = _shipped()
    if s in shipped:
        text = shipped[s].read_text(encoding="utf-8")
        return loads_scenario(text, where=f"{s}.toml", name=s, page_size=page_size)
    m = _SCALE.fullmatch(s)
    if m and s not in shipped:
        return scale_scenario(int(m.group(1)), int(m.group(2) or 4) << 30, page_size=page_size)
    path = Path(s)
    if not path.exists():
        raise ScenarioError(s, None, f"no such scenario file, and not a shipped scenario "
                                     f"(shipped: {', '.join(n for n, _ in list_scenarios())})")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError(str(path), None, f"cannot read: {e.strerror or e}") from None
    return loads_scenario(text, where=str(path), name=path.stem, page_size=page_size)


def loads_scenario(text: str, where: str = "<scenario>", name: str | None = None,
                   page_size: int | None = None) -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(where, None, f"not valid TOML: {e}") from None
    return parse_scenario(data, where, name, page_size)


def scale_scenario(n_vms: int = 64, memory_bytes: int = 4 << 30, page_size: int | None = None,
                   fill_fraction: float = 0.75, duration: float = 60.0) -> Scenario:
    """A big host: `n_vms` qemu VMs of `memory_bytes` each, started together, each filling
    `fill_fraction` of its RAM with a guest-like mix (zero pages, an OS image shared by all VMs,
    sampled library pages, unique data), then writing and freeing a little."""
    ps = page_size or host_page_size()
    pages = memory_bytes // ps
    vms = [{"name": f"vm{i:02d}", "pages": pages} for i in range(n_vms)]
    filled = int(pages * fill_fraction)
    steps: list[dict[str, Any]] = []
    for i in range(n_vms):
        steps.append({"at": 1.0, "vm": f"vm{i:02d}", "action": "fill", "count": filled,
                      "pattern": "mix", "value": "guest-os", "distinct": 50000,
                      "mix": {"zero": 0.25, "sampled": 0.35, "identical": 0.05, "unique": 0.35}})
    for i in range(n_vms):
        steps.append({"at": 30.0, "vm": f"vm{i:02d}", "action": "write", "count": filled,
                      "sample": filled // 100, "pattern": "unique"})
        steps.append({"at": 31.0, "vm": f"vm{i:02d}", "action": "free", "start": filled // 2,
                      "count": filled // 2, "sample": filled // 50})
    data = {"name": f"scale{n_vms}", "description": f"{n_vms} VMs x {memory_bytes >> 30} GiB",
            "scan_period": 5000, "duration": duration, "page_size": ps, "vm": vms, "step": steps}
    return parse_scenario(data, where=f"scale{n_vms} (generated)", page_size=ps)
