"""The test harness itself: a stray task error is caught, not lost."""

from __future__ import annotations

import asyncio

from tests.aio import run


def test_an_unawaited_task_that_raises_reaches_the_loop_handler() -> None:
    policy = asyncio.get_event_loop_policy()
    errors = policy.errors  # type: ignore[attr-defined]

    async def boom() -> None:
        raise RuntimeError("stray")

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(boom())
        await asyncio.wait({task})  # it ran and died; nobody retrieves its error
        assert task.done()
        del task

    run(main())
    import gc

    gc.collect()
    assert any(isinstance(c.get("exception"), RuntimeError) for c in errors)
    errors.clear()  # seen: this test passes; any other would fail here
