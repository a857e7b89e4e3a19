"""The summary of a log (or any header + batches): a JSON-serialisable dict, and its text form.

`summarize()` is what `report --json` prints; `render_text()` is the human form: plain text,
fixed column widths, deterministic (golden-file tested).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from .aggregators import Aggregates, Record
from .alerts import Alerts
from .lifetimes import bucket_range
from .paths import page_size as host_page_size

COUNTERS_ONLY = "counters only: no events to compare"
HEADER_FIELDS = ("source", "kernel", "host", "page_size", "clock", "tool_version", "wall_anchor")


class Log(Protocol):
    header: dict[str, Any]
    warnings: list[str]

    def batches(self) -> Iterable[list[Record]]: ...


def summarize(log: Log | tuple[dict[str, Any], Iterable[list[Record]]],
              interval_ns: int = 1_000_000_000) -> dict[str, Any]:
    """Read every batch of a LogReader, or of a (header, batches) pair, and summarise it."""
    if isinstance(log, tuple):
        header, batches = log
        reader_warnings: list[str] = []
    else:
        header, batches, reader_warnings = log.header, log.batches(), log.warnings
    agg = aggregates_for(header, interval_ns)
    agg.feed_all(batches)
    return summary_of(header, agg, reader_warnings)


class AggregatesWithAlerts(Aggregates):
    """Aggregates, and the alert detector (dynvm_trace.alerts) fed the same batches: `alerts`.
    `feed` returns the alert records the batch raised (for a writer to put into its log)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alerts = Alerts()

    def feed(self, records: list[Record], now: int | None = None) -> list[Record]:
        super().feed(records, now)
        return self.alerts.feed(records) if records else []


def aggregates_for(header: dict[str, Any], interval_ns: int = 1_000_000_000) -> AggregatesWithAlerts:
    """Aggregates (with alerts) for the stream a header describes (its page size, else this
    host's)."""
    size = header.get("page_size")
    return AggregatesWithAlerts(size if isinstance(size, int) and size > 0 else host_page_size(),
                                interval_ns)


def summary_of(header: dict[str, Any], agg: Aggregates, reader_warnings: list[str] = ()) -> dict[str, Any]:
    """The summary of what `agg` has been fed: the same for a log and for a live run. Alerts
    come from `agg.alerts` (aggregates_for's); a plain Aggregates has none."""
    warnings = list(reader_warnings)
    size = header.get("page_size")
    if not isinstance(size, int) or size <= 0:
        warnings.append(f"the header gives no page size; using this host's ({agg.page_size} bytes)")
    snap = agg.snapshot()
    if header.get("counters_only") is True:  # an imported recording: nothing to compare
        snap["correlation"] = {"verdict": COUNTERS_ONLY, "late_records": 0, "rules": [],
                               "counters_records": snap["correlation"]["counters_records"]}
    warnings += _warnings(snap)
    return {
        "header": {k: header.get(k) for k in HEADER_FIELDS} | {"page_size": agg.page_size},
        "span": snap["span"],
        "totals": snap["totals"],
        "vms": snap["vms"],
        "lifetimes": snap["lifetimes"],
        "counters": snap["counters"],
        "correlation": snap["correlation"],
        "lost": snap["totals"]["lost"],
        "alerts": agg.alerts.snapshot() if isinstance(getattr(agg, "alerts", None), Alerts) else [],
        "warnings": warnings,
    }


def _warnings(snap: dict[str, Any]) -> list[str]:
    out = []
    lost = snap["totals"]["lost"]
    if lost:
        out.append(f"{lost:,} events were lost: event figures undercount")
    corr = snap["correlation"]
    if corr["late_records"]:
        out.append(f"{corr['late_records']:,} records came after a counters record with a "
                   "later or equal timestamp: they were compared in the following window")
    if corr["counters_records"] and not corr["rules"] and corr["verdict"] != COUNTERS_ONLY:
        out.append("counters were recorded, but no group had two snapshots a rule could compare")
    negative = [row["vm"] for row in snap["vms"] if row["shared_pages"] < 0]
    if negative:
        out.append("more sharing ended than began for " + ", ".join(negative)
                   + ": the log started with pages already merged")
    return out


