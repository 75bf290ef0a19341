"""Retry budgets, with a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from shardq.client.retry import Budget, RetryPolicy
from shardq.errors import BusyError, MovedError, TryAgainError, UnavailableError


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_moved_is_bounded_and_a_loop_back_asks_for_a_refresh() -> None:
    b = Budget(RetryPolicy(max_redirects=3))
    assert not b.moved(MovedError(1, "b2", "h:2", 2), sent_to="b1").refresh
    assert b.moved(MovedError(1, "b1", "h:1", 3), sent_to="b2").refresh  # back to b1
    b.moved(MovedError(1, "b2", "h:2", 4), sent_to="b1")
    with pytest.raises(MovedError):
        b.moved(MovedError(1, "b2", "h:2", 5), sent_to="b1")


def test_tryagain_waits_refreshes_after_one_second_and_gives_up_after_five() -> None:
    clock = Clock()
    b = Budget(RetryPolicy(), clock)
    d = b.tryagain(TryAgainError(retry_after_ms=20))
    assert d.delay == pytest.approx(0.02) and not d.refresh
    clock.t += 1.0
    assert b.tryagain(TryAgainError(retry_after_ms=20)).refresh
    clock.t += 1.0
    assert not b.tryagain(TryAgainError(retry_after_ms=20)).refresh  # only once
    clock.t += 3.0
    with pytest.raises(TryAgainError):
        b.tryagain(TryAgainError(retry_after_ms=20))


def test_busy_gives_up_after_its_budget() -> None:
    clock = Clock()
    b = Budget(RetryPolicy(busy_budget=2.0), clock)
    assert b.busy(BusyError(retry_after_ms=50)).delay == pytest.approx(0.05)
    clock.t += 2.0
    with pytest.raises(BusyError):
        b.busy(BusyError())


def test_unreachable_backs_off_exponentially_then_raises_unavailable() -> None:
    clock = Clock()
    policy = RetryPolicy(backoff_min=0.01, backoff_max=0.05)
    b = Budget(policy, clock)
    delays = [b.unreachable("b1", ConnectionRefusedError()).delay for _ in range(5)]
    assert delays == [0.01, 0.02, 0.04, 0.05, 0.05]
    clock.t += 5.0
    with pytest.raises(UnavailableError) as info:
        b.unreachable("b1", ConnectionRefusedError())
    assert info.value.broker == "b1"


def test_a_reply_resets_the_unreachable_budget() -> None:
    clock = Clock()
    b = Budget(RetryPolicy(), clock)
    b.unreachable("b1", OSError())
    clock.t += 4.0
    b.reached()
    clock.t += 4.0
    assert b.unreachable("b1", OSError()).delay > 0  # a fresh 5 s
