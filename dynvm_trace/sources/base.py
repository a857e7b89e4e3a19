"""What every event source provides: a header and a stream of batches of records."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Batch:
    """Records that arrived up to `now` (ns on the source's clock; see the header's clock).

    A batch may be empty: it still tells a live view that time has passed.
    """

    now: int
    records: list[dict[str, Any]] = field(default_factory=list)


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
