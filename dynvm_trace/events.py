"""The one event model every source yields and every aggregator, view and exporter reads.

A record is a plain dict (it is what a log line decodes to, and dicts are the fastest thing
Python has to build and read). Every record carries:

    kind  str   one of KINDS
    ts    int   nanoseconds on the source's clock (see the log header's "clock")
    src   str   the source that produced it (pone, ksm, emulate)
    pid   int   process (the VM's qemu), where known
    comm  str   its command name, where known
    vm    str   the VM's name, where known

and the fields of its kind below. A field that is not known is left out, never set to null.
`docs/event-log.md` is the authority for their meaning; FORMAT_VERSION versions both.
"""

from __future__ import annotations

from typing import Any

FORMAT_VERSION = 1

COMMON: dict[str, type | tuple[type, ...]] = {
    "kind": str, "ts": int, "src": str, "pid": int, "comm": str, "vm": str,
}
REQUIRED_COMMON = ("kind", "ts", "src")

# kind -> {field: type}; fields marked in REQUIRED must be present.
KINDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    # a page became shared: old_pfn (the freed duplicate) now maps the kept pfn
    "merge": {"pfn": int, "old_pfn": int, "addr": int, "into": str},
    # a merge attempt failed
    "merge_fail": {"reason": str, "stage": str, "code": int, "pfn": int, "addr": int},
    # a write to a merged page produced a private copy
    "cow_break": {"pfn": int, "new_pfn": int, "addr": int},
    # a page left sharing for another reason: unmap, unmerge, process exit
    "unmerge": {"reason": str, "pfn": int, "addr": int},
    # a guest reported free pages
    "reclaim_report": {"pages": int, "gfns": list, "ok": bool},
    # the host released backing memory; status "released" (default), "retry" or "failed"
    "reclaim_release": {"pages": int, "addr": int, "status": str, "pfn": int},
    # a released page was faulted back in
    "reclaim_refault": {"pages": int, "addr": int},
    # a scan cycle of the merge daemon; merge_scan says whether it ran the merge pass
    "scan_start": {"seq": int, "merge_scan": bool},
    "scan_end": {"seq": int, "merge_scan": bool, "pages_scanned": int},
    # a VM (qemu process) appeared, with pages of guest RAM, or went away; released: the
    # released (reclaimed) pages it still had, which the kernel stops counting at exit
    "vm_start": {"pages": int},
    "vm_exit": {"released": int, "merged": int},
    # a snapshot of a group of kernel counters (group: pone_info, pone_abstract, ksm, vmstat,
    # ksm_stat, meminfo, workers); values maps the kernel's own labels to numbers
    "counters": {"group": str, "values": dict},
    # count events were lost (where, why)
    "lost": {"count": int, "where": str, "why": str},
    # a failure of the kernel itself, derived from the stream by dynvm_trace.alerts: alert is a
    # stable id (release_stuck, worker_stalled, worker_gone), message one line for people;
    # pages/pfns/addr/worker where they apply; evidence: events, counters or workers; count:
    # times the condition had been seen when it was raised
    "alert": {"alert": str, "message": str, "pages": int, "pfns": list, "addr": int,
              "worker": str, "count": int, "first_ts": int, "evidence": str},
    # events counted in the kernel instead of streamed (the ksm source under `top`): for one
    # process (or none: the host), counts per record kind that happened in [ts, ts+window_ns];
    # pages per reclaim kind. Aggregators add them as if they were that many records.
    "tally": {"counts": dict, "pages": dict, "window_ns": int},
}

REQUIRED: dict[str, tuple[str, ...]] = {
    "merge_fail": ("reason",),
    "unmerge": ("reason",),
    "reclaim_report": ("pages",),
    "reclaim_release": ("pages",),
    "reclaim_refault": ("pages",),
    "scan_start": ("seq",),
    "scan_end": ("seq",),
    "counters": ("group", "values"),
    "lost": ("count", "where", "why"),
    "alert": ("alert", "message"),
    "tally": ("counts",),
}

# Kinds that are page-sharing events, in the order views list them.
MERGE_KINDS = ("merge", "merge_fail", "cow_break", "unmerge")
RECLAIM_KINDS = ("reclaim_report", "reclaim_release", "reclaim_refault")


def event(kind: str, ts: int, src: str, **fields: Any) -> dict[str, Any]:
    """Build a record, leaving out the fields given as None."""
    rec = {"kind": kind, "ts": ts, "src": src}
    rec.update((k, v) for k, v in fields.items() if v is not None)
    return rec


def problems(rec: Any) -> list[str]:
    """What is wrong with a record, as short phrases; empty when it is valid."""
    if not isinstance(rec, dict):
        return [f"a record is a JSON object, not {type(rec).__name__}"]
    kind = rec.get("kind")
    if kind not in KINDS:
        return [f"unknown kind {kind!r}"]
    out = [f"missing field {f!r}" for f in REQUIRED_COMMON + REQUIRED.get(kind, ()) if f not in rec]
    spec = KINDS[kind]
    for name, value in rec.items():
        want = COMMON.get(name) or spec.get(name)
        if want is None:
            continue  # unknown fields are kept: newer minor versions may add them
        if isinstance(value, bool) and want is int or not isinstance(value, want):
            out.append(f"field {name!r} should be {_type_name(want)}, not {type(value).__name__}")
    return out


def _type_name(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__