# ---- text ----------------------------------------------------------------------------------

MIB, GIB = 1 << 20, 1 << 30
STARS = 40


def fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def fmt_bytes(n: int) -> str:
    return f"{n / GIB:,.2f} GiB" if abs(n) >= GIB else f"{n / MIB:,.2f} MiB"


def fmt_ns(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:,.3f} s"


def render_text(summary: dict[str, Any]) -> str:
    """The report as plain text (ends with a newline)."""
    parts = [_header(summary), _totals(summary["totals"]), _vms(summary["vms"]),
             _lifetimes(summary["lifetimes"]), _counters(summary["counters"]),
             _correlation(summary["correlation"]), _alerts(summary.get("alerts", [])),
             _warnings_text(summary["warnings"])]
    return "\n\n".join(p for p in parts if p) + "\n"


def _header(s: dict[str, Any]) -> str:
    h, span = s["header"], s["span"]
    rows = [("source", h["source"]), ("kernel", h["kernel"]), ("host", h["host"]),
            ("page size", f"{h['page_size']:,} bytes"), ("clock", h["clock"]),
            ("covered", f"{fmt_ns(span['duration_ns'])} (ts {fmt_int(span['first_ts'])} .. "
                        f"{fmt_int(span['last_ts'])})"),
            ("lost events", fmt_int(s["lost"]))]
    return "dynvm-trace report\n" + "\n".join(f"{k:<12} {v if v is not None else '-'}"
                                              for k, v in rows)


def _totals(t: dict[str, Any]) -> str:
    lines = [f"{'EVENTS':<20} {'records':>14} {'pages':>14}"]
    for kind, n in t["events"].items():
        lines.append(f"{kind:<20} {n:>14,} {fmt_int(t['pages'].get(kind)):>14}")
    release = ", ".join(f"{status} {n:,}" for status, n in t["release"].items())
    lines.append(f"reclaim_release pages by status: {release}")
    return "\n".join(lines)


_VM_HEAD = (("merges", "merges"), ("cow_breaks", "cow breaks"), ("unmerges", "unmerges"),
            ("merge_fails", "merge fails"), ("shared_pages", "shared now"),
            ("released", "released"), ("refaulted", "refaulted"))


def _vms(rows: list[dict[str, Any]]) -> str:
    head = f"{'VM':<16}" + "".join(f" {title:>12}" for _, title in _VM_HEAD) \
        + f" {'saved':>14} {'reclaimed':>14}"
    lines = [head]
    for row in rows:
        lines.append(f"{row['vm']:<16}" + "".join(f" {row[k]:>12,}" for k, _ in _VM_HEAD)
                     + f" {fmt_bytes(row['saved_bytes']):>14}"
                     + f" {fmt_bytes(row['reclaimed_bytes']):>14}")
    if not rows:
        lines.append("(no merge or reclaim events)")
    return "\n".join(lines)


def _lifetimes(lt: dict[str, Any]) -> str:
    """bcc's print_log2_hist layout, from the first to the last non-empty bucket."""
    lines = ["MERGE LIFETIME (merge to COW break)"]
    buckets = {int(k): n for k, n in lt["buckets"].items()}
    if buckets:
        ks = range(min(buckets), max(buckets) + 1)
        labels = {k: "{:,} -> {:,}".format(*bucket_range(k)) for k in ks}
        width = max(map(len, labels.values()))
        peak = max(buckets.values())
        lines.append(f"{'ns':>{width}} : count       distribution")
        for k in ks:
            n = buckets.get(k, 0)
            lines.append(f"{labels[k]:>{width}} : {n:<11,} |{'*' * (n * STARS // peak):<{STARS}}|")
    lines.append(f"matched {lt['matched']:,}, unmatched COW breaks {lt['unmatched']:,}, "
                 f"still merged {lt['open']:,}, mean {fmt_int(lt['mean_ns'])} ns")
    return "\n".join(lines)


