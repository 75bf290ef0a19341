"""AddBatcher: concurrent adds coalesce into one frame per queue per loop turn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shardq.client.batcher import AddBatcher
from shardq.errors import BadRequestError, ConnectionClosedError
from tests.aio import run


class FakeSender:
    """Records frames; answers each item with its id (or a scripted outcome)."""

    def __init__(self, outcome: Any = None, delay: float = 0.0) -> None:
        self.frames: list[tuple[str, list[Any]]] = []
        self.outcome = outcome
        self.delay = delay

    async def __call__(self, queue: str, items: list[Any]) -> list[Any]:
        self.frames.append((queue, items))
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        if callable(self.outcome):
            return [self.outcome(item) for item in items]
        return [item[0] for item in items]



def test_adds_from_many_tasks_in_one_turn_share_one_frame() -> None:
    async def main() -> None:
        send = FakeSender()
        batcher = AddBatcher(send)

        async def one(i: int) -> str:
            return await batcher.add("q", [f"id{i}", "n", b"\x90", None])

        ids = await asyncio.gather(*(one(i) for i in range(200)))
        assert ids == [f"id{i}" for i in range(200)]
        assert len(send.frames) == 1
        assert len(send.frames[0][1]) == 200
        assert batcher.frames == 1

    run(main())


def test_each_queue_gets_its_own_frame() -> None:
    async def main() -> None:
        send = FakeSender()
        batcher = AddBatcher(send)
        futs = [batcher.add(f"q{i % 3}", [f"id{i}", "n", b"", None]) for i in range(30)]
        await asyncio.gather(*futs)
        assert sorted(q for q, _ in send.frames) == ["q0", "q1", "q2"]
        assert all(len(items) == 10 for _, items in send.frames)

    run(main())


def test_a_full_batch_is_sent_at_once_and_the_rest_next_turn() -> None:
    async def main() -> None:
        send = FakeSender()
        batcher = AddBatcher(send, max_items=100)
        futs = [batcher.add("q", [f"id{i}", "n", b"", None]) for i in range(250)]
        assert await asyncio.gather(*futs) == [f"id{i}" for i in range(250)]
        assert [len(items) for _, items in send.frames] == [100, 100, 50]

    run(main())


def test_adds_in_later_turns_go_in_later_frames() -> None:
    async def main() -> None:
        send = FakeSender()
        batcher = AddBatcher(send)
        await batcher.add("q", ["a", "n", b"", None])
        await batcher.add("q", ["b", "n", b"", None])
        assert len(send.frames) == 2

    run(main())


def test_item_errors_reach_only_their_own_add() -> None:
    async def main() -> None:
        def outcome(item: list[Any]) -> Any:
            return BadRequestError("bad") if item[0] == "bad" else item[0]

        batcher = AddBatcher(FakeSender(outcome))
        good = batcher.add("q", ["good", "n", b"", None])
        bad = batcher.add("q", ["bad", "n", b"", None])
        assert await good == "good"
        with pytest.raises(BadRequestError):
            await bad

    run(main())


def test_a_failed_frame_fails_every_add_in_it() -> None:
    async def main() -> None:
        batcher = AddBatcher(FakeSender(ConnectionClosedError("gone")))
        futs = [batcher.add("q", [f"id{i}", "n", b"", None]) for i in range(5)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, ConnectionClosedError) for r in results)

    run(main())


def test_a_cancelled_add_does_not_disturb_the_others() -> None:
    async def main() -> None:
        batcher = AddBatcher(FakeSender(delay=0.01))
        a = batcher.add("q", ["a", "n", b"", None])
        b = batcher.add("q", ["b", "n", b"", None])
        a.cancel()
        assert await b == "b"

    run(main())


def test_aclose_fails_unsent_adds_and_refuses_new_ones() -> None:
    async def main() -> None:
        batcher = AddBatcher(FakeSender(delay=5))
        inflight = batcher.add("q", ["a", "n", b"", None])
        await asyncio.sleep(0)  # the frame is now in flight
        await batcher.aclose(grace=0.01)
        with pytest.raises(ConnectionClosedError):
            await inflight
        with pytest.raises(ConnectionClosedError):
            await batcher.add("q", ["b", "n", b"", None])

    run(main())
