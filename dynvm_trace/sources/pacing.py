"""Pacing source time against the wall clock: as fast as possible, or scaled to real time."""

from __future__ import annotations

import threading
import time


class Pacer:
    """Sleeps until source time `ts` is due: `speed` source seconds per wall second, or None
    for as fast as possible. `stop_event` cuts a sleep short."""

    def __init__(self, speed: float | None, stop_event: threading.Event):
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive (or None for as fast as possible)")
        self.speed = speed
        self._stop = stop_event
        self._origin: tuple[int, float] | None = None

    def wait_until(self, ts: int) -> None:
        if self.speed is None:
            return
        if self._origin is None:
            self._origin = (ts, time.monotonic())
            return
        ts0, wall0 = self._origin
        delay = wall0 + (ts - ts0) / 1e9 / self.speed - time.monotonic()
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
