"""Coordinator membership logic with an injected clock: no sockets, no sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardq.coordinator import Conflict, Forbidden, Membership, NotFound, Store
from shardq.coordinator.errors import BadRequest
from shardq.router import NUM_SLOTS, BrokerState, Ring, Topology

TIMEOUT = 5000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.db"


def open_membership(db: Path, clock: FakeClock, expect: int = 1) -> tuple[Membership, Store]:
    store = Store(db)
    m = Membership(store, expect=expect, heartbeat_timeout_ms=TIMEOUT, clock=clock,
                   wall=lambda: 42)
    return m, store


@pytest.fixture
def m3(db: Path, clock: FakeClock):  # type: ignore[no-untyped-def]
    """A bootstrapped three-broker cluster."""
    m, store = open_membership(db, clock, expect=3)
    for i in (1, 2, 3):
        m.register(f"b{i}", f"127.0.0.1:{7100 + i}", 1)
    yield m
    store.close()


def state(m: Membership, bid: str) -> BrokerState:
    return m.topology.brokers[bid].state


def test_bootstrap_waits_for_expected_brokers(db: Path, clock: FakeClock) -> None:
    m, store = open_membership(db, clock, expect=3)
    assert m.register("b1", "127.0.0.1:7101", 1) == {"term": 1, "epoch": 0, "state": "joining",
                                                     "heartbeat_ms": 1000}
    m.register("b2", "127.0.0.1:7102", 2)
    assert not m.bootstrapped
    assert m.epoch == 0
    assert set(m.topology.slot_owners) == {None}

    answer = m.register("b3", "127.0.0.1:7103", 1)

    assert answer == {"term": 1, "epoch": 1, "state": "active", "heartbeat_ms": 1000}
    assert all(state(m, b) is BrokerState.ACTIVE for b in ("b1", "b2", "b3"))
    assert m.topology.slot_owners == Ring({"b1": 1, "b2": 2, "b3": 1}).targets()
    assert set(m.topology.slot_epochs) == {1}
    assert sum(m.topology.slot_counts().values()) == NUM_SLOTS
    store.close()


def test_broker_registering_after_bootstrap_joins_without_slots(
        db: Path, clock: FakeClock) -> None:
    m, store = open_membership(db, clock, expect=1)
    m.register("b1", "127.0.0.1:7101", 1)
    assert m.epoch == 1

    answer = m.register("b2", "127.0.0.1:7102", 1)

    assert answer["state"] == "joining"
    assert answer["epoch"] == 2
    assert m.topology.slots_of("b2") == []
    assert len(m.topology.slots_of("b1")) == NUM_SLOTS
    moves = m.plan_moves()  # the rebalancing hook: everything planned goes to b2
    assert moves
    assert {mv.target for mv in moves} == {"b2"}
    store.close()


def test_missed_heartbeats_mark_broker_dead_and_it_keeps_its_slots(
        m3: Membership, clock: FakeClock) -> None:
    owned = m3.topology.slots_of("b2")
    clock.advance(TIMEOUT - 1)
    m3.heartbeat("b1")
    m3.heartbeat("b3")
    assert m3.check_liveness() == []

    clock.advance(2)
    assert m3.check_liveness() == ["b2"]

    assert state(m3, "b2") is BrokerState.DEAD
    assert m3.epoch == 2
    assert m3.topology.slots_of("b2") == owned
    assert m3.check_liveness() == []  # already dead: no second bump
    assert m3.epoch == 2


def test_heartbeat_brings_dead_broker_back(m3: Membership, clock: FakeClock) -> None:
    clock.advance(TIMEOUT + 1)
    assert sorted(m3.check_liveness()) == ["b1", "b2", "b3"]
    assert m3.epoch == 2  # one bump for the whole batch

    answer = m3.heartbeat("b2", {"queues": {}})

    assert answer == {"term": 1, "epoch": 3, "state": "active", "heartbeat_ms": 1000}
    assert state(m3, "b2") is BrokerState.ACTIVE


def test_dead_joining_broker_comes_back_joining(db: Path, clock: FakeClock) -> None:
    m, store = open_membership(db, clock, expect=2)
    m.register("b1", "127.0.0.1:7101", 1)
    clock.advance(TIMEOUT + 1)
    assert m.check_liveness() == ["b1"]
    assert m.epoch == 0  # no map yet, no epoch

    m.register("b2", "127.0.0.1:7102", 1)
    assert not m.bootstrapped  # b1 is dead: only one live broker
    assert m.heartbeat("b1")["epoch"] == 1  # b1 back as joining -> bootstrap
    assert set(m.topology.slot_owners) == {"b1", "b2"}
    store.close()


def test_reregister_with_new_addr_bumps_epoch(m3: Membership) -> None:
    assert m3.register("b2", "127.0.0.1:7102", 1)["epoch"] == 1  # same addr: nothing changes
    owned = m3.topology.slots_of("b2")

    answer = m3.register("b2", "10.0.0.9:7102", 1)

    assert answer == {"term": 1, "epoch": 2, "state": "active", "heartbeat_ms": 1000}
    assert m3.topology.addr_of("b2") == "10.0.0.9:7102"
    assert m3.topology.slots_of("b2") == owned


def test_forget_reassigns_to_ring_targets_of_live_brokers_and_bars_the_id(
        m3: Membership, clock: FakeClock) -> None:
    before = m3.topology.copy()
    lost = before.slots_of("b3")
    clock.advance(TIMEOUT + 1)
    m3.heartbeat("b1")
    m3.heartbeat("b2")
    assert m3.check_liveness() == ["b3"]
    epoch = m3.epoch

    answer = m3.forget("b3", accept_data_loss=True)

    ring = Ring({"b1": 1, "b2": 1})
    assert answer["epoch"] == epoch + 1
    assert answer["slots"] == len(lost)
    assert sum(answer["reassigned"].values()) == len(lost)
    topo = m3.topology
    assert "b3" not in topo.brokers
    for s in range(NUM_SLOTS):
        if s in lost:
            assert topo.owner_of_slot(s) == ring.target(s)
            assert topo.slot_epoch(s) == epoch + 1
        else:
            assert topo.owner_of_slot(s) == before.owner_of_slot(s)
            assert topo.slot_epoch(s) == 1
    with pytest.raises(Forbidden):
        m3.register("b3", "127.0.0.1:7103", 1)
    with pytest.raises(Forbidden):
        m3.heartbeat("b3")
    assert m3.forget("b3", accept_data_loss=True)["slots"] == 0  # idempotent


def test_forget_gives_nothing_to_dead_brokers(m3: Membership, clock: FakeClock) -> None:
    clock.advance(TIMEOUT + 1)
    m3.heartbeat("b1")
    assert sorted(m3.check_liveness()) == ["b2", "b3"]
    lost = m3.topology.slots_of("b3")

    m3.forget("b3", accept_data_loss=True)

    assert {m3.topology.owner_of_slot(s) for s in lost} == {"b1"}
    assert state(m3, "b2") is BrokerState.DEAD


def test_forget_refuses_without_accept_a_live_owner_or_an_unknown_id(m3: Membership) -> None:
    with pytest.raises(BadRequest):
        m3.forget("b3", accept_data_loss=False)
    with pytest.raises(Conflict):
        m3.forget("b3", accept_data_loss=True)  # alive and owns slots
    with pytest.raises(NotFound):
        m3.forget("b9", accept_data_loss=True)
    assert "b3" in m3.topology.brokers


def test_forget_refuses_when_no_live_broker_can_take_the_slots(
        m3: Membership, clock: FakeClock) -> None:
    clock.advance(TIMEOUT + 1)
    m3.check_liveness()
    with pytest.raises(Conflict):
        m3.forget("b3", accept_data_loss=True)
    assert "b3" in m3.topology.brokers


def test_term_increments_on_restart_and_state_survives(
        db: Path, clock: FakeClock) -> None:
    m, store = open_membership(db, clock, expect=2)
    m.register("b1", "127.0.0.1:7101", 1)
    m.register("b2", "127.0.0.1:7102", 3)
    m.register("b3", "127.0.0.1:7103", 1)  # joining, after bootstrap
    clock.advance(TIMEOUT + 1)
    m.heartbeat("b1")
    m.heartbeat("b3")
    m.check_liveness()  # b2 dead
    m.forget("b2", accept_data_loss=True)
    before = m.topology.to_dict()
    store.close()

    m2, store2 = open_membership(db, clock, expect=2)

    assert m2.term == 2
    after = m2.topology.to_dict()
    assert after["term"] == 2
    assert {k: v for k, v in after.items() if k != "term"} == \
        {k: v for k, v in before.items() if k != "term"}
    assert m2.barred == {"b2"}
    with pytest.raises(Forbidden):
        m2.register("b2", "127.0.0.1:7102", 3)
    store2.close()
    m3, store3 = open_membership(db, clock)
    assert m3.term == 3
    store3.close()


def test_restart_gives_every_broker_a_fresh_deadline(db: Path, clock: FakeClock) -> None:
    m, store = open_membership(db, clock)
    m.register("b1", "127.0.0.1:7101", 1)
    store.close()
    clock.advance(10 * TIMEOUT)  # the coordinator was down a long time

    m2, store2 = open_membership(db, clock)

    assert m2.check_liveness() == []
    clock.advance(TIMEOUT + 1)
    assert m2.check_liveness() == ["b1"]
    store2.close()


def test_dead_state_survives_restart_and_revives_to_the_state_it_had(
        db: Path, clock: FakeClock) -> None:
    m, store = open_membership(db, clock)
    m.register("b1", "127.0.0.1:7101", 1)
    m.register("b2", "127.0.0.1:7102", 1)  # joining
    clock.advance(TIMEOUT + 1)
    m.check_liveness()
    store.close()

    m2, store2 = open_membership(db, clock)

    assert state(m2, "b2") is BrokerState.DEAD
    assert m2.heartbeat("b2")["state"] == "joining"
    assert m2.heartbeat("b1")["state"] == "active"
    store2.close()


def test_leave_marks_an_owner_dead_and_removes_a_broker_without_slots(m3: Membership) -> None:
    m3.register("b4", "127.0.0.1:7104", 1)  # joining, owns nothing
    epoch = m3.epoch

    assert m3.leave("b1")["state"] == "dead"
    assert m3.leave("b4")["state"] is None

    assert state(m3, "b1") is BrokerState.DEAD
    assert "b4" not in m3.topology.brokers
    assert m3.epoch == epoch + 2
    assert m3.leave("b4")["epoch"] == epoch + 2  # unknown: no-op
    with pytest.raises(NotFound):
        m3.heartbeat("b4")  # must register again


def test_status_counts_slots_and_sums_last_stats(m3: Membership) -> None:
    m3.heartbeat("b1", {"queues": {
        "a": {"waiting": 5, "active": 2, "delayed": 1, "completed": 9, "failed": 0},
        "b": {"waiting": 1, "active": 0, "delayed": 0, "completed": 0, "failed": 3},
    }})
    m3.heartbeat("b1", {"queues": {
        "a": {"waiting": 4, "active": 2, "delayed": 1, "completed": 10, "failed": 0},
        "b": {"waiting": 1, "active": 0, "delayed": 0, "completed": 0, "failed": 3},
    }})
    m3.heartbeat("b2", {"queues": {"x": {"waiting": "junk"}}})

    status = m3.status()

    assert status["epoch"] == 1
    rows = {b["id"]: b for b in status["brokers"]}
    assert [b["id"] for b in status["brokers"]] == ["b1", "b2", "b3"]
    assert rows["b1"] == {"id": "b1", "addr": "127.0.0.1:7101", "state": "active", "weight": 1,
                          "slots": len(m3.topology.slots_of("b1")), "queues": 2,
                          "waiting": 5, "active": 2, "delayed": 1}
    assert rows["b2"]["queues"] == 1
    assert rows["b2"]["waiting"] == 0
    assert sum(b["slots"] for b in status["brokers"]) == NUM_SLOTS


@pytest.mark.parametrize(("bid", "addr", "weight"), [
    ("", "127.0.0.1:1", 1),
    ("b 1", "127.0.0.1:1", 1),
    ("b1", "127.0.0.1", 1),
    ("b1", "127.0.0.1:99999", 1),
    ("b1", "127.0.0.1:1", 0),
])
def test_register_refuses_malformed_input(
        db: Path, clock: FakeClock, bid: str, addr: str, weight: int) -> None:
    m, store = open_membership(db, clock)
    with pytest.raises(BadRequest):
        m.register(bid, addr, weight)
    assert m.topology.brokers == {}
    store.close()


def test_a_failed_save_leaves_memory_as_on_disk(
        m3: Membership, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    before = m3.topology.to_dict()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(m3._store, "save", broken)
    with pytest.raises(OSError):
        m3.register("b2", "10.9.9.9:1", 1)
    assert m3.topology.to_dict() == before
    monkeypatch.undo()
    assert m3.register("b2", "10.9.9.9:1", 1)["epoch"] == 2


def test_topology_json_round_trips(m3: Membership) -> None:
    import json

    topo = Topology.from_dict(json.loads(m3.topology_json()))
    assert topo.slot_owners == m3.topology.slot_owners
    assert topo.epoch == 1
    assert topo.term == 1


@pytest.mark.parametrize(("timeout_ms", "beat_ms"), [(5000, 1000), (1000, 250), (20, 10)])
def test_answers_ask_for_four_beats_per_heartbeat_timeout(
        db: Path, clock: FakeClock, timeout_ms: int, beat_ms: int) -> None:
    store = Store(db)
    m = Membership(store, heartbeat_timeout_ms=timeout_ms, clock=clock, wall=lambda: 42)
    assert m.register("b1", "127.0.0.1:7101")["heartbeat_ms"] == beat_ms
    assert m.heartbeat("b1")["heartbeat_ms"] == beat_ms
    store.close()
