"""The broker-wide tombstone bound (broker/tombstones.py) over real queues."""

from __future__ import annotations

from typing import Any

from shardq.broker.queue import QueueDefaults, QueueState
from shardq.broker.tombstones import trim_oldest


def _queue(name: str, log: list[Any], defaults: QueueDefaults, removed_at: list[int]) -> QueueState:
    q = QueueState(name, 0, log, defaults)
    for t in removed_at:
        q.add(f"{name}-{t}", "n", b"", None, now=t)
    for t in removed_at:
        q.remove_job(f"{name}-{t}", now=t)
    return q


def test_the_oldest_tombstones_across_queues_go_first_each_queue_logging_its_own() -> None:
    defaults = QueueDefaults(max_tombstones=100)
    log: list[Any] = []
    a = _queue("a", log, defaults, [1, 4, 5])
    b = _queue("b", log, defaults, [2, 3, 6])
    del log[:]
    assert trim_oldest([a, b], budget=2) == 4
    assert list(a.tombstones) == ["a-5"]
    assert list(b.tombstones) == ["b-6"]
    assert sorted(log) == [("T", "a", ["a-1", "a-4"]), ("T", "b", ["b-2", "b-3"])]
    assert a.add("a-1", "n", b"", None, now=7) is True  # forgotten: a new job
    assert a.add("a-5", "n", b"", None, now=7) is False  # still a duplicate


def test_under_the_budget_nothing_is_forgotten() -> None:
    defaults = QueueDefaults()
    log: list[Any] = []
    a = _queue("a", log, defaults, [1, 2])
    del log[:]
    assert trim_oldest([a, QueueState("empty", 0, log, defaults)], budget=2) == 0
    assert list(a.tombstones) == ["a-1", "a-2"] and log == []
