"""Storage identity: a broker never serves slots owned under another data directory.

The coordinator's `Membership` with an injected clock, and the broker's real
`Store` and `Broker` on temp dirs (no processes, no sockets).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardq.broker.engine import Broker, BrokerConfig
from shardq.broker.store import ForeignStorageError, Store
from shardq.coordinator import Conflict, Membership
from shardq.coordinator import Store as CoordinatorStore
from shardq.coordinator.errors import BadRequest
from shardq.errors import OwnerUnavailableError, TryAgainError
from shardq.router import NUM_SLOTS, BrokerState, Topology

TIMEOUT = 5000
S1, S2, S3, S4 = (uuid.UUID(int=i).hex for i in (1, 2, 3, 4))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def open_membership(db: Path, clock: Clock) -> Membership:
    return Membership(CoordinatorStore(db), expect=3, heartbeat_timeout_ms=TIMEOUT, clock=clock,
                      wall=lambda: 42)


@pytest.fixture
def m3(tmp_path: Path, clock: Clock) -> Membership:
    """Three brokers bootstrapped, each with its own storage identity."""
    m = open_membership(tmp_path / "c.db", clock)
    for i, storage in enumerate((S1, S2, S3), start=1):
        m.register(f"b{i}", f"127.0.0.1:{7100 + i}", 1, storage)
    assert m.bootstrapped
    return m


def info(m: Membership, bid: str):  # type: ignore[no-untyped-def]
    return m.topology.brokers[bid]


def test_storage_is_recorded_at_register_and_published_in_the_topology(m3: Membership) -> None:
    b2 = info(m3, "b2")
    assert (b2.storage, b2.since, b2.state) == (S2, 0, BrokerState.ACTIVE)
    d = Topology.from_dict(m3.topology.to_dict()).brokers["b2"]
    assert (d.storage, d.since) == (S2, 0)


def test_a_known_owner_with_a_new_storage_is_held_and_keeps_its_slots(m3: Membership) -> None:
    slots = m3.topology.slots_of("b2")
    epoch = m3.epoch

    m3.register("b2", "127.0.0.1:7102", 1, S4)

    b2 = info(m3, "b2")
    assert b2.state is BrokerState.LOST_STORAGE
    assert b2.storage == S2  # the identity its slots are owned under, unchanged
    assert m3.topology.slots_of("b2") == slots
    assert m3.epoch == epoch + 1  # clients and the broker learn the state
    [row] = [r for r in m3.status()["brokers"] if r["id"] == "b2"]
    assert row["state"] == "lost-storage"
    assert "forget b2 --accept-data-loss" in row["problem"]
    assert m3.plan_moves() == [] or all("b2" not in (mv.source, mv.target)
                                        for mv in m3.plan_moves())


def test_a_register_without_any_storage_is_held_too(m3: Membership) -> None:
    m3.register("b2", "127.0.0.1:7102", 1, None)
    assert info(m3, "b2").state is BrokerState.LOST_STORAGE


def test_a_held_broker_stays_held_on_heartbeats_silence_and_restarts(
        m3: Membership, tmp_path: Path, clock: Clock) -> None:
    m3.register("b2", "127.0.0.1:7102", 1, S4)
    m3.heartbeat("b2", {}, None)  # no identity: proves nothing
    m3.heartbeat("b2", {}, S4)
    assert info(m3, "b2").state is BrokerState.LOST_STORAGE
    clock.now += TIMEOUT * 2
    m3.heartbeat("b1", {}, S1)
    m3.heartbeat("b3", {}, S3)
    assert m3.check_liveness() == []  # held, not "dead": dead brokers revive on a heartbeat
    m3.leave("b2")
    assert info(m3, "b2").state is BrokerState.LOST_STORAGE

    again = open_membership(tmp_path / "c.db", clock)  # a coordinator restart
    assert again.topology.brokers["b2"].state is BrokerState.LOST_STORAGE
    assert again.topology.brokers["b2"].storage == S2
    again.heartbeat("b2", {}, S4)
    assert again.topology.brokers["b2"].state is BrokerState.LOST_STORAGE


def test_the_recorded_disk_coming_back_revives_the_broker(m3: Membership) -> None:
    m3.leave("b2")  # SIGTERM: dead, keeps its slots
    m3.register("b2", "127.0.0.1:7102", 1, S4)  # wrong disk first
    m3.register("b2", "127.0.0.1:7102", 1, S2)  # then the right one
    assert info(m3, "b2").state is BrokerState.ACTIVE


def test_a_heartbeat_with_another_storage_holds_an_active_broker(m3: Membership) -> None:
    m3.heartbeat("b3", {}, S4)
    assert info(m3, "b3").state is BrokerState.LOST_STORAGE


def test_a_broker_that_owns_nothing_may_change_its_storage(m3: Membership) -> None:
    m3.register("b4", "127.0.0.1:7104", 1, S4)
    epoch = m3.epoch
    fresh = uuid.uuid4().hex
    m3.register("b4", "127.0.0.1:7104", 1, fresh)
    b4 = info(m3, "b4")
    assert (b4.state, b4.storage, b4.since) == (BrokerState.JOINING, fresh, epoch + 1)


def test_a_broker_recorded_without_storage_adopts_its_first_one_at_every_epoch(
        tmp_path: Path, clock: Clock) -> None:
    m = open_membership(tmp_path / "c.db", clock)
    for i in (1, 2, 3):
        m.register(f"b{i}", f"127.0.0.1:{7100 + i}", 1)  # an older broker: no identity
    m.register("b1", "127.0.0.1:7101", 1, S1)
    assert (info(m, "b1").storage, info(m, "b1").since, info(m, "b1").state) == (
        S1, 0, BrokerState.ACTIVE)


def test_another_brokers_storage_is_refused(m3: Membership) -> None:
    with pytest.raises(Conflict, match="data directory of broker 'b1'"):
        m3.register("b2", "127.0.0.1:7102", 1, S1)
    assert info(m3, "b2").state is BrokerState.ACTIVE


def test_a_malformed_storage_is_a_bad_request(m3: Membership) -> None:
    with pytest.raises(BadRequest, match="storage"):
        m3.register("b2", "127.0.0.1:7102", 1, "not-hex")
    with pytest.raises(BadRequest, match="storage"):
        m3.heartbeat("b2", {}, "x" * 32)


def test_forget_of_a_held_live_broker_gives_it_its_slots_back_empty(m3: Membership) -> None:
    slots = m3.topology.slots_of("b2")
    m3.register("b2", "127.0.0.1:7102", 1, S4)

    answer = m3.forget("b2", accept_data_loss=True)

    b2 = info(m3, "b2")
    assert answer["reassigned"] == {"b2": len(slots)} and answer["barred"] is False
    assert (b2.state, b2.storage, b2.since) == (BrokerState.ACTIVE, S4, m3.epoch)
    assert m3.topology.slots_of("b2") == slots
    assert {m3.topology.slot_epoch(s) for s in slots} == {m3.epoch}
    m3.heartbeat("b2", {}, S4)
    assert info(m3, "b2").state is BrokerState.ACTIVE
    m3.register("b2", "127.0.0.1:7102", 1, S2)  # the old disk now: it owns slots under S4
    assert info(m3, "b2").state is BrokerState.LOST_STORAGE


def test_forget_of_a_held_silent_broker_gives_its_slots_to_the_others(
        m3: Membership, clock: Clock) -> None:
    slots = m3.topology.slots_of("b2")
    m3.register("b2", "127.0.0.1:7102", 1, S4)
    clock.now += TIMEOUT * 2
    m3.heartbeat("b1", {}, S1)
    m3.heartbeat("b3", {}, S3)

    answer = m3.forget("b2", accept_data_loss=True)

    assert "b2" not in m3.topology.brokers and answer["barred"] is False
    assert sum(answer["reassigned"].values()) == len(slots)
    assert set(answer["reassigned"]) <= {"b1", "b3"}
    m3.register("b2", "127.0.0.1:7102", 1, S4)  # not barred: it comes back as a new broker
    assert info(m3, "b2").state is BrokerState.JOINING


# -- the broker side ------------------------------------------------------------


def test_a_data_dir_keeps_its_identity_and_belongs_to_one_broker(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "broker.db"))
    st.open_and_recover()
    storage = st.claim_identity("b1")
    assert len(storage) == 32
    st.close()

    st = Store(str(tmp_path / "broker.db"))
    st.open_and_recover()
    assert st.storage_id == storage
    with pytest.raises(ForeignStorageError, match="belongs to broker 'b1'"):
        st.claim_identity("b2")
    assert st.claim_identity("b1") == storage
    st.close()

    other = Store(str(tmp_path / "other" / "broker.db"))
    other.open_and_recover()
    assert other.storage_id != storage
    other.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # only collects call_soon callbacks; never run
    yield loop
    loop.close()


def broker_on(path: Path, loop: asyncio.AbstractEventLoop) -> Broker:
    b = Broker(BrokerConfig("b1", str(path), coordinator="http://coordinator"))
    b.recover()
    b.start(loop)
    return b


def owned_by_b1(epoch: int, slot_epoch: int, storage: str | None, since: int = 0,
                state: str = "active") -> dict[str, object]:
    b1: dict[str, object] = {"addr": "127.0.0.1:9000", "state": state, "weight": 1}
    if storage is not None:
        b1.update(storage=storage, since=since)
    return {"term": 1, "epoch": epoch,
            "brokers": {"b1": b1, "b2": {"addr": "127.0.0.1:9001", "state": "active"}},
            "slots": [[0, NUM_SLOTS - 1, "b1", slot_epoch]]}


def test_a_broker_does_not_adopt_slots_owned_under_another_storage(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    b = broker_on(tmp_path, loop)

    b.apply_topology(owned_by_b1(5, 1, S2, state="lost-storage"))

    assert not any(b.owned) and b.held is not None
    with pytest.raises(OwnerUnavailableError, match="owned under storage"):
        b.queue_for("emails")
    b.apply_topology(owned_by_b1(6, 1, S2))  # another identity, even when "active"
    assert not any(b.owned) and b.held is not None


def test_a_broker_adopts_only_slots_given_since_its_storage_was_recorded(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    b = broker_on(tmp_path, loop)

    b.apply_topology(owned_by_b1(5, 3, b.storage_id, since=5))  # older than this disk
    assert not any(b.owned) and b.held is None
    with pytest.raises(TryAgainError):
        b.queue_for("emails")

    b.apply_topology(owned_by_b1(6, 6, b.storage_id, since=5))  # given after it
    assert all(b.owned)
    assert b.queue_for("emails").name == "emails"


def test_a_coordinator_without_identities_changes_nothing(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    b = broker_on(tmp_path, loop)
    b.apply_topology(owned_by_b1(1, 1, None))
    assert all(b.owned) and b.held is None
