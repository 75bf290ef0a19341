"""The ownership table: for each of the 4096 slots, whether this broker serves it.

A slot is in one of four states (docs/design.md §5, §6):

    NOT_OWNED   another broker's (MOVED), or nobody's yet (TRYAGAIN)
    IMPORTING   arriving in a handoff: staged, never served before ACTIVATE
    OWNED       served here
    FROZEN      owned, but frozen for a handoff: writes get TRYAGAIN until the
                move commits (then NOT_OWNED) or aborts (then OWNED again)

with the epoch at which it last changed owner, and the coordinator term this
broker has accepted. The map from the coordinator, a handoff and (next) a
failover change it only through the methods below; the broker persists the
whole table in its ownership records ("O" ops, broker/redo.py).

Reads on the hot path use the public `owned` bytearray and `frozen` dict
directly (a byte test and an empty-dict test per request).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

from shardq.errors import BadRequestError, StaleTermError
from shardq.router import NUM_SLOTS


class SlotState(StrEnum):
    NOT_OWNED = "not-owned"
    IMPORTING = "importing"
    OWNED = "owned"
    FROZEN = "frozen"


class SlotTable:
    """Slots, their epochs, freezes, imports and the accepted term."""

    def __init__(self) -> None:
        self.owned = bytearray(NUM_SLOTS)
        self.epochs = [0] * NUM_SLOTS
        self.frozen: dict[int, str] = {}  # slot -> move id
        self.importing: dict[int, str] = {}  # slot -> move id
        self.term = 0

    # ------------------------------------------------------------ reads
    def state(self, slot: int) -> SlotState:
        if self.owned[slot]:
            return SlotState.FROZEN if slot in self.frozen else SlotState.OWNED
        return SlotState.IMPORTING if slot in self.importing else SlotState.NOT_OWNED

    def serves(self, slot: int) -> bool:
        """Owned and not frozen for a handoff."""
        return bool(self.owned[slot]) and slot not in self.frozen

    def count(self) -> int:
        return sum(self.owned)

    def frozen_by(self, move_id: str) -> list[int]:
        return sorted(s for s, m in self.frozen.items() if m == move_id)

    # ------------------------------------------------------------ ownership
    def adopt(self, slot: int, epoch: int) -> None:
        """The coordinator's map gives us `slot` at `epoch` (bootstrap, forget)."""
        self.owned[slot], self.epochs[slot] = 1, epoch

    def take(self, slots: Iterable[int], epoch: int) -> None:
        """An import is activated: its slots are served from now on."""
        for s in slots:
            self.owned[s], self.epochs[s] = 1, max(epoch, self.epochs[s])
            self.importing.pop(s, None)

    def give_up(self, slots: Iterable[int], epoch: int) -> list[str]:
        """The slots belong to another broker from `epoch` on; returns the
        moves whose freezes this ended."""
        ended: set[str] = set()
        for s in slots:
            self.owned[s] = 0
            self.epochs[s] = max(self.epochs[s], epoch)
            mid = self.frozen.pop(s, None)
            if mid is not None:
                ended.add(mid)
        return [m for m in ended if m not in self.frozen.values()]

    # ------------------------------------------------------------ handoffs
    def freeze(self, slots: Iterable[int], move_id: str) -> None:
        for s in slots:
            if not self.owned[s]:
                raise BadRequestError(f"cannot freeze slot {s}: not owned here")
            self.frozen[s] = move_id

    def thaw(self, move_id: str) -> list[int]:
        """Lift a move's freeze (it aborted): its slots are served again."""
        slots = self.frozen_by(move_id)
        for s in slots:
            del self.frozen[s]
        return slots

    def begin_import(self, slots: Iterable[int], move_id: str) -> None:
        for s in slots:
            self.importing[s] = move_id

    def end_import(self, move_id: str) -> None:
        """Drop an import's claim on its slots (aborted, or replaced)."""
        for s in [s for s, m in self.importing.items() if m == move_id]:
            del self.importing[s]

    # ------------------------------------------------------------ term
    def accept_term(self, term: Any) -> None:
        """A coordinator command carries `term`: refuse older ones, adopt newer."""
        if not isinstance(term, int) or isinstance(term, bool):
            raise BadRequestError("term must be an integer")
        if term < self.term:
            raise StaleTermError(f"term {term} is older than {self.term}")
        self.term = term

    # ------------------------------------------------------------ persistence
    def runs(self) -> list[list[int]]:
        """Owned slots as [first, last, epoch] runs (the ownership record's `slots`)."""
        runs: list[list[int]] = []
        s = 0
        for (own, e), group in itertools.groupby(zip(self.owned, self.epochs, strict=True)):
            n = sum(1 for _ in group)
            if own:
                runs.append([s, s + n - 1, e])
            s += n
        return runs

    def restore(self, runs: Iterable[Iterable[int]], term: int) -> None:
        for start, end, epoch in runs:
            for s in range(start, end + 1):
                self.owned[s] = 1
                self.epochs[s] = epoch
        self.term = term
