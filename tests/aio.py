"""Asyncio helpers shared by the tests: every wait is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import shardq


def run(coro: Awaitable[Any], timeout: float = 90.0) -> Any:
    """`asyncio.run(coro)`, failing with TimeoutError after `timeout` seconds."""
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


@asynccontextmanager
async def running(worker: shardq.Worker) -> AsyncIterator[asyncio.Task[None]]:
    """Run a worker for the block; close it (finishing in-flight jobs) after."""
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        await worker.close()
        await task


async def until(cond: Callable[[], Awaitable[bool] | bool], what: str = "the condition",
                timeout: float = 20.0, every: float = 0.02) -> None:
    """Poll `cond` (sync or async) until it is true; fail after `timeout` s."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                res = cond()
                if not isinstance(res, bool):
                    res = await res
                if res:
                    return
                await asyncio.sleep(every)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
