"""Replication records and the failover driver (docs/design.md §12): an
injected clock and a fake broker link, no sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from shardq.coordinator import Membership, Store
from shardq.coordinator.failover import Failover
from shardq.coordinator.replication import ReplicationBook
from shardq.router import BrokerState

TIMEOUT = 5000


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def cluster(tmp_path: Path, n: int = 3) -> tuple[Membership, ReplicationBook, Store, Clock]:
    clock = Clock()
    store = Store(tmp_path / "coordinator.db")
    m = Membership(store, expect=n, heartbeat_timeout_ms=TIMEOUT, clock=clock, wall=lambda: 42)
    for i in range(1, n + 1):
        m.register(f"b{i}", f"127.0.0.1:{7100 + i}", 1)
    book = ReplicationBook(m, store, 1)
    return m, book, store, clock


def test_placement_gives_each_broker_one_other_as_follower(tmp_path: Path) -> None:
    m, book, store, _ = cluster(tmp_path)
    assert book.reconcile()
    followers = {p: r["follower"] for p, r in book.state.items()}
    assert followers == {"b1": "b2", "b2": "b3", "b3": "b1"}
    assert not any(r["in_sync"] for r in book.state.values())
    assert not book.reconcile(), "a second pass changes nothing"
    assert b'"replication"' in m.topology_json()
    store.close()
    # Persisted: a restarted coordinator has the same records.
    store2 = Store(tmp_path / "coordinator.db")
    m2 = Membership(store2, expect=3, heartbeat_timeout_ms=TIMEOUT, clock=Clock())
    assert ReplicationBook(m2, store2, 1).state == book.state
    store2.close()


def test_compare_and_set_on_repl_epoch(tmp_path: Path) -> None:
    _, book, store, _ = cluster(tmp_path)
    book.reconcile()
    assert book.in_sync("b1", "b2", 1)["in_sync"] is True
    stale = book.out_of_sync("b1", "b2", 0)  # an older epoch changes nothing
    assert stale["in_sync"] is True and stale["repl_epoch"] == 1
    answer = book.out_of_sync("b1", "b2", 1)
    assert answer == {**answer, "in_sync": False, "repl_epoch": 2, "fenced": False}
    assert book.in_sync("b1", "b2", 1)["in_sync"] is False, "in sync at a stale epoch: no"
    store.close()


def test_a_dead_follower_is_replaced_out_of_sync(tmp_path: Path) -> None:
    m, book, store, clock = cluster(tmp_path)
    book.reconcile()
    book.in_sync("b1", "b2", 1)
    clock.now += TIMEOUT + 1
    m.heartbeat("b1")
    m.heartbeat("b3")
    assert m.check_liveness() == ["b2"]
    book.reconcile()
    assert book.state["b1"] == {"follower": "b3", "in_sync": False, "repl_epoch": 2}
    assert book.state["b2"]["follower"] == "b3", "a dead primary's record waits for failover"
    store.close()


def test_failover_fences_commits_and_promotes_then_refuses_a_stale_primary(
        tmp_path: Path) -> None:
    m, book, store, clock = cluster(tmp_path)
    book.reconcile()
    for p, r in list(book.state.items()):
        book.in_sync(p, r["follower"], r["repl_epoch"])
    sent: list[tuple[str, str, dict[str, Any]]] = []

    async def send(broker: str, op: str, args: dict[str, Any], timeout: float) -> Any:
        sent.append((broker, op, args))
        return {"synced": True} if op == "REPL_FENCE" else {"active": True}

    fo = Failover(m, book, send)
    slots = len(m.topology.slots_of("b2"))
    clock.now += TIMEOUT + 1
    m.heartbeat("b1")
    m.heartbeat("b3")
    m.check_liveness()
    asyncio.run(fo.tick())
    assert [(b, op) for b, op, _ in sent] == [("b3", "REPL_FENCE"), ("b3", "REPL_PROMOTE")]
    assert sent[0][2]["repl_epoch"] == 2
    assert m.topology.slots_of("b2") == []
    assert len(m.topology.slots_of("b3")) > slots
    rec = book.state["b2"]
    assert rec["failover"]["phase"] == "done" and rec["failover"]["to"] == "b3"
    assert len(sent[1][2]["slots"]) == slots
    # The old primary asking to go alone at its old epoch is told it is fenced.
    assert book.out_of_sync("b2", "b3", 1)["fenced"] is True
    # It comes back joining (off the ring until a rebalance), and starts over
    # as a primary whose pre-fence epoch stays fenced.
    m.heartbeat("b2")
    assert m.topology.brokers["b2"].state is BrokerState.JOINING
    m.activate_joining()
    book.reconcile()
    assert book.state["b2"]["fenced_below"] == 2 and "failover" not in book.state["b2"]
    assert book.out_of_sync("b2", book.state["b2"]["follower"] or "", 1)["fenced"] is True
    store.close()


def test_an_out_of_sync_follower_is_never_promoted(tmp_path: Path) -> None:
    m, book, store, clock = cluster(tmp_path)
    book.reconcile()  # nobody in sync yet

    async def send(broker: str, op: str, args: dict[str, Any], timeout: float) -> Any:
        raise AssertionError(f"sent {op} to {broker}")

    fo = Failover(m, book, send)
    owned = m.topology.slots_of("b2")
    clock.now += TIMEOUT + 1
    m.heartbeat("b1")
    m.heartbeat("b3")
    m.check_liveness()
    asyncio.run(fo.tick())
    assert m.topology.slots_of("b2") == owned, "unavailable, never silently empty"
    store.close()


def test_a_follower_without_a_complete_copy_is_not_promoted(tmp_path: Path) -> None:
    m, book, store, clock = cluster(tmp_path)
    book.reconcile()
    book.in_sync("b2", "b3", 1)

    async def send(broker: str, op: str, args: dict[str, Any], timeout: float) -> Any:
        return {"synced": False}

    fo = Failover(m, book, send)
    owned = m.topology.slots_of("b2")
    clock.now += TIMEOUT + 1
    m.heartbeat("b1")
    m.heartbeat("b3")
    m.check_liveness()
    asyncio.run(fo.tick())
    assert m.topology.slots_of("b2") == owned
    assert "failover" not in book.state["b2"] and book.failovers == {"refused": 1}
    store.close()
