"""The topology: who owns each slot, at which epoch (docs/design.md §5).

Ownership is explicit per slot, as in Redis Cluster; the ring (ring.py)
only says where slots *should* be. Every broker and client holds a copy.
`to_dict`/`from_dict` give the wire/JSON shape::

    {"term": int, "epoch": int,
     "brokers": {id: {"addr": str, "state": str, "weight": int,
                      "storage"?: str, "since"?: int}},
     "slots": [[start, end, owner, epoch], ...],   # runs, end inclusive, unowned omitted
     "overrides": {queue: [owner, epoch]},
     "partitions": {queue: P},
     "moving": [{"move_id", "slots" | "queue", "from", "to", "phase"}, ...]}

Epochs: `epoch` is the version of the whole map; each slot (and override)
carries the epoch at which it last changed. A `MOVED` patches one entry
and leaves `epoch` alone, so a reply carrying a newer epoch still makes
the holder fetch the full map.
"""

from __future__ import annotations

import copy as _copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._wire import parse_topology
from .members import BrokerInfo, BrokerState
from .slots import NUM_SLOTS, _slot_cache, slot_of

__all__ = ["BrokerInfo", "BrokerState", "Topology"]

# route() reads slot_of's cache inline (a Python call is a third of its
# budget); binding .get is safe because that dict is cleared, never replaced.
_cached_slot = _slot_cache.get


def _unowned() -> list[str | None]:
    return [None] * NUM_SLOTS


def _zeros() -> list[int]:
    return [0] * NUM_SLOTS


