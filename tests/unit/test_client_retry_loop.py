"""The client's one retry loop (client/retrying.py): its decisions, with a fake
clock and an in-memory topology (no sockets, no sleeping for the budgets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shardq.client.retry import RetryPolicy
from shardq.client.retrying import RetryLoop
from shardq.client.topology import TopologyManager
from shardq.errors import (
    AuthError,
    BusyError,
    ConnectionClosedError,
    MovedError,
    TryAgainError,
    UnavailableError,
)
from shardq.router import Topology, slot_of
from tests.aio import run


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


Q = "orders"
SLOT = slot_of(Q)


def three_brokers(epoch: int = 5) -> Topology:
    return Topology.from_dict({
        "epoch": epoch,
        "brokers": {"b1": {"addr": "h:1"}, "b2": {"addr": "h:2"}, "b3": {"addr": "h:3"}},
        "slots": [[0, 4095, "b1", epoch]],
    })


def make_loop(policy: RetryPolicy | None = None, epoch: int = 5,
              ) -> tuple[RetryLoop, TopologyManager, Clock]:
    clock = Clock()
    tm = TopologyManager(three_brokers(epoch), min_interval=0)
    return RetryLoop(tm, policy or RetryPolicy(), clock), tm, clock


def moved(owner: str, epoch: int) -> MovedError:
    return MovedError(SLOT, owner, f"h:{owner[1:]}", epoch)


def test_moved_patches_the_slot_and_is_bounded_per_request() -> None:
    loop, tm, _ = make_loop(RetryPolicy(max_redirects=2))
    budget = loop.budget()
    d = loop.decide(budget, moved("b2", 5), sent_to="b1")
    assert (d.delay, d.refresh) == (0.0, False)
    assert tm.route(Q) == ("b2", "h:2")
    loop.decide(budget, moved("b3", 5), sent_to="b2")
    assert tm.route(Q) == ("b3", "h:3")
    with pytest.raises(MovedError):
        loop.decide(budget, moved("b2", 5), sent_to="b3")
    assert loop.decide(loop.budget(), moved("b1", 5), sent_to="b3").delay == 0.0  # a new request


def test_a_redirect_back_to_a_broker_already_tried_refreshes_the_map() -> None:
    loop, _, _ = make_loop()
    budget = loop.budget()
    assert not loop.decide(budget, moved("b2", 5), sent_to="b1").refresh
    assert loop.decide(budget, moved("b1", 5), sent_to="b2").refresh  # back to b1


def test_a_stale_moved_waits_and_resends_without_patching_or_spending_redirects() -> None:
    # Our map learned (epoch 7) that b2 owns the slot; b2 has not, and names
    # b1 by the old epoch 5: resending to b1 would bounce back.
    loop, tm, clock = make_loop(RetryPolicy(max_redirects=1, tryagain_budget=2.0))
    tm.patch(moved("b2", 7))
    budget = loop.budget()
    d = loop.decide(budget, moved("b1", 5), sent_to="b2")
    assert d.delay > 0 and budget.redirects == 0
    assert tm.route(Q) == ("b2", "h:2")
    clock.t += 2.0
    with pytest.raises(TryAgainError):  # within the TRYAGAIN budget only
        loop.decide(budget, moved("b1", 5), sent_to="b2")


def test_tryagain_refreshes_once_after_a_second_and_raises_past_its_budget() -> None:
    loop, _, clock = make_loop()
    budget = loop.budget()
    first = loop.decide(budget, TryAgainError(retry_after_ms=20), "b1")
    assert first.delay == pytest.approx(0.02) and not first.refresh
    clock.t += 1.0
    assert loop.decide(budget, TryAgainError(retry_after_ms=20), "b1").refresh
    clock.t += 1.0
    assert not loop.decide(budget, TryAgainError(retry_after_ms=20), "b1").refresh
    clock.t += 3.0
    with pytest.raises(TryAgainError):
        loop.decide(budget, TryAgainError(retry_after_ms=20), "b1")


def test_busy_waits_its_retry_after_and_raises_past_its_budget() -> None:
    loop, _, clock = make_loop(RetryPolicy(busy_budget=1.0))
    budget = loop.budget()
    assert loop.decide(budget, BusyError(retry_after_ms=50), "b1").delay == pytest.approx(0.05)
    clock.t += 1.0
    with pytest.raises(BusyError):
        loop.decide(budget, BusyError(retry_after_ms=50), "b1")


def test_tryagain_and_moved_share_one_budget() -> None:
    loop, _, clock = make_loop(RetryPolicy(tryagain_budget=1.0))
    budget = loop.budget()
    loop.decide(budget, TryAgainError(retry_after_ms=5), "b1")
    loop.decide(budget, moved("b2", 5), sent_to="b1")
    clock.t += 1.0
    with pytest.raises(TryAgainError):  # the TRYAGAIN clock kept running across the MOVED
        loop.decide(budget, TryAgainError(retry_after_ms=5), "b2")
    assert budget.redirects == 1


def test_an_unreachable_owner_refreshes_backs_off_and_raises_unavailable() -> None:
    loop, _, clock = make_loop(RetryPolicy(backoff_min=0.01, unavailable_budget=1.0))
    budget = loop.budget()
    d = loop.decide(budget, ConnectionRefusedError(), "b1")
    assert d.refresh and d.delay == pytest.approx(0.01)
    clock.t += 1.0
    with pytest.raises(UnavailableError) as info:
        loop.decide(budget, ConnectionClosedError("lost", maybe_applied=True), "b1")
    assert info.value.broker == "b1" and info.value.maybe_applied


def test_an_answer_that_is_not_retryable_is_raised_as_is() -> None:
    loop, _, _ = make_loop()
    err = AuthError("no")
    with pytest.raises(AuthError) as info:
        loop.decide(loop.budget(), err, "b1")
    assert info.value is err


def test_a_moved_newer_than_the_whole_map_refreshes_it_in_the_background() -> None:
    async def main() -> None:
        loop, tm, _ = make_loop(epoch=5)
        newer = three_brokers(epoch=9)

        async def source() -> Topology:
            return newer

        tm.sources = [source]
        loop.decide(loop.budget(), moved("b2", 5), sent_to="b1")  # same epoch: no fetch
        await asyncio.sleep(0)
        assert tm.refreshes == 0
        loop.decide(loop.budget(), moved("b2", 8), sent_to="b1")
        seen = tm.version
        await asyncio.wait_for(tm.wait_changed(seen), 5)
        assert tm.refreshes == 1 and tm.epoch == 9

    run(main())


def test_a_reply_carrying_an_older_or_equal_epoch_fetches_nothing() -> None:
    async def main() -> None:
        loop, tm, _ = make_loop(epoch=5)
        loop.saw_epoch(4)
        loop.saw_epoch(5)
        await asyncio.sleep(0)
        assert tm.refreshes == 0
        loop.saw_epoch(6)
        await asyncio.sleep(0)
        assert tm.refreshes == 1

    run(main())


def test_run_resends_to_wherever_the_map_says_until_an_answer() -> None:
    async def main() -> None:
        loop, _, _ = make_loop(RetryPolicy(backoff_min=0.001, backoff_max=0.002))
        sent: list[str] = []

        async def send(bid: str, addr: str) -> Any:
            sent.append(bid)
            if bid == "b1":
                raise moved("b2", 5)
            if len(sent) == 2:
                raise TryAgainError(retry_after_ms=1)
            return f"from {bid}@{addr}"

        out = await loop.run(lambda: loop.topology.route(Q), send, what="queue")
        assert out == "from b2@h:2" and sent == ["b1", "b2", "b2"]

    run(main())


def test_run_raises_link_errors_at_once_once_closed() -> None:
    async def main() -> None:
        loop, _, _ = make_loop()
        calls = [0]

        async def send(bid: str, addr: str) -> Any:
            calls[0] += 1
            raise ConnectionClosedError("lane is closed")

        with pytest.raises(ConnectionClosedError):
            await loop.run(lambda: ("b1", "h:1"), send, what="broker b1", closed=lambda: True)
        assert calls[0] == 1

    run(main())


def test_run_with_no_owner_known_waits_for_the_map_then_sends() -> None:
    async def main() -> None:
        loop, tm, _ = make_loop(RetryPolicy(backoff_min=0.001))
        tm.topo = Topology.empty()

        async def source() -> Topology:
            return three_brokers(epoch=6)

        tm.sources = [source]

        async def send(bid: str, addr: str) -> str:
            return bid

        assert await loop.run(lambda: tm.route(Q), send, what="queue") == "b1"

    run(main())
