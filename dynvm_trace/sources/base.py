"""What every event source provides: a header and a stream of batches of records."""

from __future__ import annotations

import heapq
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from operator import itemgetter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..ksm_columns import EventColumns


class Batch:
    """Records that arrived up to `now` (ns on the source's clock; see the header's clock).

    A batch may be empty: it still tells a live view that time has passed. A source may hand
    its bulk events over as columns (dynvm_trace.ksm_columns) beside the records it lists as
    dicts: `records` then builds their dicts and merges them in time order, once; a log writer
    takes their JSON lines straight from the columns instead (LogWriter.write).
    """

    def __init__(self, now: int, records: list[dict[str, Any]] | None = None,
                 columns: EventColumns | None = None):
        self.now = now
        self.dict_records = records if records is not None else []
        self.columns = columns if columns is not None and len(columns) else None
        self._all = None if self.columns else self.dict_records

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record of the batch, in time order (column events first on equal times)."""
        if self._all is None:
            self._all = list(heapq.merge(self.columns.records(), self.dict_records,
                                         key=itemgetter("ts")))
        return self._all

    def __len__(self) -> int:
        return len(self.dict_records) + (len(self.columns) if self.columns else 0)

    def kind_counts(self) -> Counter[str]:
        """Records per kind, without building the columns' dicts."""
        counts = Counter(map(itemgetter("kind"), self.dict_records))
        if self.columns:
            counts.update(self.columns.kind_counts())
        return counts

    def __repr__(self) -> str:
        return f"Batch(now={self.now}, records={len(self)})"


class SourceUnavailable(Exception):
    """This source cannot run here; str() is one line saying what is missing and the fix."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Source(ABC):
    name: str = ""

    def __init__(self) -> None:
        self._stop = threading.Event()

    @abstractmethod
    def header(self) -> dict[str, Any]:
        """The log header for what this source produces (logfile.make_header)."""

    @abstractmethod
    def batches(self, interval_ns: int, duration_ns: int | None) -> Iterator[Batch]:
        """Yield a batch about every `interval_ns` of source time, until the source ends,
        `duration_ns` of source time has passed, or stop() is called."""

    def stop(self) -> None:
        """Ask batches() to end after the current batch (safe from a signal handler)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Release kernel resources; the default has none."""
