"""The opt-in loop-stall watchdog names the code that held the event loop."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from shardq.broker import watchdog


def a_blocking_callback() -> None:
    time.sleep(0.4)


def test_a_stalled_loop_is_reported_with_the_stack_that_held_it(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        stop = watchdog.start(asyncio.get_running_loop(), threshold_ms=100)
        await asyncio.sleep(0.1)  # a few healthy ticks: nothing reported
        assert not caplog.records
        a_blocking_callback()
        await asyncio.sleep(0.05)
        stop.set()

    with caplog.at_level(logging.WARNING, logger="shardq.broker.watchdog"):
        asyncio.run(main())
    stalls = [r.getMessage() for r in caplog.records]
    assert len(stalls) == 1
    assert "a_blocking_callback" in stalls[0]
