"""Job features as pure queue logic (docs/features-jobs.md): TTL, DLQ, logs,
and the event ring a handoff carries."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from shardq.broker.events import EventRing, event_of
from shardq.broker.job import FAILED, MAX_LOG_LINES, WAITING
from shardq.broker.queue import DLQ_TTL, QueueDefaults, QueueState

from .test_handoff_catchup import ACTIONS, PROPS, Source, copy_live
from .test_replay import assert_replay_matches, single, wire


def pulled(q: QueueState, now: int, n: int = 10) -> list[str]:
    out: list[list[Any]] = []
    q.pull(n, 1000, now, out)
    return [row[1] for row in out]


def test_a_job_past_its_ttl_is_never_handed_out_even_before_the_timer() -> None:
    q, log = single()
    q.add("a", "n", b"", {"ttl_ms": 50}, now=0)
    q.add("b", "n", b"", {"ttl_ms": 50, "timeout_ms": 7}, now=0)
    assert q.next_timer() == 50
    assert pulled(q, now=50) == []
    assert [(j.id, j.state, j.dlq_reason) for j in q.dlq_jobs()] == [
        ("a", FAILED, DLQ_TTL), ("b", FAILED, DLQ_TTL)]
    assert q.counts()["waiting"] == 0 and q.counts()["failed"] == 2
    assert_replay_matches(q, log)


def test_a_retried_job_past_its_ttl_is_discarded_by_the_timer() -> None:
    q, log = single()
    q.add("a", "n", b"", {"ttl_ms": 100, "attempts": 3, "backoff": ["fixed", 500]}, now=0)
    [jid] = pulled(q, now=10)
    q.fail(jid, q.jobs[jid].token, "x", now=20)
    assert q.expire_ttls(100) == 1
    assert q.jobs["a"].dlq_reason == DLQ_TTL and q.counts()["delayed"] == 0
    q.promote(600)
    assert pulled(q, now=600) == []
    assert_replay_matches(q, log)


def test_the_timeout_rides_with_the_delivery_row_only_when_set() -> None:
    q, _ = single()
    q.add("a", "n", b"", {"timeout_ms": 250}, now=0)
    q.add("b", "n", b"", None, now=0)
    out: list[list[Any]] = []
    q.pull(2, 1000, 1, out)
    assert [len(r) for r in out] == [10, 9] and out[0][9] == 250


def test_dlq_retry_resets_attempts_and_purge_removes() -> None:
    q, log = single()
    for jid in ("a", "b"):
        q.add(jid, "n", b"", {"attempts": 1, "ttl_ms": 10_000}, now=0)
    for jid in pulled(q, now=1):
        q.fail(jid, q.jobs[jid].token, "bad", now=2)
    assert [j.id for j in q.dlq_jobs()] == ["a", "b"]
    assert q.dlq_retry(["b", "zzz", "b"], now=3) == 1
    b = q.jobs["b"]
    assert (b.state, b.attempts_made, b.dlq_reason, b.expires_at) == (WAITING, 0, None, 0)
    assert q.counts()["failed"] == 1 and q.counts()["waiting"] == 1
    assert q.dlq_purge(now=4) == 1 and "a" in q.tombstones
    assert q.counts()["failed"] == 0
    assert_replay_matches(q, log)


def test_job_logs_keep_the_last_lines_and_replay_exactly() -> None:
    q, log = single()
    q.add("a", "n", b"", None, now=0)
    [jid] = pulled(q, now=1)
    tok = q.jobs[jid].token
    for i in range(MAX_LOG_LINES + 5):
        assert q.add_log(jid, tok, f"l{i}") is None
    assert q.add_log(jid, tok + 1, "x") == "LOCK_LOST"
    assert q.add_log("nope", tok, "x") == "NOT_FOUND"
    logs = q.jobs["a"].logs
    assert logs is not None and logs[0] == MAX_LOG_LINES + 5
    assert logs[1:] == [f"l{i}" for i in range(5, MAX_LOG_LINES + 5)]
    assert q.add_log(jid, tok, "y" * 5000) is None and len(q.jobs["a"].logs[-1]) == 2000
    assert_replay_matches(q, log)


def test_ops_map_to_the_events_users_watch() -> None:
    q, log = single()
    q.add("a", "n", b"", {"attempts": 2}, now=0)
    [jid] = pulled(q, now=1)
    q.progress(jid, q.jobs[jid].token, 7)
    q.fail(jid, q.jobs[jid].token, "x", now=2)
    [jid] = pulled(q, now=3)
    q.ack(jid, q.jobs[jid].token, b"\x01", now=4)
    kinds = [ev[1] for i, op in enumerate(log) if (ev := event_of(op, i + 1)) is not None]
    assert kinds == ["added", "active", "progress", "failed", "active", "completed"]


def test_a_full_ring_moves_its_start_forward() -> None:
    ring = EventRing(0, size=3)
    for seq in range(1, 6):
        ring.note(("S", "q", f"j{seq}"), seq)
    assert ring.start == 2 and [e[0] for e in ring.events] == [3, 4, 5]
    assert [e[0] for e in ring.between(3, 4)] == [4]
    assert EventRing.from_meta(ring.to_meta(), 5) is not None
    assert EventRing.from_meta(ring.to_meta(), 6) is None  # not complete through seq 6


@PROPS
@given(before=ACTIONS, during=ACTIONS, split=st.floats(0, 1))
def test_the_event_ring_arrives_complete_through_a_handoff(
        before: list[tuple[Any, ...]], during: list[tuple[Any, ...]], split: float) -> None:
    src = Source()
    src.q.ring = EventRing(0)  # someone subscribed from the start
    for action in before:
        src.run(action)
    fast, ops, _ = copy_live(src, during, split, events=True)
    if any(op[0] == "X" for op in ops):
        assert fast.ring is None  # rebuilt without its ring: resumers are told of a gap
        return
    assert fast.ring is not None and src.q.ring is not None
    assert wire(fast.ring.to_meta()) == wire(src.q.ring.to_meta())
    assert fast.seq == src.q.seq == fast.ring.upto


def test_defaults_bound_the_dlq_like_failed_history() -> None:
    log: list[Any] = []
    q = QueueState("qa", 1, log, QueueDefaults(keep_failed=2))
    for i in range(4):
        q.add(f"j{i}", "n", b"", None, now=0)
    for jid in pulled(q, now=1):
        q.fail(jid, q.jobs[jid].token, "bad", now=2)
    assert [j.id for j in q.dlq_jobs()] == ["j2", "j3"]
