"""Drive a source: each batch goes to every consumer (log writer, aggregates, views), in order."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .sources.base import Batch, Source

Consumer = Callable[[Batch], None]


def drive(source: Source, interval_ns: int, duration_ns: int | None,
          consumers: list[Consumer]) -> int:
    """Run the source to its end; returns the number of records seen."""
    seen = 0
    for batch in source.batches(interval_ns, duration_ns):
        for consume in consumers:
            consume(batch)
        seen += len(batch)
    return seen


@contextmanager
def stop_on_sigint(source: Source) -> Iterator[list[bool]]:
    """The first SIGINT (or SIGTERM) asks the source to stop, so whatever is being written is
    closed properly; a second one interrupts at once. Yields [interrupted]."""
    interrupted = [False]

    def handler(signum, frame):  # noqa: ARG001
        if interrupted[0]:
            raise KeyboardInterrupt
        interrupted[0] = True
        source.stop()

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield interrupted
        return
    try:
        yield interrupted
    finally:
        for s, h in old.items():
            signal.signal(s, h)
