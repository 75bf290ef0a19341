"""The broker's ownership records: applied maps, what the log holds, recovery.

The real engine `Broker` on a temp dir; its open batch is committed by hand
(no event loop runs), so each test controls exactly what reaches the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardq.broker.engine import Broker, BrokerConfig
from shardq.router import NUM_SLOTS, Topology

BROKERS = {b: {"addr": f"127.0.0.1:{9000 + i}", "state": "active", "weight": 1}
           for i, b in enumerate(["b1", "b2", "b3"])}


def topology(epoch: int, owners: list[str], epochs: list[int] | None = None) -> dict[str, Any]:
    """A docs/design.md §5 map with one run per slot (as a ring's scattered slots give)."""
    epochs = epochs or [1] * NUM_SLOTS
    return {"term": 1, "epoch": epoch, "brokers": BROKERS,
            "slots": [[s, s, owners[s], epochs[s]] for s in range(NUM_SLOTS)]}


def striped(*brokers: str) -> list[str]:
    return [brokers[s % len(brokers)] for s in range(NUM_SLOTS)]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # only collects call_soon callbacks; never run
    yield loop
    loop.close()


def open_broker(path: Path, loop: asyncio.AbstractEventLoop) -> Broker:
    b = Broker(BrokerConfig("b1", str(path), coordinator="http://coordinator"))
    b.recover()
    b.start(loop)
    return b


def commit(b: Broker) -> list[Any]:
    ops = b.log[:]
    b.log.clear()
    b.commits.seq += 1
    b.store.commit(b.commits.seq, ops)
    return ops


def test_the_map_goes_to_the_log_once_per_change(tmp_path: Path,
                                                 loop: asyncio.AbstractEventLoop) -> None:
    b = open_broker(tmp_path, loop)
    b.apply_topology(topology(2, striped("b1", "b2")))
    [op] = commit(b)
    assert op[0] == "O" and op[2]["topology"]["epoch"] == 2
    b.log.append(b.ownership_op())  # a handoff step's record: the map did not change
    [op] = commit(b)
    assert "topology" not in op[2] and op[2]["slots"]
    b.handoff.give_up([1], "b2", BROKERS["b2"]["addr"], 3)  # a MOVED-time patch
    ops = commit(b)
    record = [op for op in ops if op[0] == "O"][-1][2]
    assert record["topology"]["slots"][1] == [1, 1, "b2", 3]
    b.close()


def test_apply_takes_and_gives_up_exactly_the_slots_that_changed(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    b = open_broker(tmp_path, loop)
    b.apply_topology(topology(2, striped("b1", "b2")))
    assert [s for s in range(NUM_SLOTS) if b.owned[s]] == list(range(0, NUM_SLOTS, 2))
    owners, epochs = striped("b1", "b2"), [1] * NUM_SLOTS
    owners[0], epochs[0] = "b3", 3  # committed away from us
    owners[1], epochs[1] = "b1", 3  # a bootstrap-like grant to us
    owners[2], epochs[2] = "b3", 1  # not newer than ours: kept
    b.apply_topology(topology(3, owners, epochs))
    assert (b.owned[0], b.owned[1], b.owned[2]) == (0, 1, 1)
    assert (b.slot_epochs[0], b.slot_epochs[1]) == (3, 3)
    assert sum(b.owned) == NUM_SLOTS // 2
    b.close()


def test_a_restart_recovers_the_last_map_from_records_without_it(
        tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    b = open_broker(tmp_path, loop)
    b.apply_topology(topology(2, striped("b1", "b2")))
    commit(b)
    b.apply_topology(topology(5, striped("b1", "b2", "b3"), [5] * NUM_SLOTS))
    b.log.append(b.ownership_op())
    b.log.append(b.ownership_op())
    commit(b)
    b.close()
    again = open_broker(tmp_path, loop)
    assert again.topology.epoch == 5
    assert again.topology.to_dict() == Topology.from_dict(
        topology(5, striped("b1", "b2", "b3"), [5] * NUM_SLOTS)).to_dict()
    assert [s for s in range(NUM_SLOTS) if again.owned[s]] == [
        s for s in range(NUM_SLOTS) if striped("b1", "b2", "b3")[s] == "b1"]
    again.close()