def _counters(groups: dict[str, Any]) -> str:
    if not groups:
        return ""
    lines = ["COUNTERS (last values)"]
    for group, values in groups.items():
        lines.append(group)
        first = next(iter(values.values()), None)
        nested = values.items() if isinstance(first, dict) else [(None, values)]
        for pid, vals in nested:
            indent = "  "
            if pid is not None:
                lines.append(f"  pid {pid}")
                indent = "    "
            lines.extend(f"{indent}{label:<36} {_value(v):>16}" for label, v in vals.items())
    return "\n".join(lines)


def _value(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _correlation(c: dict[str, Any]) -> str:
    lines = [f"CORRELATION (counters vs events): {c['verdict']}"]
    if not c["rules"]:
        return lines[0]
    lines.append(f"{'rule':<28} {'counters':<44} {'events':<48} {'windows':>8} "
                 f"{'difference':>11} {'verdict'}")
    for r in c["rules"]:
        verdict = r["verdict"]
        if verdict == "explained":
            why = [f"{r[k]:,} {what}" for k, what in (("lost_in_explained", "lost events"),
                   ("in_flight_in_explained", "in flight at snapshots")) if r.get(k)]
            verdict = "explained by " + " and ".join(why or ["lost events"])
        if r["approximate"]:
            verdict += " (approximate)"
        lines.append(f"{r['rule']:<28} {r['counters']:<44} {r['events']:<48} {r['windows']:>8,} "
                     f"{r['difference_total']:>11,} {verdict}")
        w = r["worst"]
        if w is not None:
            lines.append(f"  worst window ts {w['start_ts']:,} .. {w['end_ts']:,}: counters "
                         f"{w['counters']:+,}, events {w['events']:+,}, difference "
                         f"{w['difference']:+,}, lost {w['lost']:,}"
                         + (f", in flight {w['in_flight']:,}" if w.get("in_flight") else ""))
        if r["note"]:
            lines.append(f"  note: {r['note']}")
    return "\n".join(lines)


def alert_subject(a: dict[str, Any]) -> str:
    """Whom an alert concerns: the worker, the VM, the pid, else the host."""
    if "worker" in a:
        return a["worker"]
    if "vm" in a:
        return a["vm"]
    return f"pid {a['pid']}" if "pid" in a else "host"


def alert_line(a: dict[str, Any], max_pfns: int = 8) -> str:
    """One line of facts about an alert (its message is another)."""
    facts = []
    if "pages" in a:
        facts.append(f"{a['pages']:,} pages")
    pfns = a.get("pfns") or []
    if pfns:
        more = f" +{len(pfns) - max_pfns:,} more" if len(pfns) > max_pfns else ""
        facts.append("pfns " + " ".join(hex(p) for p in pfns[:max_pfns]) + more)
    n = a.get("count", 1)
    facts.append(f"seen {n:,} time{'' if n == 1 else 's'}")
    first, last = a.get("first_ts", a.get("ts")), a.get("last_ts")
    facts.append(f"ts {fmt_int(first)}" if last is None or last == first
                 else f"ts {fmt_int(first)} .. {fmt_int(last)}")
    if "evidence" in a:
        facts.append(f"from {a['evidence']}")
    return f"{a['alert']} ({alert_subject(a)}): " + ", ".join(facts)


def _alerts(alerts: list[dict[str, Any]]) -> str:
    if not alerts:
        return "ALERTS (failures of the kernel itself): none"
    lines = ["ALERTS (failures of the kernel itself)"]
    for a in alerts:
        lines.append("- " + alert_line(a))
        lines.append(f"  {a.get('message', '')}")
    return "\n".join(lines)


def _warnings_text(warnings: list[str]) -> str:
    return "\n".join(["WARNINGS"] + [f"- {w}" for w in warnings]) if warnings else ""
