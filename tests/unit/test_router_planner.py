"""shardq.router.planner: ring_for and plan_rebalance (docs/design.md §5, §6)."""

from __future__ import annotations

import dataclasses

import pytest

from shardq.router import (
    NUM_SLOTS,
    BrokerInfo,
    BrokerState,
    Move,
    Ring,
    Topology,
    plan_rebalance,
    ring_for,
)


def _cluster(n: int, **states: BrokerState) -> Topology:
    """n active brokers b1..bn, booted onto their ring targets at epoch 1."""
    topo = Topology.empty()
    for i in range(1, n + 1):
        topo.brokers[f"b{i}"] = BrokerInfo(f"b{i}", f"h:{7100 + i}")
    booted = topo.with_assignment(ring_for(topo).targets(), epoch=1)
    for broker_id, state in states.items():
        booted.brokers[broker_id].state = state
    return booted


def _planned(moves: list[Move]) -> dict[int, tuple[str, str]]:
    planned: dict[int, tuple[str, str]] = {}
    for move in moves:
        for slot in move.slots:
            assert slot not in planned, f"slot {slot} planned twice"
            planned[slot] = (move.source, move.target)
    return planned


# -- ring_for -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "on_ring"),
    [
        (BrokerState.JOINING, False),
        (BrokerState.ACTIVE, True),
        (BrokerState.DRAINING, False),
        (BrokerState.LEAVING, False),
        (BrokerState.DRAINED, False),
        (BrokerState.DEAD, True),  # keeps its points (docs/design.md §5)
    ],
)
def test_ring_for_puts_active_and_dead_brokers_on_the_ring(
    state: BrokerState, on_ring: bool
) -> None:
    topo = _cluster(2)
    topo.brokers["b3"] = BrokerInfo("b3", "h:7103", state)
    assert ("b3" in ring_for(topo).brokers) is on_ring


def test_ring_for_uses_weights_and_include_and_exclude() -> None:
    topo = _cluster(2)
    topo.brokers["b3"] = BrokerInfo("b3", "h:7103", BrokerState.JOINING, weight=2)
    assert ring_for(topo, include={"b3"}).brokers == {"b1": 1, "b2": 1, "b3": 2}
    assert ring_for(topo, exclude={"b1"}).brokers == {"b2": 1}
    assert ring_for(topo, vnodes=7).vnodes == 7


def test_ring_for_refuses_unknown_includes_and_empty_rings() -> None:
    with pytest.raises(ValueError, match="unknown brokers"):
        ring_for(_cluster(1), include={"ghost"})
    with pytest.raises(ValueError, match="empty ring"):
        ring_for(Topology.empty())


# -- plan_rebalance -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 10])
def test_a_balanced_topology_plans_nothing(n: int) -> None:
    topo = _cluster(n)
    assert plan_rebalance(topo, ring_for(topo)) == []


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_adding_a_broker_plans_exactly_the_retargeted_slots(n: int) -> None:
    topo = _cluster(n)
    new = f"b{n + 1}"
    topo.brokers[new] = BrokerInfo(new, "h:7999", BrokerState.JOINING)
    ring = ring_for(topo, include={new})
    moves = plan_rebalance(topo, ring)
    owners = topo.slot_owners
    retargeted = {s: (owners[s], t) for s, t in enumerate(ring.targets()) if t != owners[s]}
    assert _planned(moves) == retargeted
    assert {m.target for m in moves} == {new}
    assert all(1 <= len(m.slots) <= 64 and list(m.slots) == sorted(m.slots) for m in moves)


def test_draining_broker_hands_every_slot_to_its_target() -> None:
    topo = _cluster(4, b2=BrokerState.DRAINING)
    ring = ring_for(topo)
    planned = _planned(plan_rebalance(topo, ring))
    assert sorted(planned) == topo.slots_of("b2")
    assert all(src == "b2" and dst != "b2" for src, dst in planned.values())


