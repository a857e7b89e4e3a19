"""Pacing source time against the wall clock: as fast as possible, or scaled to real time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Pacer:
    """Waits until source time `ts` is due: `speed` source seconds per wall second, or None for
    as fast as possible. Source time `origin_ts` is now; without it, the first `ts` waited for
    is. A wait on `stop_event` cuts a sleep short."""

    def __init__(self, speed: float | None, stop_event: threading.Event,
                 origin_ts: int | None = None, clock: Callable[[], float] = time.monotonic):
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive (or None for as fast as possible)")
        self.speed = speed
        self._stop = stop_event
        self._clock = clock
        self._origin = None if origin_ts is None else (origin_ts, clock())

    def wait_until(self, ts: int) -> None:
        if self.speed is None:
            return
        if self._origin is None:
            self._origin = (ts, self._clock())
            return
        ts0, wall0 = self._origin
        delay = wall0 + (ts - ts0) / 1e9 / self.speed - self._clock()
        if delay > 0:
            self._stop.wait(delay)


def parse_speed(text: str) -> float | None:
    """'max' -> None (as fast as possible); '1' -> real time; '10' -> ten times real time."""
    if text.strip().lower() == "max":
        return None
    value = float(text)
    if value <= 0:
        raise ValueError(f"speed must be 'max' or a positive number, not {text!r}")
    return value
