"""Rate-limit windows, group lines and tenant leases: the pieces of a queue's
scheduling (docs/design.md §11) that stay out of the plain priority/FIFO hot path.

A rate limit `[max, per_ms]` allows at most `max` starts (jobs handed out by
PULL) in any sliding window of `per_ms` ms. It is a sliding *log*: a window
keeps `[t, n]` runs (n starts at ms t) newer than `now - per_ms`, so it holds
exactly, with no burst beyond `max` anywhere (a fixed window would allow
2 x max across a boundary). Runs are merged per ms, so a window holds at most
`min(max, per_ms)` runs.

`note` is the only mutation, and it is also what replay does with a `bS` op
(broker/replay.py), so a window rebuilt from the log equals the live one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


def note_runs(runs: list[list[int]], now: int, n: int, per_ms: int) -> int:
    """Record `n` starts at `now`: drop runs that left the window, merge or
    append. Returns how many starts the dropped runs held."""
    cut = now - per_ms
    dropped = 0
    i = 0
    while i < len(runs) and runs[i][0] <= cut:
        dropped += runs[i][1]
        i += 1
    if i:
        del runs[:i]
    if runs and runs[-1][0] == now:
        runs[-1][1] += n
    else:
        runs.append([now, n])
    return dropped


class Window:
    """One sliding-window log with a running total (live side of `note_runs`)."""

    __slots__ = ("runs", "total")

    def __init__(self, runs: list[list[int]] | None = None) -> None:
        self.runs: list[list[int]] = [list(r) for r in runs] if runs else []
        self.total = sum(r[1] for r in self.runs)

    def used(self, now: int, per_ms: int) -> int:
        """Starts inside `(now - per_ms, now]`. O(stale runs): runs are only
        dropped by `note`, so the ones that left the window are at the front."""
        cut = now - per_ms
        used = self.total
        for t, n in self.runs:
            if t > cut:
                break
            used -= n
        return used

    def note(self, now: int, n: int, per_ms: int) -> None:
        self.total += n - note_runs(self.runs, now, n, per_ms)

    def free_at(self, now: int, per_ms: int, limit: int) -> int:
        """The first time >= now at which fewer than `limit` starts are inside."""
        cut = now - per_ms
        used = self.used(now, per_ms)
        if used < limit:
            return now
        for t, n in self.runs:
            if t <= cut:
                continue
            used -= n
            if used < limit:
                return t + per_ms
        return now + per_ms  # not reached: `limit` >= 1

    def export(self) -> list[list[int]]:
        return [list(r) for r in self.runs]

    def merge(self, runs: list[list[int]]) -> None:
        """Add another window's runs (a queue arriving: its starts count here too)."""
        merged: dict[int, int] = {}
        for t, n in [*self.runs, *runs]:
            merged[t] = merged.get(t, 0) + n
        self.runs = [[t, merged[t]] for t in sorted(merged)]
        self.total = sum(merged.values())


class Line:
    """Waiting jobs of one group: by priority, then FIFO (lazy entries, like
    QueueState's own line: an entry whose job left waiting is skipped)."""

    __slots__ = ("in_ring", "n", "prios", "waiting")

    def __init__(self) -> None:
        self.waiting: dict[int, deque[tuple[int, Any]]] = {}
        self.prios: list[int] = []
        self.n = 0
        self.in_ring = False


@dataclass(slots=True)
class TenantShare:
    """This broker's lease of a cluster-wide tenant limit (coordinator/tenants.py).

    `max` starts per `per_ms` across the tenant's queues on this broker until
    `until` (this broker's wall clock, ms); after that `min(max, fallback)`,
    the conservative share, until a new lease comes. A tenant queue on a
    broker without a lease starts nothing (`max` 0)."""

    max: int = 0
    per_ms: int = 1000
    until: int = 0
    fallback: int = 0
    version: int = 0
    window: Window | None = None

    def share(self, now: int) -> int:
        return self.max if now < self.until else min(self.max, self.fallback)

    def to_dict(self) -> dict[str, int]:
        return {"max": self.max, "per_ms": self.per_ms, "until": self.until,
                "fallback": self.fallback, "version": self.version}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TenantShare:
        return cls(int(d.get("max", 0)), int(d.get("per_ms", 1000)), int(d.get("until", 0)),
                   int(d.get("fallback", 0)), int(d.get("version", 0)), Window())