def test_dead_brokers_slots_are_skipped() -> None:
    topo = _cluster(4, b2=BrokerState.DEAD, b3=BrokerState.DRAINING)
    planned = _planned(plan_rebalance(topo, ring_for(topo)))
    assert planned, "b3's slots should still move"
    assert all(src == "b3" for src, _ in planned.values())
    assert all(dst != "b2" for _, dst in planned.values())  # nothing handed to the dead


def test_slots_targeted_at_a_dead_broker_stay_put() -> None:
    topo = _cluster(3)
    ring = ring_for(topo)
    b2_slots = topo.slots_of("b2")
    for s in b2_slots:  # b2's arcs, but owned by b1 (say, half-way through a move)
        topo.slot_owners[s] = "b1"
    assert len(_planned(plan_rebalance(topo, ring))) == len(b2_slots)
    topo.brokers["b2"].state = BrokerState.DEAD
    assert plan_rebalance(topo, ring_for(topo)) == []


def test_unowned_slots_are_left_to_bootstrap() -> None:
    topo = _cluster(2)
    topo.slot_owners[:100] = [None] * 100
    topo.brokers["b3"] = BrokerInfo("b3", "h:7103")
    planned = _planned(plan_rebalance(topo, ring_for(topo)))
    assert planned and not set(planned) & set(range(100))


def test_slots_in_flight_are_not_planned_again() -> None:
    topo = _cluster(2)
    topo.brokers["b3"] = BrokerInfo("b3", "h:7103")
    first = plan_rebalance(topo, ring_for(topo))[0]
    in_flight = {"slots": list(first.slots), "from": first.source, "to": first.target}
    topo.moving.append({"move_id": "m1", **in_flight, "phase": "copy"})
    topo.moving.append({"move_id": "m2", "queue": "q", "from": "b1", "to": "b3", "phase": "copy"})
    again = _planned(plan_rebalance(topo, ring_for(topo)))
    assert again and not set(again) & set(first.slots)


@pytest.mark.parametrize("limit", [1, 7, 64, NUM_SLOTS])
def test_moves_are_chunked_per_source_and_target(limit: int) -> None:
    topo = _cluster(3)
    topo.brokers["b4"] = BrokerInfo("b4", "h:7104")
    ring = ring_for(topo)
    moves = plan_rebalance(topo, ring, max_slots_per_move=limit)
    assert all(1 <= len(m.slots) <= limit for m in moves)
    assert moves == sorted(moves, key=lambda m: (m.source, m.target, m.slots[0]))
    by_pair: dict[tuple[str, str], list[int]] = {}
    for m in moves:
        by_pair.setdefault((m.source, m.target), []).extend(m.slots)
    assert sum(len(v) for v in by_pair.values()) == len(_planned(plan_rebalance(topo, ring)))
    # Only the last chunk of a pair may be short.
    for pair, slots in by_pair.items():
        chunks = [m for m in moves if (m.source, m.target) == pair]
        assert all(len(m.slots) == limit for m in chunks[:-1])
        assert slots == sorted(slots)


def test_max_slots_per_move_must_be_positive() -> None:
    topo = _cluster(1)
    with pytest.raises(ValueError, match="max_slots_per_move"):
        plan_rebalance(topo, ring_for(topo), max_slots_per_move=0)


def test_move_is_a_frozen_value() -> None:
    move = Move("b1", "b2", (1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        move.source = "b3"  # type: ignore[misc]
    assert move == Move("b1", "b2", (1, 2))


def test_plan_against_an_explicit_ring() -> None:
    topo = Topology.standalone("b1", "h:1")
    topo.brokers["b2"] = BrokerInfo("b2", "h:2")
    moves = plan_rebalance(topo, Ring({"b2": 1}), max_slots_per_move=NUM_SLOTS)
    assert moves == [Move("b1", "b2", tuple(range(NUM_SLOTS)))]
