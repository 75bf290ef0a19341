"""A worker's pulls go through the client's one retry loop (client/retrying.py):
during a handoff they are answered TRYAGAIN (frozen slot), then MOVED
(released), and the worker follows to the new owner, charging both to one
budget with the same policy as any call."""

from __future__ import annotations

import asyncio
from typing import Any

import shardq
from shardq.client.retry import Budget, Decision, RetryPolicy
from shardq.router import slot_of
from tests.aio import run, running, until
from tests.conftest import queue_on
from tests.integration.rawwire import RawConn, add_args
from tests.integration.test_handoff_broker import pair, prepare_move  # noqa: F401  (fixture)


def test_a_worker_pull_follows_tryagain_then_moved_through_a_handoff(
        pair) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    b1, b2, t, term = pair
    q = queue_on(t, "b1", "wr")
    policy = RetryPolicy(max_redirects=3)

    async def main() -> None:
        # No pings: nothing but the worker's own pulls tells the client the map changed.
        async with await shardq.connect([b1.addr, b2.addr], policy=policy,
                                        ping_interval=0) as client:
            assert client.topology.route(q)[0] == "b1"
            retries = client._cluster.retries
            charged: list[tuple[str, str, Budget]] = []
            real_decide = retries.decide

            def decide(budget: Budget, exc: BaseException, sent_to: str) -> Decision:
                charged.append((type(exc).__name__, sent_to, budget))
                return real_decide(budget, exc, sent_to)

            retries.decide = decide  # type: ignore[method-assign]
            a, b = RawConn(b1.addr), RawConn(b2.addr)
            move = prepare_move(b1, b, [slot_of(q)], term)
            step = asyncio.to_thread
            await step(a.ok, "HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
            await step(a.ok, "HANDOFF_FREEZE", move)

            done: list[str] = []
            worker = client.worker(q, lambda job: done.append(job.id), wait_ms=200)
            async with running(worker):
                await until(lambda: any(k == "TryAgainError" and to == "b1"
                                        for k, to, _ in charged), "a pull answered TRYAGAIN")
                await step(a.ok, "HANDOFF_CATCHUP", move)
                await step(b.ok, "HANDOFF_ACTIVATE", {**move, "epoch": t.epoch + 1})
                await step(a.ok, "HANDOFF_RELEASE", {**move, "epoch": t.epoch + 1,
                                                     "owner": "b2", "addr": b2.addr})
                await step(b.ok, "ADD", add_args(q, "j1", "j2", "j3"))
                await until(lambda: sorted(done) == ["j1", "j2", "j3"], "the moved queue's jobs")
            for c in (a, b):
                c.close()

            moved = [budget for kind, to, budget in charged if kind == "MovedError" and to == "b1"]
            assert moved, f"no pull was answered MOVED: {charged}"
            budget = moved[0]
            # One budget for the whole pull: the TRYAGAINs and the MOVED, with
            # the client's policy (the one every call uses).
            assert budget.policy is client._cluster.policy is policy
            assert budget.tryagain_since is not None
            assert 1 <= budget.redirects <= policy.max_redirects
            assert client.topology.route(q)[0] == "b2"

    run(main())


def test_a_pull_past_its_redirect_budget_is_retried_not_fatal(
        pair) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    # max_redirects=0: the first MOVED spends the budget, as it would for a
    # call (which raises MovedError); the worker logs it, refreshes its map
    # and keeps pulling, from the new owner.
    b1, b2, t, term = pair
    q = queue_on(t, "b1", "wb")

    async def main() -> None:
        async with await shardq.connect([b1.addr, b2.addr], ping_interval=0,
                                        policy=RetryPolicy(max_redirects=0)) as client:
            a, b = RawConn(b1.addr), RawConn(b2.addr)
            move = prepare_move(b1, b, [slot_of(q)], term)
            step = asyncio.to_thread
            await step(a.ok, "HANDOFF_COPY", {**move, "target": "b2", "target_addr": b2.addr})
            await step(a.ok, "HANDOFF_FREEZE", move)
            await step(a.ok, "HANDOFF_CATCHUP", move)
            await step(b.ok, "HANDOFF_ACTIVATE", {**move, "epoch": t.epoch + 1})
            await step(a.ok, "HANDOFF_RELEASE", {**move, "epoch": t.epoch + 1,
                                                 "owner": "b2", "addr": b2.addr})
            await step(b.ok, "ADD", add_args(q, "k1"))
            assert client.topology.route(q)[0] == "b1"  # the client has not heard yet
            got: list[Any] = []
            worker = client.worker(q, lambda job: got.append(job.id), wait_ms=200)
            async with running(worker) as task:
                await until(lambda: got == ["k1"], "the job from the new owner")
                assert not task.done()
            for c in (a, b):
                c.close()

    run(main())
