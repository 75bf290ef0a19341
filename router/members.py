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
    # Came back under its id with another storage identity (an empty or
    # replaced disk) while owning slots: held, its slots unavailable until
    # the disk returns or `shardq forget --accept-data-loss`. Plans skip it.
    LOST_STORAGE = "lost-storage"


@dataclass(slots=True)
class BrokerInfo:
    """One broker as the topology knows it."""

    id: str
    addr: str
    state: BrokerState = BrokerState.ACTIVE
    weight: int = 1
    # The storage identity (a random id kept in the broker's data directory)
    # the coordinator has recorded for this broker, and the epoch at which it
    # recorded it: a broker adopts slots from the map only under this identity
    # and only at epochs >= `since` (docs/design.md §5, storage identity).
    storage: str | None = None
    since: int = 0
