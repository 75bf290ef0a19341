"""shardq.router.Topology: the topology shape, lookups, MOVED patches (docs/design.md §5)."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardq.router import NUM_SLOTS, BrokerInfo, BrokerState, Topology, hash64, slot_of
from shardq.router import slots as slots_module
from tests.props import examples

EMAILS_SLOT = 4029  # slot_of("emails"), a golden vector in test_router.py


def _two_brokers() -> Topology:
    topo = Topology.empty()
    topo.brokers = {"b1": BrokerInfo("b1", "h1:1"), "b2": BrokerInfo("b2", "h2:2")}
    return topo.with_assignment(["b1"] * 2048 + ["b2"] * 2048, epoch=3)


# -- construction -----------------------------------------------------------------


def test_empty_topology_owns_nothing() -> None:
    topo = Topology.empty()
    assert topo.epoch == 0
    assert topo.owner_of("emails") is None
    assert topo.route("emails") is None
    assert topo.slot_epoch(0) == 0
    assert topo.slot_counts() == {}
    assert topo.to_dict() == {
        "term": 0, "epoch": 0, "brokers": {}, "slots": [],
        "overrides": {}, "partitions": {}, "moving": [],
    }


def test_queue_named_on_finds_the_first_name_the_broker_owns() -> None:
    topo = _two_brokers()
    name = topo.queue_named_on("b2", "q")
    assert name is not None and topo.owner_of(name) == "b2"
    first = int(name.rsplit("-", 1)[1])
    assert all(topo.owner_of(f"q-{i}") == "b1" for i in range(first))
    assert topo.queue_named_on("b3", "q", tries=50) is None


def test_standalone_topology_gives_every_slot_to_one_broker_at_epoch_1() -> None:
    topo = Topology.standalone("b1", "127.0.0.1:7101")
    assert topo.epoch == 1
    assert topo.route("emails") == ("b1", "127.0.0.1:7101")
    assert topo.slot_counts() == {"b1": NUM_SLOTS}
    assert topo.to_dict()["slots"] == [[0, NUM_SLOTS - 1, "b1", 1]]
    assert topo.to_dict()["brokers"] == {
        "b1": {"addr": "127.0.0.1:7101", "state": "active", "weight": 1}
    }


def test_slot_tables_must_have_every_slot() -> None:
    with pytest.raises(ValueError, match="4096 entries"):
        Topology(slot_owners=[None])


def test_to_dict_merges_runs_of_same_owner_and_epoch() -> None:
    topo = _two_brokers()
    topo.patch_slot(10, "b1", "h1:1", epoch=4)  # same owner, newer epoch: its own run
    topo.slot_owners[4095] = None  # unowned slots are omitted
    assert topo.to_dict()["slots"] == [
        [0, 9, "b1", 3],
        [10, 10, "b1", 4],
        [11, 2047, "b1", 3],
        [2048, 4094, "b2", 3],
    ]


# -- round trips ----------------------------------------------------------------

ids = st.text(alphabet="abc123-", min_size=1, max_size=4)
queues = st.text(max_size=12)


@st.composite
def topologies(draw: st.DrawFn) -> Topology:
    broker_ids = draw(st.lists(ids, max_size=4, unique=True))
    brokers = {
        b: BrokerInfo(
            b,
            draw(st.text(max_size=15)),
            draw(st.sampled_from(list(BrokerState))),
            draw(st.integers(0, 5)),
        )
        for b in broker_ids
    }
    owners: list[str | None] = [None] * NUM_SLOTS
    epochs = [0] * NUM_SLOTS
    # A few runs of random owners keep the draw cheap but exercise merging.
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, NUM_SLOTS - 1))
        end = draw(st.integers(start, min(NUM_SLOTS - 1, start + 700)))
        owner = draw(st.one_of(st.none(), st.sampled_from(broker_ids) if broker_ids else st.none()))
        epoch = 0 if owner is None else draw(st.integers(0, 2**40))
        owners[start : end + 1] = [owner] * (end - start + 1)
        epochs[start : end + 1] = [epoch] * (end - start + 1)
    moves = st.fixed_dictionaries(
        {
            "move_id": st.text(max_size=8),
            "from": ids,
            "to": ids,
            "phase": st.sampled_from(["prepare", "copy", "freeze", "catch-up", "commit"]),
        },
        optional={"slots": st.lists(st.integers(0, NUM_SLOTS - 1), max_size=5), "queue": queues},
    )
    return Topology(
        term=draw(st.integers(0, 2**31)),
        epoch=draw(st.integers(0, 2**40)),
        brokers=brokers,
        slot_owners=owners,
        slot_epochs=epochs,
        overrides=draw(st.dictionaries(queues, st.tuples(ids, st.integers(0, 2**40)), max_size=3)),
        partitions=draw(st.dictionaries(queues, st.integers(1, 64), max_size=3)),
        moving=draw(st.lists(moves, max_size=3)),
    )


@settings(max_examples=examples(60), deadline=None)
@given(topologies())
def test_json_round_trip_is_lossless(topo: Topology) -> None:
    d = topo.to_dict()
    again = Topology.from_dict(json.loads(json.dumps(d)))
    assert again == topo
    assert again.to_dict() == d


@settings(max_examples=examples(60), deadline=None)
@given(topologies())
def test_msgpack_round_trip_is_lossless(topo: Topology) -> None:
    d = topo.to_dict()
    again = Topology.from_dict(msgpack.unpackb(msgpack.packb(d)))
    assert again == topo
    assert again.to_dict() == d


@settings(max_examples=examples(30), deadline=None)
@given(topologies())
def test_copy_is_equal_and_independent(topo: Topology) -> None:
    before = topo.to_dict()
    twin = topo.copy()
    assert twin == topo
    twin.patch_slot(0, "zz", "z:1", epoch=2**41)
    twin.overrides["q"] = ("zz", 1)
    twin.partitions["p"] = 2
    twin.moving.append({"move_id": "m"})
    for m in twin.moving:
        m["phase"] = "cleanup"
    for info in twin.brokers.values():
        info.addr = "elsewhere"
    assert topo.to_dict() == before


def test_from_dict_accepts_missing_optional_sections() -> None:
    topo = Topology.from_dict({"epoch": 2, "brokers": {"b1": {"addr": "h:1"}}, "slots": []})
    assert topo.term == 0
    assert topo.brokers["b1"] == BrokerInfo("b1", "h:1", BrokerState.ACTIVE, 1)
    assert topo.overrides == {} and topo.partitions == {} and topo.moving == []


def _valid() -> dict[str, Any]:
    return _two_brokers().to_dict()


def _with(**changes: Any) -> dict[str, Any]:
    d = _valid()
    d.update(changes)
    return d


def _without(key: str) -> dict[str, Any]:
    d = _valid()
    del d[key]
    return d


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (_without("epoch"), "missing 'epoch'"),
        (_without("slots"), "missing 'slots'"),
        (_with(epoch=-1), "epoch must be an int"),
        (_with(epoch=True), "epoch must be an int"),
        (_with(term="1"), "term must be an int"),
        (_with(brokers=[]), "brokers must be a mapping"),
        (_with(brokers={"b1": {"addr": 7}}), r"brokers\['b1'\].addr must be a str"),
        (_with(brokers={"b1": {"addr": "h", "state": "zombie"}}), "is not one of joining"),
        (_with(brokers={"b1": {"addr": "h", "weight": -2}}), "weight must be an int"),
        (_with(slots=[[0, 1, "b1"]]), r"slots\[0\] must be \[start, end, owner, epoch\]"),
        (_with(slots=[[5, 4, "b1", 1]]), "start <= end"),
        (_with(slots=[[0, NUM_SLOTS, "b1", 1]]), "start <= end"),
        (_with(slots=[[0, 9, "b1", 1], [9, 12, "b2", 1]]), "slot 9 is owned twice"),
        (_with(slots=[[0, 1, None, 1]]), "owner must be a str"),
        (_with(overrides={"q": ["b1"]}), r"overrides\['q'\] must be \[owner, epoch\]"),
        (_with(partitions={"q": 0}), r"partitions\['q'\] must be an int >= 1"),
        (_with(moving={"move_id": "m"}), "moving must be a list"),
        (_with(moving=[["m"]]), r"moving\[0\] must be a mapping"),
    ],
)
def test_from_dict_refuses_malformed_input(d: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Topology.from_dict(d)


def test_from_dict_refuses_a_non_mapping() -> None:
    with pytest.raises(ValueError, match="must be a mapping"):
        Topology.from_dict([1, 2])  # type: ignore[arg-type]


# -- lookups --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue", "owner", "addr"),
    [
        ("emails", "b2", "h2:2"),  # slot 4029
        ("", "b1", "h1:1"),  # slot 0
        ("tenant-42:send", "b2", "h2:2"),  # slot 2915
    ],
)
def test_route_uses_the_slot_table(queue: str, owner: str, addr: str) -> None:
    topo = _two_brokers()
    assert topo.owner_of(queue) == owner
    assert topo.route(queue) == (owner, addr)
    assert topo.owner_of_slot(slot_of(queue)) == owner


def test_override_wins_over_the_slot() -> None:
    topo = _two_brokers()
    topo.patch_override("emails", "b1", "h1:1", epoch=5)
    assert topo.owner_of("emails") == "b1"
    assert topo.route("emails") == ("b1", "h1:1")
    assert topo.owner_of_slot(EMAILS_SLOT) == "b2"  # the slot itself did not move
    assert topo.route("emails~0") == ("b2", "h2:2")  # slot 3960: a partition is its own queue


def test_route_is_none_when_the_owner_has_no_address() -> None:
    topo = _two_brokers()
    del topo.brokers["b2"]
    assert topo.owner_of("emails") == "b2"
    assert topo.route("emails") is None


def test_addr_slots_and_counts() -> None:
    topo = _two_brokers()
    topo.brokers["b3"] = BrokerInfo("b3", "h3:3", BrokerState.JOINING)
    assert topo.addr_of("b1") == "h1:1"
    assert topo.addr_of("nope") is None
    assert topo.slots_of("b2") == list(range(2048, NUM_SLOTS))
    assert topo.slots_of("b3") == []
    assert topo.slot_counts() == {"b1": 2048, "b2": 2048, "b3": 0}


@pytest.mark.parametrize("slot", [-1, NUM_SLOTS])
def test_slot_lookups_refuse_out_of_range(slot: int) -> None:
    topo = _two_brokers()
    for call in (topo.owner_of_slot, topo.slot_epoch):
        with pytest.raises(ValueError, match="out of range"):
            call(slot)
    with pytest.raises(ValueError, match="out of range"):
        topo.patch_slot(slot, "b1", "h1:1", 99)


# -- MOVED patches ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "applied"),
    [(2, False), (3, True), (4, True)],  # the slot is at epoch 3
)
def test_patch_slot_ignores_older_epochs(epoch: int, applied: bool) -> None:
    topo = _two_brokers()
    topo.patch_slot(EMAILS_SLOT, "b1", "h1:1", epoch)
    assert topo.owner_of("emails") == ("b1" if applied else "b2")
    assert topo.slot_epoch(EMAILS_SLOT) == (epoch if applied else 3)


def test_patch_slot_learns_new_brokers_and_addresses_but_not_the_map_epoch() -> None:
    topo = _two_brokers()
    topo.patch_slot(EMAILS_SLOT, "b9", "h9:9", epoch=7)
    assert topo.route("emails") == ("b9", "h9:9")
    assert topo.brokers["b9"] == BrokerInfo("b9", "h9:9", BrokerState.ACTIVE, 1)
    topo.patch_slot(EMAILS_SLOT, "b9", "elsewhere:9", epoch=8)
    assert topo.route("emails") == ("b9", "elsewhere:9")
    assert topo.epoch == 3  # a newer reply epoch must still trigger a full refresh


def test_stale_patch_changes_no_address() -> None:
    topo = _two_brokers()
    topo.patch_slot(EMAILS_SLOT, "b1", "stale:1", epoch=1)
    assert topo.addr_of("b1") == "h1:1"


@pytest.mark.parametrize(("epoch", "applied"), [(4, False), (5, True), (6, True)])
def test_patch_override_ignores_older_epochs(epoch: int, applied: bool) -> None:
    topo = _two_brokers()
    topo.patch_override("emails", "b1", "h1:1", 5)
    topo.patch_override("emails", "b3", "h3:3", epoch)
    assert topo.owner_of("emails") == ("b3" if applied else "b1")
    assert ("b3" in topo.brokers) is applied


# -- bootstrap ----------------------------------------------------------------------


def test_with_assignment_returns_a_new_topology() -> None:
    topo = Topology.empty()
    topo.brokers["b1"] = BrokerInfo("b1", "h1:1")
    booted = topo.with_assignment(["b1"] * NUM_SLOTS, epoch=1)
    assert booted.epoch == 1
    assert booted.slot_counts() == {"b1": NUM_SLOTS}
    assert {booted.slot_epoch(s) for s in range(NUM_SLOTS)} == {1}
    assert topo.owner_of("emails") is None  # the original is untouched


@pytest.mark.parametrize(
    ("assignment", "match"),
    [(["b1"] * 10, "needs 4096 owners"), (["b1"] * 4095 + ["ghost"], "unknown brokers")],
)
def test_with_assignment_refuses_bad_input(assignment: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _two_brokers().with_assignment(assignment, epoch=9)


@settings(max_examples=examples(200), deadline=None)
@given(st.text(max_size=20), st.booleans())
def test_route_agrees_with_the_slot_hash_cached_or_not(queue: str, clear_cache: bool) -> None:
    topo = _two_brokers()
    if clear_cache:
        slots_module._slot_cache.clear()  # route() holds a bound .get of this dict
    owner = "b1" if hash64(queue) % NUM_SLOTS < 2048 else "b2"
    assert topo.route(queue) == (owner, topo.addr_of(owner))
    assert topo.owner_of(queue) == owner


def test_a_slot_run_of_int_and_list_subclasses_parses_like_plain_ones() -> None:
    """The fast check takes plain types only; an unusual but valid run goes through
    the field-by-field one and parses the same (no error)."""
    class Run(list):  # type: ignore[type-arg]
        pass

    class Slot(int):
        pass

    d = {"epoch": 1, "brokers": {"b1": {"addr": "h:1"}}, "slots": [Run([0, Slot(4095), "b1", 1])]}
    topo = Topology.from_dict(d)
    assert topo.owner_of_slot(0) == topo.owner_of_slot(4095) == "b1"
