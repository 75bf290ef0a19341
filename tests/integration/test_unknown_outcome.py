"""A request sent and never answered says its outcome is unknown (docs/design.md §4)."""

from __future__ import annotations

import os
import signal

import pytest

import shardq
from shardq.client.retry import RetryPolicy
from tests.aio import run, until

FAST = {"request_timeout": 1.0, "connect_timeout": 1.0, "ping_timeout": 0.5,
        "policy": RetryPolicy(unavailable_budget=2.0)}


def test_a_stopped_broker_makes_adds_fail_as_maybe_applied_and_a_retry_is_safe(
        start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1")

    async def main() -> None:
        async with await shardq.connect(b.addr, **FAST) as client:  # type: ignore[arg-type]
            q = client.queue("q")
            await q.add("n", {}, job_id="warm")
            os.kill(b.pid, signal.SIGSTOP)
            try:
                with pytest.raises(shardq.UnavailableError) as err:
                    await q.add("n", {}, job_id="j1")
                assert err.value.maybe_applied and "outcome unknown" in str(err.value)
            finally:
                os.kill(b.pid, signal.SIGCONT)
            # The documented answer: retry with the same id. Whether or not the
            # first copy was applied, there is one job j1.
            assert await q.add("n", {}, job_id="j1") == "j1"
            counts = await q.counts()
            assert counts["waiting"] == 2

    run(main())


def test_an_unreachable_broker_before_sending_is_not_maybe_applied(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1")

    async def main() -> None:
        async with await shardq.connect(b.addr, **FAST) as client:  # type: ignore[arg-type]
            q = client.queue("q")
            await q.add("n", {}, job_id="warm")
            b.kill()
            await until(lambda: not client._cluster.open_channels(), "the client seeing the close")
            with pytest.raises(shardq.UnavailableError) as err:
                await q.add("n", {}, job_id="j1")
            assert not err.value.maybe_applied

    run(main())
