"""Rebalance planning: which slots to move, from whom, to whom (docs/design.md §5, §6).

A plan is the list of owned slots whose owner differs from their ring
target, grouped by (source, target) and cut into bounded moves. Planning
never changes the topology; the coordinator executes the moves as
handoffs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .members import BrokerState
from .ring import DEFAULT_VNODES, Ring
from .topology import Topology

DEFAULT_MAX_SLOTS_PER_MOVE = 64

# Brokers whose points are on the ring. `dead` keeps its points (docs/design.md §5)
# so that a broker that comes back finds its arcs where it left them and a
# death does not retarget anyone else's slots; the plan skips it instead.
# A broker held for lost storage is treated the same way: its slots stay
# where they are, unavailable, and nothing moves to or from it.
_RING_STATES = frozenset({BrokerState.ACTIVE, BrokerState.DEAD, BrokerState.LOST_STORAGE})
_STUCK_STATES = frozenset({BrokerState.DEAD, BrokerState.LOST_STORAGE})


@dataclass(frozen=True, slots=True)
class Move:
    """Move `slots` (ascending) from broker `source` to broker `target` in one handoff."""

    source: str
    target: str
    slots: tuple[int, ...]


def ring_for(
    topology: Topology,
    vnodes: int = DEFAULT_VNODES,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> Ring:
    """The ring of a topology: its active and dead brokers, at their weights.

    Args:
        topology: where brokers, states and weights come from.
        vnodes: points per unit of weight.
        include: extra broker ids to put on the ring whatever their state,
            e.g. a `joining` broker about to be activated by a scale out.
        exclude: broker ids to leave off, e.g. a broker being forgotten.

    Raises:
        ValueError: an `include` id is not in the topology, or the ring
            would be empty.
    """
    extra = set(include)
    unknown = extra - topology.brokers.keys()
    if unknown:
        raise ValueError(f"cannot include unknown brokers {sorted(unknown)}")
    skip = set(exclude)
    weights = {
        b.id: b.weight
        for b in topology.brokers.values()
        if (b.state in _RING_STATES or b.id in extra) and b.id not in skip
    }
    return Ring(weights, vnodes)


def plan_rebalance(
    topology: Topology,
    ring: Ring,
    max_slots_per_move: int = DEFAULT_MAX_SLOTS_PER_MOVE,
    pins: Mapping[int, str] | None = None,
) -> list[Move]:
    """The moves that bring every slot to its ring target.

    Skipped: unowned slots (bootstrap and `forget` assign those), slots
    whose owner or target is `dead` (without replication only the owner
    has their data; nothing can be handed to a dead broker), and slots
    already listed in `topology.moving` (one handoff per slot at a time).

    Args:
        topology: current ownership.
        ring: where slots should live, usually `ring_for(topology)`.
        max_slots_per_move: upper bound on a move's slot count.
        pins: slot -> broker, overriding the ring target (`shardq move`); a
            pin to a broker that is not active is ignored.

    Returns:
        Moves sorted by (source, target, first slot); each has 1 to
        `max_slots_per_move` ascending slots.

    Raises:
        ValueError: `max_slots_per_move` < 1.
    """
    if max_slots_per_move < 1:
        raise ValueError(f"max_slots_per_move must be >= 1, got {max_slots_per_move}")
    dead = {b.id for b in topology.brokers.values() if b.state in _STUCK_STATES}
    busy = _slots_in_flight(topology)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    targets = ring.targets()
    for slot, pinned in (pins or {}).items():
        info = topology.brokers.get(pinned)
        if info is not None and info.state is BrokerState.ACTIVE:
            targets[slot] = pinned
    for slot, (owner, target) in enumerate(zip(topology.slot_owners, targets, strict=True)):
        if owner is None or owner == target or owner in dead or target in dead or slot in busy:
            continue
        groups[(owner, target)].append(slot)
    return [
        Move(source, target, tuple(slots[i : i + max_slots_per_move]))
        for (source, target), slots in sorted(groups.items())
        for i in range(0, len(slots), max_slots_per_move)
    ]


def _slots_in_flight(topology: Topology) -> set[int]:
    busy: set[int] = set()
    for move in topology.moving:
        slots = move.get("slots")
        if isinstance(slots, list | tuple):
            busy.update(s for s in slots if isinstance(s, int))
    return busy
