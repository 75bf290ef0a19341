"""The broker-wide bound on dedup tombstones (docs/design.md §4 "Ids").

Each queue keeps the ids it removed, for `dedup_ttl_ms`, so a resent add
stays a no-op. Bounded per queue alone, that memory would grow with the
number of queues (100,000 ids each); bounded here, it is one budget for the
broker: once a second the oldest tombstones over it, across all queues, are
forgotten (each queue logs its own `T` op, so replay and followers agree).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Protocol


class HasTombstones(Protocol):
    name: str
    tombstones: dict[str, int]  # id -> removed_at, oldest first

    def forget_tombstones(self, ids: list[str]) -> None: ...


def trim_oldest(queues: Iterable[HasTombstones], budget: int) -> int:
    """Forget the oldest tombstones beyond `budget` across `queues`; return how many."""
    holding = [q for q in queues if q.tombstones]
    excess = sum(len(q.tombstones) for q in holding) - budget
    if excess <= 0:
        return 0
    # A k-way merge by removed_at: O(excess · log queues), not a full sort.
    oldest = heapq.merge(*(_aged(q) for q in holding))
    doomed: dict[str, list[str]] = {}
    by_name = {q.name: q for q in holding}
    for _, name, jid in islice(oldest, excess):
        doomed.setdefault(name, []).append(jid)
    for name, ids in doomed.items():
        by_name[name].forget_tombstones(ids)
    return excess


def _aged(q: HasTombstones) -> Iterator[tuple[int, str, str]]:
    return ((ts, q.name, jid) for jid, ts in q.tombstones.items())
