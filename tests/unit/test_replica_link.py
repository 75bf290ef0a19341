"""The primary link's bookkeeping (broker/replica.py, docs/design.md §12): no sockets."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from shardq.broker import replica
from shardq.broker.replica import Link


def link() -> tuple[Link, Any]:
    commits = SimpleNamespace(committed_seq=0)
    return Link(SimpleNamespace(commits=commits), "b2", 1), commits  # type: ignore[arg-type]


def test_a_disk_full_retry_ships_only_the_ops_the_follower_lacks() -> None:
    lk, commits = link()
    a, b, c = ["A", "q", ["a"]], ["A", "q", ["b"]], ["K", "q", "a"]
    assert lk._new_ops(1, [a, b]) == [a, b]
    # Batch 1 found the disk full: its ops lead batch 2 (broker/commitlog.py).
    assert lk._new_ops(2, [a, b, c]) == [c]
    commits.committed_seq = 2
    d = ["K", "q", "b"]
    assert lk._new_ops(3, [d]) == [d]
    assert [s for s, _ in lk._unconfirmed] == [3], "committed batches are forgotten"


def test_an_equal_op_that_is_a_new_object_is_shipped() -> None:
    lk, _ = link()
    lk._new_ops(1, [["K", "q", "a"]])
    again = ["K", "q", "a"]  # the same value logged again is a new op
    assert lk._new_ops(2, [again]) == [again]


def test_the_tail_is_bounded_and_keeps_the_last_batch(monkeypatch: Any) -> None:
    monkeypatch.setattr(replica, "TAIL_MAX_OPS", 3)
    lk, _ = link()
    for seq in range(1, 6):
        lk._keep(seq, [["A", "q", [str(seq)]], ["A", "q", [f"{seq}b"]]])
    assert [s for s, _ in lk._tail] == [5]
    assert lk._tail_ops == 2
