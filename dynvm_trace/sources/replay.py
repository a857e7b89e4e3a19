"""The `replay` source: a recorded event log, as the same stream of batches it was recorded as."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..logfile import LogReader, Warn
from .base import Batch, Source
from .pacing import Pacer


class ReplaySource(Source):
    name = "replay"

    def __init__(self, path: str | os.PathLike, speed: float | None = None, warn: Warn | None = None):
        super().__init__()
        self.reader = LogReader(path, warn)
        self.speed = speed

    def header(self) -> dict[str, Any]:
        return self.reader.header

    def batches(self, interval_ns: int, duration_ns: int | None) -> Iterator[Batch]:
        """Regroup the log's records into batches that each end at an interval boundary."""
        pacer = Pacer(self.speed, self._stop)
        pending: list[dict[str, Any]] = []
        start = end = None
        for batch in self.reader.batches():
            for rec in batch:
                ts = rec["ts"]
                if start is None:
                    start, end = ts, ts + interval_ns
                    pacer.wait_until(start)
                if duration_ns is not None and ts - start > duration_ns:
                    break
                while ts > end:
                    pacer.wait_until(end)
                    yield Batch(end, pending)
                    if self.stopped:
                        return
                    pending, end = [], end + interval_ns
                pending.append(rec)
            else:
                continue
            break
        if pending:
            last = pending[-1]["ts"]
            pacer.wait_until(last)
            yield Batch(last, pending)
