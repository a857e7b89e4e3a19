"""How long a merge lives before a write breaks it: a log2 histogram of merge-to-COW-break time.

A merge is keyed by (pid, else VM name; address). A later cow_break with the same key closes it;
an unmerge forgets it. Memory is one dict entry per page currently merged (bounded by memory
that can be merged), so 10 M-event logs are fine. Records without an address cannot be matched:
their merges are not tracked and their COW breaks count as unmatched.
"""

from __future__ import annotations

from itertools import compress
from typing import Any

from .aggregators import Record, kind_of

BUCKETS = 64  # bucket k holds lifetimes in [2^k, 2^(k+1)) ns; lifetimes below 1 ns go to 0

_KINDS = frozenset({"merge", "cow_break", "unmerge"})


def bucket(lifetime_ns: int) -> int:
    """The log2 bucket of a lifetime, as bcc's print_log2_hist would place it."""
    return lifetime_ns.bit_length() - 1 if lifetime_ns > 1 else 0


def bucket_range(k: int) -> tuple[int, int]:
    """The inclusive [low, high] ns a bucket shows (bucket 0 shows 0 -> 1, as bcc does)."""
    return (0 if k == 0 else 1 << k), (1 << (k + 1)) - 1


class Lifetimes:
    def __init__(self) -> None:
        # owner (pid, else VM name) -> addr -> ts of the merge; one small dict per owner keeps
        # the keys plain ints (no tuple per event)
        self.live: dict[Any, dict[int, int]] = {}
        self.hist = [0] * BUCKETS
        self.matched = 0
        self.unmatched = 0
        self.total_ns = 0

    def feed(self, records: list[Record], kinds: list[str] | None = None) -> None:
        if kinds is None:
            kinds = list(map(kind_of, records))
        live, hist = self.live, self.hist
        for r in compress(records, map(_KINDS.__contains__, kinds)):
            addr = r.get("addr")
            k = r["kind"]
            if addr is None:
                if k == "cow_break":
                    self.unmatched += 1
                continue
            pid = r.get("pid")
            pages = live.get(r.get("vm") if pid is None else pid)
            if k == "merge":
                if pages is None:
                    pages = live[r.get("vm") if pid is None else pid] = {}
                pages[addr] = r["ts"]
                continue
            t = None if pages is None else pages.pop(addr, None)
            if k == "cow_break":
                if t is None:
                    self.unmatched += 1
                    continue
                lifetime = r["ts"] - t
                hist[bucket(lifetime)] += 1
                self.matched += 1
                self.total_ns += lifetime

    def snapshot(self) -> dict[str, Any]:
        """Non-empty buckets only, as {"k": count} with k the log2 of the bucket's low end."""
        return {
            "unit": "ns",
            "buckets": {str(k): n for k, n in enumerate(self.hist) if n},
            "matched": self.matched,
            "unmatched": self.unmatched,
            "mean_ns": self.total_ns // self.matched if self.matched else None,
            "open": sum(map(len, self.live.values())),
        }