@dataclass(slots=True)
class Topology:
    """Slot ownership, brokers, overrides, partitions and moves in flight.

    `slot_owners[s]` is the owner of slot s (None: unowned) and
    `slot_epochs[s]` the epoch at which it last changed; both always hold
    NUM_SLOTS entries.
    """

    term: int = 0
    epoch: int = 0
    brokers: dict[str, BrokerInfo] = field(default_factory=dict)
    slot_owners: list[str | None] = field(default_factory=_unowned)
    slot_epochs: list[int] = field(default_factory=_zeros)
    overrides: dict[str, tuple[str, int]] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)
    moving: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.slot_owners) != NUM_SLOTS or len(self.slot_epochs) != NUM_SLOTS:
            raise ValueError(
                f"slot_owners and slot_epochs need {NUM_SLOTS} entries, got "
                f"{len(self.slot_owners)} and {len(self.slot_epochs)}"
            )

    # -- construction -------------------------------------------------------

    @classmethod
    def empty(cls) -> Topology:
        """Epoch 0, no broker, no slot owned."""
        return cls()

    @classmethod
    def standalone(cls, broker_id: str, addr: str) -> Topology:
        """One active broker owning every slot at epoch 1."""
        topo = cls(epoch=1, brokers={broker_id: BrokerInfo(broker_id, addr)})
        topo.slot_owners = [broker_id] * NUM_SLOTS
        topo.slot_epochs = [1] * NUM_SLOTS
        return topo

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Topology:
        """Parse the docs/design.md §5 shape (as decoded from JSON or msgpack).

        Raises:
            ValueError: the mapping is not a well-formed topology.
        """
        return cls(*parse_topology(d))

    def to_dict(self) -> dict[str, Any]:
        """The docs/design.md §5 shape: str keys, lists, ints, str; safe for JSON and msgpack."""
        return {
            "term": self.term,
            "epoch": self.epoch,
            "brokers": {k: _broker_dict(b) for k, b in self.brokers.items()},
            "slots": self._runs(),
            "overrides": {q: [owner, e] for q, (owner, e) in self.overrides.items()},
            "partitions": dict(self.partitions),
            "moving": _copy.deepcopy(self.moving),
        }

    def _runs(self) -> list[list[Any]]:
        runs: list[list[Any]] = []
        owners, epochs = self.slot_owners, self.slot_epochs
        for s in range(NUM_SLOTS):
            owner = owners[s]
            if owner is None:
                continue
            last = runs[-1] if runs else None
            if last is not None and last[1] == s - 1 and last[2] == owner and last[3] == epochs[s]:
                last[1] = s
            else:
                runs.append([s, s, owner, epochs[s]])
        return runs

    def copy(self) -> Topology:
        """An independent copy (brokers, slot tables and moves included)."""
        return Topology(
            self.term,
            self.epoch,
            {k: BrokerInfo(b.id, b.addr, b.state, b.weight, b.storage, b.since)
             for k, b in self.brokers.items()},
            list(self.slot_owners),
            list(self.slot_epochs),
            dict(self.overrides),
            dict(self.partitions),
            _copy.deepcopy(self.moving),
        )

    def with_assignment(self, assignment: Sequence[str], epoch: int) -> Topology:
        """A copy with slot s owned by ``assignment[s]`` at `epoch`, for every s (bootstrap).

        The copy's map epoch becomes ``max(self.epoch, epoch)``.

        Raises:
            ValueError: `assignment` does not have NUM_SLOTS entries, or
                names a broker this topology does not know.
        """
        if len(assignment) != NUM_SLOTS:
            raise ValueError(f"assignment needs {NUM_SLOTS} owners, got {len(assignment)}")
        unknown = set(assignment) - self.brokers.keys()
        if unknown:
            raise ValueError(f"assignment names unknown brokers {sorted(unknown)}")
        topo = self.copy()
        topo.slot_owners = list(assignment)
        topo.slot_epochs = [epoch] * NUM_SLOTS
        topo.epoch = max(self.epoch, epoch)
        return topo

    # -- lookups (hot path) --------------------------------------------------

    def route(self, queue: str) -> tuple[str, str] | None:
        """``(broker_id, addr)`` serving `queue`, or None if unowned or its address is unknown."""
        overrides = self.overrides
        if overrides and queue in overrides:
            owner: str | None = overrides[queue][0]
        else:
            slot = _cached_slot(queue)
            owner = self.slot_owners[slot_of(queue) if slot is None else slot]
        if owner is None:
            return None
        info = self.brokers.get(owner)
        return None if info is None else (owner, info.addr)

    def owner_of(self, queue: str) -> str | None:
        """The broker owning `queue`: its override if any, else its slot's owner."""
        override = self.overrides.get(queue)
        if override is not None:
            return override[0]
        return self.slot_owners[slot_of(queue)]

    def queue_named_on(self, owner: str, prefix: str, tries: int = 100_000) -> str | None:
        """The first name `prefix-N` (N < tries) that `owner` owns, or None:
        tests and benchmarks use it to place a queue on a chosen broker."""
        for i in range(tries):
            name = f"{prefix}-{i}"
            if self.owner_of(name) == owner:
                return name
        return None

    def owner_of_slot(self, slot: int) -> str | None:
        """The owner of `slot`, None if unowned."""
        return self.slot_owners[_check_slot(slot)]

    def slot_epoch(self, slot: int) -> int:
        """The epoch at which `slot` last changed owner (0: never owned)."""
        return self.slot_epochs[_check_slot(slot)]

    def addr_of(self, broker_id: str) -> str | None:
        """The advertised address of `broker_id`, None if unknown."""
        info = self.brokers.get(broker_id)
        return None if info is None else info.addr

    def slots_of(self, broker_id: str) -> list[int]:
        """The slots `broker_id` owns, ascending."""
        return [s for s, owner in enumerate(self.slot_owners) if owner == broker_id]

    def slot_counts(self) -> dict[str, int]:
        """Slots owned per broker; every known broker appears, with 0 if it owns none."""
        counts = dict.fromkeys(self.brokers, 0)
        for owner in self.slot_owners:
            if owner is not None:
                counts[owner] = counts.get(owner, 0) + 1
        return counts

    # -- MOVED patches -------------------------------------------------------

    def patch_slot(self, slot: int, owner: str, addr: str, epoch: int) -> None:
        """Apply one `MOVED {slot, owner, addr, epoch}`.

        Ignored when `epoch` is older than the slot's (a late redirect must
        not undo a newer one). Otherwise the slot goes to `owner` at
        `epoch`, and `owner` is added with `addr` if unknown, or its
        address updated (a broker restarted elsewhere keeps its id). The
        map epoch is left alone (see the module docstring).
        """
        if epoch < self.slot_epochs[_check_slot(slot)]:
            return
        self.slot_owners[slot] = owner
        self.slot_epochs[slot] = epoch
        self._learn(owner, addr)

    def patch_override(self, queue: str, owner: str, addr: str, epoch: int) -> None:
        """Apply one `MOVED {queue, owner, addr, epoch}` for an overridden queue.

        Ignored when `epoch` is older than the queue's current override;
        otherwise as `patch_slot`.
        """
        current = self.overrides.get(queue)
        if current is not None and epoch < current[1]:
            return
        self.overrides[queue] = (owner, epoch)
        self._learn(owner, addr)

    def _learn(self, broker_id: str, addr: str) -> None:
        info = self.brokers.get(broker_id)
        if info is None:
            self.brokers[broker_id] = BrokerInfo(broker_id, addr)
        elif info.addr != addr:
            info.addr = addr


def _check_slot(slot: int) -> int:
    # Without this a negative slot would silently index from the end.
    if not 0 <= slot < NUM_SLOTS:
        raise ValueError(f"slot {slot} out of range [0, {NUM_SLOTS})")
    return slot


def _broker_dict(b: BrokerInfo) -> dict[str, Any]:
    d: dict[str, Any] = {"addr": b.addr, "state": b.state.value, "weight": b.weight}
    if b.storage is not None:
        d["storage"] = b.storage
        d["since"] = b.since
    return d
