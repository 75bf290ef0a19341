"""shardq.router: slots, the consistent-hash ring, the topology and rebalance plans.

Pure code: no I/O, no clock, no globals beyond a bounded slot cache. See
docs/design.md §5 for the contracts; the golden hash vectors live in
tests/unit/test_router.py.
"""

from .members import BrokerInfo, BrokerState
from .planner import DEFAULT_MAX_SLOTS_PER_MOVE, Move, plan_rebalance, ring_for
from .ring import DEFAULT_VNODES, Ring
from .slots import NUM_SLOTS, PARTITION_SEP, hash64, partition_for, partition_name, slot_of
from .topology import Topology

__all__ = [
    "DEFAULT_MAX_SLOTS_PER_MOVE",
    "DEFAULT_VNODES",
    "NUM_SLOTS",
    "PARTITION_SEP",
    "BrokerInfo",
    "BrokerState",
    "Move",
    "Ring",
    "Topology",
    "hash64",
    "partition_for",
    "partition_name",
    "plan_rebalance",
    "ring_for",
    "slot_of",
]
