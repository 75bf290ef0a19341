"""Rate limits and groups in QueueState (docs/design.md §11), on an injected clock.

The rate-limit contract: at most `max` starts in ANY window of `per_ms` ms,
and never fewer than that allows (each pull takes everything the window
still has room for).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardq.broker.limits import TenantShare, Window, note_runs
from shardq.broker.queue import QueueDefaults, QueueState
from tests.props import examples

from .test_replay import assert_replay_matches

PROPS = settings(
    max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fresh(**defaults: Any) -> tuple[QueueState, list[Any]]:
    log: list[Any] = []
    return QueueState("qa", 11, log, QueueDefaults(**defaults)), log


def pull(q: QueueState, n: int, now: int, lock_ms: int = 10**9) -> list[list[Any]]:
    out: list[list[Any]] = []
    q.pull(n, lock_ms, now, out)
    return out


def add_many(q: QueueState, n: int, prefix: str = "j", now: int = 0, **opts: Any) -> None:
    for i in range(n):
        q.add(f"{prefix}{i}", "n", b"", opts or None, now)


def max_in_any_window(starts: list[int], per_ms: int) -> int:
    """The most starts inside any window [a, a + per_ms) (it suffices to try
    windows that begin at a start)."""
    starts = sorted(starts)
    best = j = 0
    for i, s in enumerate(starts):
        while j < len(starts) and starts[j] < s + per_ms:
            j += 1
        best = max(best, j - i)
    return best


# ------------------------------------------------------------------ windows
def test_a_window_counts_only_starts_inside_it() -> None:
    w = Window()
    w.note(100, 3, 1000)
    w.note(600, 2, 1000)
    assert w.used(600, 1000) == 5
    assert w.used(1099, 1000) == 5
    assert w.used(1100, 1000) == 2  # the run at 100 left (window is (now-per, now])
    assert w.free_at(700, 1000, 5) == 1100
    assert w.free_at(700, 1000, 3) == 1100  # 5 - 3 = 2 < 3 once the run at 100 left
    assert w.free_at(700, 1000, 6) == 700


def test_note_merges_runs_per_ms_and_drops_old_ones() -> None:
    runs: list[list[int]] = []
    note_runs(runs, 5, 1, 10)
    note_runs(runs, 5, 2, 10)
    assert runs == [[5, 3]]
    assert note_runs(runs, 15, 1, 10) == 3
    assert runs == [[15, 1]]


# ------------------------------------------------------------------ queue rate limit
@PROPS
@given(limit=st.integers(1, 7), per_ms=st.integers(1, 60),
       pulls=st.lists(st.tuples(st.integers(0, 25), st.integers(1, 9)), min_size=1, max_size=80))
def test_a_rate_limit_holds_exactly_in_every_window(
        limit: int, per_ms: int, pulls: list[tuple[int, int]]) -> None:
    q, _ = fresh()
    add_many(q, 300)
    q.set_rate_limit([limit, per_ms])
    starts: list[int] = []
    now = 1000
    for dt, count in pulls:
        now += dt
        room = limit - sum(1 for s in starts if s > now - per_ms)
        got = pull(q, count, now)
        # Not fewer than possible: everything the window still had room for.
        assert len(got) == max(0, min(count, room, q.n_waiting + len(got)))
        starts += [now] * len(got)
        if not got and q.n_waiting:
            assert q.blocked_until > now  # a timer will wake parked pulls
    assert max_in_any_window(starts, per_ms) <= limit


def test_a_blocked_pull_knows_when_budget_frees() -> None:
    q, _ = fresh()
    add_many(q, 10)
    q.set_rate_limit([3, 1000])
    assert len(pull(q, 2, 0)) == 2
    assert len(pull(q, 5, 400)) == 1
    assert pull(q, 5, 500) == []
    assert q.blocked_until == 1000 and q.next_timer() == 1000
    assert not q.wake_due(999)
    assert q.wake_due(1000) and q.blocked_until == 0
    assert len(pull(q, 5, 1000)) == 2  # the two started at 0 left the window
    assert pull(q, 5, 1001) == []
    assert q.blocked_until == 1400


def test_clearing_a_rate_limit_frees_the_queue_at_once() -> None:
    q, _ = fresh()
    add_many(q, 10)
    q.set_rate_limit([1, 1000])
    assert len(pull(q, 5, 0)) == 1
    assert pull(q, 5, 1) == []
    q.set_rate_limit(None)
    assert len(pull(q, 5, 2)) == 5
    assert q.limits() == {"rate": None, "tenant": None, "groups": {}}


def test_an_unlimited_queue_logs_no_window_ops() -> None:
    q, log = fresh()
    add_many(q, 5)
    pull(q, 5, 0)
    assert {op[0] for op in log} == {"A", "L"}


# ------------------------------------------------------------------ groups
def test_a_small_group_is_not_starved_by_a_big_one() -> None:
    q, _ = fresh()
    add_many(q, 2000, "big", group="tenant-big")
    add_many(q, 10, "small", group="tenant-small")
    order = [pull(q, 1, 1)[0][1] for _ in range(20)]
    assert sum(1 for jid in order if jid.startswith("small")) == 10
    assert order[:4] == ["big0", "small0", "big1", "small1"]


def test_big_pulls_interleave_groups_one_job_per_turn() -> None:
    q, _ = fresh()
    add_many(q, 5, "a", group="a")
    add_many(q, 2, "b", group="b")
    add_many(q, 3, "u")  # ungrouped jobs take turns like one more group
    got = [row[1] for row in pull(q, 100, 1)]
    assert got == ["a0", "b0", "u0", "a1", "b1", "u1", "a2", "u2", "a3", "a4"]
    assert q.n_waiting == 0 and q.counts()["active"] == 10


def test_priority_orders_jobs_within_a_group_not_across_groups() -> None:
    q, _ = fresh()
    q.add("a-low", "n", b"", {"group": "a", "priority": 5}, 0)
    q.add("a-high", "n", b"", {"group": "a", "priority": 0}, 0)
    q.add("b-low", "n", b"", {"group": "b", "priority": 9}, 0)
    got = [row[1] for row in pull(q, 3, 1)]
    assert got == ["a-high", "b-low", "a-low"]


def test_group_concurrency_counts_active_jobs_and_frees_on_ack() -> None:
    q, _ = fresh()
    add_many(q, 6, "a", group="a")
    add_many(q, 2, "b", group="b")
    q.set_group("a", {"concurrency": 2})
    got = pull(q, 10, 1)
    assert sorted(row[1] for row in got) == ["a0", "a1", "b0", "b1"]
    assert pull(q, 10, 2) == []
    assert q.limits()["groups"]["a"] == {"concurrency": 2, "active": 2, "waiting": 4}
    a0 = next(row for row in got if row[1] == "a0")
    assert q.ack("a0", a0[4], None, 3) is None
    assert q.wake  # the broker serves parked pulls
    assert [row[1] for row in pull(q, 10, 4)] == ["a2"]
    b0 = next(row for row in got if row[1] == "b0")
    q.wake = False
    q.fail("b0", b0[4], "x", 5)  # a group without concurrency does not wake anyone
    assert not q.wake


def test_a_stalled_or_failed_job_frees_its_group_slot() -> None:
    q, _ = fresh(max_stalled_count=5)
    add_many(q, 3, "a", group="a", attempts=3)
    q.set_group("a", {"concurrency": 1})
    row = pull(q, 5, 0, lock_ms=10)[0]
    q.expire_locks(10)  # stalled: back to waiting, slot free
    assert [r[1] for r in pull(q, 5, 11, lock_ms=10)] == ["a1"]
    row = next(r for r in [[None, "a1", None, None, q.jobs["a1"].token]])
    q.fail("a1", row[4], "boom", 12)
    assert len(pull(q, 5, 13)) == 1


def test_a_paused_group_is_passed_over_until_resumed() -> None:
    q, _ = fresh()
    add_many(q, 3, "a", group="a")
    add_many(q, 3, "b", group="b")
    q.set_group("a", {"paused": True})
    assert [row[1] for row in pull(q, 10, 1)] == ["b0", "b1", "b2"]
    assert pull(q, 10, 2) == []
    assert q.set_group("a", {"paused": False}) is None  # no settings left
    assert [row[1] for row in pull(q, 10, 3)] == ["a0", "a1", "a2"]


def test_a_group_rate_limit_holds_per_group() -> None:
    q, _ = fresh()
    add_many(q, 20, "a", group="a")
    add_many(q, 20, "b", group="b")
    q.set_group("a", {"rate": [2, 100]})
    starts_a = []
    for now in range(0, 500, 7):
        for row in pull(q, 3, now):
            if row[1].startswith("a"):
                starts_a.append(now)
    assert max_in_any_window(starts_a, 100) == 2
    assert len(starts_a) >= 9  # 2 per 100 ms over ~500 ms


def test_queue_rate_limit_applies_across_groups() -> None:
    q, _ = fresh()
    add_many(q, 10, "a", group="a")
    add_many(q, 10, "b", group="b")
    q.set_rate_limit([4, 1000])
    assert [row[1] for row in pull(q, 10, 0)] == ["a0", "b0", "a1", "b1"]
    assert pull(q, 10, 999) == []


def test_group_jobs_count_as_waiting_and_survive_drain_and_obliterate() -> None:
    q, _ = fresh()
    add_many(q, 3, "a", group="a")
    add_many(q, 2, "u")
    q.set_group("a", {"concurrency": 1})
    q.set_rate_limit([5, 10])
    assert q.counts()["waiting"] == 5
    pull(q, 1, 0)
    assert q.drain(False, 1) == 4
    assert q.counts()["waiting"] == 0 and q.limits()["groups"]["a"]["active"] == 1
    q.obliterate()
    assert q.limits() == {"rate": None, "tenant": None, "groups": {}}
    add_many(q, 2, "x", group="a")
    assert len(pull(q, 5, 2)) == 2


def test_a_delayed_group_job_joins_its_group_when_due() -> None:
    q, _ = fresh()
    q.add("d", "n", b"", {"group": "a", "delay_ms": 50}, 0)
    assert pull(q, 5, 10) == []
    q.promote(60)
    assert [row[1] for row in pull(q, 5, 60)] == ["d"]


# ------------------------------------------------------------------ tenant share
def test_a_tenant_queue_without_a_lease_starts_nothing() -> None:
    q, _ = fresh()
    add_many(q, 5)
    q.set_tenant("t7")
    assert pull(q, 5, 0) == []
    q.defaults.tenants["t7"] = TenantShare(max=2, per_ms=100, until=1000, fallback=1)
    assert len(pull(q, 5, 0)) == 2
    assert pull(q, 5, 50) == []
    assert len(pull(q, 5, 100)) == 2
    assert len(pull(q, 5, 1200)) == 1  # lease expired: the conservative share


def test_queues_of_a_tenant_share_one_lease_on_a_broker() -> None:
    defaults = QueueDefaults()
    defaults.tenants["t"] = TenantShare(max=3, per_ms=100, until=10**9, fallback=1)
    qa = QueueState("qa", 1, [], defaults)
    qb = QueueState("qb", 2, [], defaults)
    for q in (qa, qb):
        add_many(q, 5)
        q.set_tenant("t")
    assert len(pull(qa, 2, 0)) == 2
    assert len(pull(qb, 5, 0)) == 1
    assert pull(qa, 5, 50) == []


# ------------------------------------------------------------------ replay
@pytest.mark.parametrize("scenario", ["rate", "groups", "tenant", "clear"])
def test_replay_rebuilds_limits_groups_and_windows(scenario: str) -> None:
    q, log = fresh()
    add_many(q, 6, "a", group="a")
    add_many(q, 3, "u")
    q.set_group("a", {"concurrency": 3, "rate": [2, 50]})
    if scenario == "rate":
        q.set_rate_limit([4, 100])
    if scenario == "tenant":
        q.defaults.tenants["t"] = TenantShare(max=3, per_ms=40, until=10**9)
        q.set_tenant("t")
    pull(q, 5, 10)
    pull(q, 5, 30)
    if scenario == "clear":
        q.set_group("a", {"rate": None, "concurrency": None, "paused": True})
        q.set_rate_limit(None)
    assert_replay_matches(q, log)
