"""broker/jobadmin.py: job getters and actions on one queue, without sockets.

Each action is checked three ways: its effect on what workers get next, the
queue's counts, and that replaying the ops it emitted (recovery, a
handoff's catch-up) rebuilds the same queue.
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardq.broker.handoff import apply_ops_live, build_queue
from shardq.broker.job import ACTIVE, COMPLETED, DELAYED, FAILED, WAITING
from shardq.broker.jobadmin import LIST_STATES, MAX_PAGE, sort_key
from shardq.broker.queue import QueueDefaults, QueueState
from shardq.broker.replay import Images, apply_chunk, apply_op
from shardq.errors import BadRequestError, JobStateError, NotFoundError
from tests.props import examples

NOW = 1_000_000


def wire(op: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(op, use_bin_type=True), raw=False)


def make(**defaults: Any) -> tuple[QueueState, list[Any]]:
    log: list[Any] = []
    return QueueState("qa", 11, log, QueueDefaults(**defaults)), log


def replayed(log: list[Any]) -> QueueState:
    images: Images = {}
    for op in log:
        apply_op(images, wire(op))
    img = images["qa"]
    q = QueueState("qa", 11, [], QueueDefaults())
    q.restore(img.meta, img.jobs, img.tombstones)
    return q


def export(q: QueueState) -> Any:
    return wire(copy.deepcopy(list(q.export_chunks())))


def pull_ids(q: QueueState, n: int = 100, now: int = NOW) -> list[str]:
    out: list[list[Any]] = []
    q.pull(n, 1000, now, out)
    return [row[1] for row in out]


def add(q: QueueState, jid: str, now: int = NOW, **opts: Any) -> None:
    assert q.add(jid, "n", b"\xc0", opts or None, now)


def finish(q: QueueState, jid: str, ok: bool, now: int = NOW + 10) -> None:
    """Pull `jid` (the first in line) and ack or fail it."""
    out: list[list[Any]] = []
    q.pull(1, 1000, now, out)
    assert out[0][1] == jid
    tok = out[0][4]
    assert (q.ack(jid, tok, None, now) if ok else q.fail(jid, tok, "boom", now)) is None


def states_of(q: QueueState) -> dict[str, str]:
    return {j.id: j.state for j in q.jobs.values()}


# ---------------------------------------------------------------- getters
def test_get_jobs_lists_every_state_in_a_stable_paged_order() -> None:
    q, _ = make()
    add(q, "c1")
    add(q, "f1")
    finish(q, "c1", ok=True, now=NOW + 20)
    finish(q, "f1", ok=False, now=NOW + 30)
    for i in range(5):
        add(q, f"w{i}", now=NOW + i)
    add(q, "p1", priority=3)
    add(q, "d1", delay_ms=5000)
    add(q, "d2", delay_ms=1000)
    assert q.counts()["failed"] == 1
    [a] = pull_ids(q, 1)
    assert a == "w0"
    assert q.job_counts(["waiting", "prioritized", "delayed", "active", "completed",
                         "failed", "waiting-children"]) == {
        "waiting": 4, "prioritized": 1, "delayed": 2, "active": 1, "completed": 1,
        "failed": 1, "waiting-children": 0}
    page, total = q.list_jobs(["waiting"], 0, -1, asc=True)
    assert [j.id for _, j in page] == ["w1", "w2", "w3", "w4"] and total == 4
    page, _ = q.list_jobs(["waiting"], 1, 2, asc=False)  # newest first
    assert [j.id for _, j in page] == ["w3", "w2"]
    page, total = q.list_jobs(["delayed", "failed", "prioritized"], 0, -1, asc=True)
    assert [j.id for _, j in page] == ["d2", "d1", "f1", "p1"] and total == 4
    page, _ = q.list_jobs(["delayed", "failed"], 0, -1, asc=False)  # ranks stay in order
    assert [j.id for _, j in page] == ["d1", "d2", "f1"]
    assert q.list_jobs(["active"], 0, 0, True)[0][0][1].id == "w0"


def test_get_jobs_pages_at_most_max_page_jobs() -> None:
    q, _ = make()
    for i in range(MAX_PAGE + 5):
        add(q, f"j{i:05d}")
    page, total = q.list_jobs(["waiting"], 0, -1, asc=True)
    assert len(page) == MAX_PAGE and total == MAX_PAGE + 5
    page, _ = q.list_jobs(["waiting"], MAX_PAGE, -1, asc=True)
    assert [j.id for _, j in page] == [f"j{i:05d}" for i in range(MAX_PAGE, MAX_PAGE + 5)]


def reference_listing(q: QueueState, states: list[str], start: int, end: int,
                      asc: bool) -> tuple[list[str], int]:
    """GET_JOBS by its definition: every job keyed, all sorted, one page cut."""
    keyed = sorted(((sort_key(j, r), j.id) for r, st in enumerate(states)
                    for j in q.jobs_in(st)),
                   key=lambda k: k[0] if asc else (-k[0][0], k[0][1], k[0][2]),
                   reverse=not asc)
    total = len(keyed)
    stop = min(total if end < 0 else min(total, end + 1), start + MAX_PAGE)
    return [jid for _, jid in keyed[start:stop]], total


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "prio", "delay", "pull", "ack", "fail"]),
                          st.integers(0, 3)), max_size=40),
       st.lists(st.sampled_from(list(LIST_STATES)), min_size=1, max_size=4, unique=True),
       st.integers(0, 30), st.integers(-1, 40), st.booleans())
def test_list_jobs_pages_match_sorting_every_job_by_its_key(
        steps: list[tuple[str, int]], states: list[str], start: int, end: int,
        asc: bool) -> None:
    q, _ = make()
    for i, (step, t) in enumerate(steps):
        now = NOW + t  # equal times: ids break the ties
        if step in ("add", "prio", "delay"):
            opts = {"prio": {"priority": 2}, "delay": {"delay_ms": 100 * t}}.get(step, {})
            add(q, f"j{i:02d}", now=now, attempts=2, **opts)
        else:
            out: list[list[Any]] = []
            q.pull(1, 1000, now, out)
            if out and step != "pull":
                jid, tok = out[0][1], out[0][4]
                assert (q.ack(jid, tok, None, now) if step == "ack"
                        else q.fail(jid, tok, "boom", now)) is None
    page, total = q.list_jobs(states, start, end, asc)
    assert ([j.id for _, j in page], total) == reference_listing(q, states, start, end, asc)
    assert [k for k, _ in page] == [sort_key(j, states.index(
        "prioritized" if j.state == WAITING and j.priority else
        "waiting" if j.state == WAITING else j.state)) for _, j in page]


def test_unknown_state_is_a_bad_request() -> None:
    q, _ = make()
    with pytest.raises(BadRequestError):
        q.list_jobs(["paused-ish"], 0, -1, True)


# ---------------------------------------------------------------- single-job actions
def test_retry_job_puts_a_failed_job_back_with_attempts_reset() -> None:
    q, log = make()
    add(q, "a", attempts=1)
    finish(q, "a", ok=False)
    assert q.jobs["a"].dlq_reason is not None
    q.retry_job("a")
    job = q.jobs["a"]
    assert (job.state, job.attempts_made, job.dlq_reason, job.failed_reason) == (
        WAITING, 0, None, None)
    assert q.counts()["failed"] == 0 and q.counts()["waiting"] == 1
    assert pull_ids(q) == ["a"]
    assert export(replayed(log)) == export(q)


def test_retry_job_refuses_a_job_that_has_not_finished() -> None:
    q, _ = make()
    add(q, "a")
    with pytest.raises(JobStateError) as info:
        q.retry_job("a")
    assert info.value.state == WAITING
    with pytest.raises(NotFoundError):
        q.retry_job("nope")


def test_remove_job_takes_a_waiting_job_out_and_keeps_its_tombstone() -> None:
    q, log = make()
    add(q, "a")
    add(q, "b")
    q.remove_job("a", NOW)
    assert "a" not in q.jobs and "a" in q.tombstones
    assert q.counts()["waiting"] == 1
    assert not q.add("a", "n", b"\xc0", None, NOW)  # dedup still holds
    assert pull_ids(q) == ["b"]
    with pytest.raises(JobStateError):
        q.remove_job("b", NOW)  # active
    assert export(replayed(log)) == export(q)


def test_remove_job_of_finished_history_keeps_counts_right() -> None:
    q, log = make()
    add(q, "c")
    finish(q, "c", ok=True)
    q.remove_job("c", NOW)
    assert q.counts()["completed"] == 0 and q.job_counts(["completed"]) == {"completed": 0}
    assert export(replayed(log)) == export(q)


def test_removing_a_waiting_flow_child_reports_it_done_to_the_parent() -> None:
    q, log = make()
    assert q.add("kid", "n", b"\xc0", None, NOW, parent=["pq", "parent", "f1", NOW + 5000, False])
    q.flow_release("f1", NOW)
    assert q.jobs["kid"].state == WAITING
    q.remove_job("kid", NOW)
    assert q.outbox["kid"] == ["pq", "parent", "f1", "qa:kid", True, None, False]
    assert export(replayed(log)) == export(q)


def test_removing_a_pending_flow_child_is_refused() -> None:
    q, _ = make()
    assert q.add("kid", "n", b"\xc0", None, NOW, parent=["pq", "parent", "f1", NOW + 5000, False])
    with pytest.raises(JobStateError):
        q.remove_job("kid", NOW)


def test_promote_and_change_delay() -> None:
    q, log = make()
    add(q, "d", delay_ms=60_000)
    add(q, "w")
    q.promote_job("d")
    assert q.jobs["d"].state == WAITING and q.counts()["delayed"] == 0
    with pytest.raises(JobStateError):
        q.promote_job("d")
    q.change_job_delay("w", 5000, NOW)
    assert q.jobs["w"].state == DELAYED and q.jobs["w"].delay_until == NOW + 5000
    assert pull_ids(q) == ["d"]
    assert q.promote(NOW + 4999) == 0 and q.promote(NOW + 5000) == 1
    q.change_job_delay("w", 0, NOW)  # waiting: back of the line
    assert export(replayed(log)) == export(q)
    assert pull_ids(q, now=NOW + 5000) == ["w"]


def test_change_priority_reorders_the_waiting_line() -> None:
    q, log = make()
    for jid in "abc":
        add(q, jid, priority=5)
    q.change_job_priority("c", 1)
    q.change_job_priority("a", 9)
    assert q.job_counts(["prioritized"]) == {"prioritized": 3}
    assert export(replayed(log)) == export(q)
    assert pull_ids(q) == ["c", "b", "a"]
    q.change_job_priority("a", 0)  # active: kept for a retry
    assert q.jobs["a"].priority == 0 and q.jobs["a"].state == ACTIVE
    assert export(replayed(log)) == export(q)


def test_change_priority_of_a_grouped_job_keeps_group_counts() -> None:
    q, log = make()
    add(q, "g1", group="t1")
    add(q, "g2", group="t1")
    q.change_job_priority("g2", 0)
    assert q.counts()["waiting"] == 2
    assert sorted(pull_ids(q)) == ["g1", "g2"]
    assert q.counts()["waiting"] == 0
    assert export(replayed(log)) == export(q)


def test_update_data_and_discard() -> None:
    q, log = make()
    add(q, "a", attempts=5)
    q.update_job_data("a", b"\x01")
    out: list[list[Any]] = []
    q.pull(1, 1000, NOW, out)
    assert out[0][3] == b"\x01"
    q.discard_job("a")
    assert q.fail("a", out[0][4], "stop", NOW) is None
    assert q.jobs["a"].state == FAILED  # no retry left, though attempts was 5
    with pytest.raises(JobStateError):
        q.discard_job("a")
    assert export(replayed(log)) == export(q)


# ---------------------------------------------------------------- queue-wide actions
def test_retry_promote_and_clean_return_how_many_they_touched() -> None:
    q, log = make()
    for i in range(4):
        add(q, f"f{i}")
        finish(q, f"f{i}", ok=False, now=NOW + i)
    for i in range(3):
        add(q, f"d{i}", delay_ms=10_000 + i)
    assert q.retry_jobs(FAILED, 3) == 3
    assert q.counts()["failed"] == 1
    assert q.promote_jobs(2) == 2
    assert q.job_counts(["delayed"]) == {"delayed": 1}
    assert sorted(j.id for j in q.jobs_in(WAITING))[:2] == ["d0", "d1"]
    assert q.clean(0, 100, WAITING, NOW + 1) == 5
    assert q.counts()["waiting"] == 0
    assert q.clean(60_000, 100, FAILED, NOW + 10) == 0  # within the grace
    assert q.clean(0, 100, FAILED, NOW + 10) == 1
    with pytest.raises(BadRequestError):
        q.clean(0, 1, ACTIVE, NOW)
    with pytest.raises(BadRequestError):
        q.retry_jobs(WAITING, 1)
    assert export(replayed(log)) == export(q)


def test_retention_setting_trims_history_and_replays() -> None:
    q, log = make()
    for i in range(6):
        add(q, f"c{i}")
        finish(q, f"c{i}", ok=True, now=NOW + i)
    assert q.set_retention(2, None, NOW) == 4
    assert [j.id for j in q.jobs_in(COMPLETED)] == ["c4", "c5"]
    add(q, "c6")
    finish(q, "c6", ok=True)
    assert [j.id for j in q.jobs_in(COMPLETED)] == ["c5", "c6"]
    q.remove_job("c6", NOW + 20)  # a removed job no longer counts as kept
    add(q, "c7")
    finish(q, "c7", ok=True)
    assert q.set_retention(2, None, NOW) == 0  # c5 and c7: already 2
    assert [j.id for j in q.jobs_in(COMPLETED)] == ["c5", "c7"]
    back = replayed(log)
    assert back.keep_for(COMPLETED) == 2 and back.keep_for(FAILED) == 10_000
    assert export(back) == export(q)
    q.obliterate()
    assert q.keep_for(COMPLETED) == 10_000


# ---------------------------------------------------------------- handoff catch-up
def test_actions_replayed_onto_a_built_copy_index_like_the_source() -> None:
    """A handoff's target builds the queue from a snapshot, then re-indexes
    only the jobs each catch-up op touches: every action must leave the
    copy handing out the same jobs as the source."""
    q, log = make()
    add(q, "a")
    finish(q, "a", ok=False)
    for jid in "bcdef":
        add(q, jid, priority=2)
    add(q, "late", delay_ms=50_000)
    staging: Images = {}
    for ch in q.export_chunks():
        apply_chunk(staging, wire(ch))
    live = {"qa": build_queue("qa", staging["qa"], [], QueueDefaults())}
    del log[:]
    q.change_job_priority("f", 0)
    q.remove_job("c", NOW)
    q.retry_job("a")
    q.promote_job("late")
    q.change_job_delay("d", 90_000, NOW)
    apply_ops_live(staging, live, [wire(op) for op in log], lambda n, img: build_queue(
        n, img, [], QueueDefaults()))
    copy_q = live["qa"]
    copy_q.adopt_meta(staging["qa"].meta)
    assert copy_q.counts() == q.counts()
    assert pull_ids(copy_q) == pull_ids(q)
