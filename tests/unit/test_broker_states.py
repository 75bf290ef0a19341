"""The coordinator's broker-state transition table and its one writer."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shardq.coordinator import Conflict, Membership, Store
from shardq.coordinator.membership import BROKER_TRANSITIONS
from shardq.router import BrokerState


def test_every_state_has_a_row_and_none_moves_to_itself() -> None:
    assert set(BROKER_TRANSITIONS) == set(BrokerState)
    for state, nxt in BROKER_TRANSITIONS.items():
        assert state not in nxt


def test_a_held_broker_never_dies_and_a_joining_one_is_never_held() -> None:
    assert BrokerState.DEAD not in BROKER_TRANSITIONS[BrokerState.LOST_STORAGE]
    assert BrokerState.LOST_STORAGE not in BROKER_TRANSITIONS[BrokerState.JOINING]


def test_a_leaving_broker_is_never_demoted_to_draining() -> None:
    assert BrokerState.DRAINING not in BROKER_TRANSITIONS[BrokerState.LEAVING]


@pytest.fixture
def m3(tmp_path: Path) -> Membership:
    m = Membership(Store(tmp_path / "c.db"), expect=3, heartbeat_timeout_ms=5000,
                   clock=lambda: 0.0, wall=lambda: 1)
    for i in (1, 2, 3):
        m.register(f"b{i}", f"127.0.0.1:{7100 + i}", 1, uuid.UUID(int=i).hex)
    return m


def test_an_absent_broker_comes_back_only_to_the_state_it_left(m3: Membership) -> None:
    m3.drain("b2")
    m3.leave("b2")  # SIGTERM while draining: dead, and draining is what it comes back to
    assert m3.revive_state("b2") is BrokerState.DRAINING
    topo = m3.topology.copy()
    with pytest.raises(Conflict, match="cannot become active"):
        m3._set_state(topo, "b2", BrokerState.ACTIVE)
    m3.heartbeat("b2", {}, uuid.UUID(int=2).hex)
    assert m3.topology.brokers["b2"].state is BrokerState.DRAINING
