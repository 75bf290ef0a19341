"""Brokers as the topology sees them: id, address, state, weight (docs/design.md §5)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class BrokerState(StrEnum):
    """A broker's membership state. States never change ownership by themselves."""

    JOINING = "joining"  # registered, not yet in the ring
    ACTIVE = "active"  # in the ring
    DRAINING = "draining"  # out of the ring, slots moving away
    LEAVING = "leaving"  # out of the ring, slots moving away, then it stops
    DRAINED = "drained"  # owns nothing
    DEAD = "dead"  # missed heartbeats; keeps its points and slots, plans skip them


@dataclass(slots=True)
class BrokerInfo:
    """One broker as the topology knows it."""

    id: str
    addr: str
    state: BrokerState = BrokerState.ACTIVE
    weight: int = 1
