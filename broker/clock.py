"""The broker's clock: Unix-epoch milliseconds that advance monotonically.

Every time the broker keeps in memory (lock deadlines, delays, TTLs, rate
windows, timers) and every time it persists (a delayed job's due time, a
lock's deadline, timestamps) is read from one clock (docs/design.md §3). It
reads the wall clock once, at start, and from then on advances with
`time.monotonic()`: a step of the wall clock (NTP, a VM resumed, an
operator) neither expires every lock at once (+60 s used to run each
locked job twice) nor stretches delays (-60 s made a 2 s delay wait ~62 s).

Persisted times are epoch milliseconds, so a restart converts them by
re-reading the wall clock: a step that happened while the broker ran is
taken into account then. `drift_ms()` shows how far the wall clock has moved
away from the broker's (a metric and a log line; see housekeeping).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

WallSource = Callable[[], float]  # seconds since the Unix epoch


class BrokerClock:
    """Call it for the time in ms; `wall` is read at start only (and for drift)."""

    __slots__ = ("_anchor_ms", "_mono", "_wall")

    def __init__(self, wall: WallSource = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self._wall = wall
        self._mono = mono
        self._anchor_ms = wall() * 1000.0 - mono() * 1000.0

    def __call__(self) -> int:
        return int(self._mono() * 1000.0 + self._anchor_ms)

    def drift_ms(self) -> int:
        """Wall clock minus this clock (0 unless the wall clock stepped or slewed)."""
        return int(self._wall() * 1000.0) - self()


def offset_wall(offset_file: str | Path) -> WallSource:
    """The system wall clock plus the milliseconds written in `offset_file`
    (missing or empty: 0), re-read at every call. For tests only: it steps
    one broker's wall clock, as NTP would, without touching the host's."""
    path = Path(offset_file)

    def wall() -> float:
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        return time.time() + (int(text) / 1000.0 if text else 0.0)

    return wall
