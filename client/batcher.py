"""Coalescing of concurrent adds into bulk ADD frames (the add hot path).

Every `Queue.add` appends one wire item and one future to its queue's
pending batch. The first append in a loop iteration schedules one flush
with `call_soon`, so everything added in the same iteration, from any
number of tasks, leaves in one frame per queue (at most `max_items` items a
frame). Per job this costs two list appends and a future, no coroutine and
no task: the frame's sender task resolves the futures when the reply
comes.

The sender (`AddSender`) is injected: the client passes `Cluster.bulk` for
ADD, unit tests pass a fake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from shardq.errors import ConnectionClosedError

log = logging.getLogger("shardq.client")

DEFAULT_MAX_ITEMS = 5000

AddSender = Callable[[str, list[Any]], Awaitable[list[Any]]]
"""(queue, wire items) -> one outcome per item: the job id or an exception."""


class _Pending:
    __slots__ = ("futs", "items")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.futs: list[asyncio.Future[Any]] = []


class AddBatcher:
    """Pending adds per queue, flushed once per loop iteration."""

    def __init__(self, send: AddSender, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self._send = send
        self._max_items = max_items
        self._loop = asyncio.get_running_loop()
        self._pending: dict[str, _Pending] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.frames = 0

    def add(self, queue: str, item: Any) -> asyncio.Future[Any]:
        """Queue one wire item `[id, name, data, opts]`; the future gets its id."""
        fut = self._loop.create_future()
        if self._closed:
            fut.set_exception(ConnectionClosedError("client is closed"))
            return fut
        pending = self._pending.get(queue)
        if pending is None:
            pending = self._pending[queue] = _Pending()
        pending.items.append(item)
        pending.futs.append(fut)
        if len(pending.items) >= self._max_items:
            del self._pending[queue]
            self._start(queue, pending)
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        """Send every pending batch now."""
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for queue, batch in pending.items():
            self._start(queue, batch)

    def _start(self, queue: str, batch: _Pending) -> None:
        self.frames += 1
        task = self._loop.create_task(self._run(queue, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, queue: str, batch: _Pending) -> None:
        futs = batch.futs
        try:
            outcomes = await self._send(queue, batch.items)
        except asyncio.CancelledError:
            _fail_all(futs, ConnectionClosedError("client closed before the add was answered"))
            raise
        except Exception as exc:
            _fail_all(futs, exc)
            return
        for fut, outcome in zip(futs, outcomes, strict=True):
            if fut.done():
                continue  # the caller was cancelled; the job may exist anyway
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def max_items(self) -> int:
        return self._max_items

    async def aclose(self, grace: float = 0.0) -> None:
        """Fail what was not sent; give frames in flight `grace` seconds to be
        answered, then cancel them (their adds fail with ConnectionClosedError)."""
        self._closed = True
        pending, self._pending = self._pending, {}
        for batch in pending.values():
            _fail_all(batch.futs, ConnectionClosedError("client is closed"))
        if self._tasks and grace > 0:
            await asyncio.wait(list(self._tasks), timeout=grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _fail_all(futs: list[asyncio.Future[Any]], exc: BaseException) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_exception(exc)
