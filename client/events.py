"""`client.events(queue)`: a live stream of a queue's job events.

    sub = await client.events("emails")     # returns once the subscription is live
    async for event in sub:                 # Event(type, queue, job_id, data, seq, partition)
        ...
    await sub.aclose()

One follower task per stored queue (`name~i` for a partitioned queue)
sends SUBSCRIBE to the queue's owner on a connection of the subscription's
own, and then reads the frames the broker pushes (shardq.protocol
SUBSCRIBE). When the queue moves (a `moved` push, a MOVED answer) or the
link breaks, it subscribes again at the owner with `after_seq` = the last
seq it saw: the owner's ring holds the events since then, handoffs
included, so nothing is missed within the ring (broker/events.py).
Delivery is at-least-once from the broker; repeats are dropped here by seq,
so each event is yielded once. `gaps` counts resumptions for which the
owner said events may be missing (its ring overflowed, or it restarted);
`resumes` counts every subscription made again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import msgpack

from shardq import protocol
from shardq.errors import MovedError, ShardqError

from .connection import Connection
from .retrying import LINK_ERRORS

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("shardq.events")

EVENT_TYPES = ("added", "active", "progress", "completed", "failed", "stalled")


@dataclass(frozen=True, slots=True)
class Event:
    """One job event.

    Attributes:
        type: added, active, progress, completed, failed or stalled.
        queue: the queue name subscribed to; `partition` the stored queue.
        job_id: the job's id.
        data: added {"name"}; active {"attempts_started"}; progress the value;
            completed the result (None when over 1 KiB: read it with get_job);
            failed {"reason", "final"} (final False: it will be retried); stalled None.
        seq: the stored queue's op sequence number (ascending per partition).
    """

    type: str
    queue: str
    job_id: str
    data: Any
    seq: int
    partition: str


_END: Any = object()


class Subscription:
    """An async iterator of `Event`s. Create with `await client.events(queue)`."""

    def __init__(self, client: Client, queue: str) -> None:
        self.queue = queue
        self.gaps = 0
        self.resumes = 0  # subscriptions made again after a move or a lost link
        self._client = client
        self._cluster = client._cluster
        self._topology = client._topology
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._lane = f"events-{id(self):x}"
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        parts = self._client.queue(self.queue).partitions()
        ready = [loop.create_future() for _ in parts]
        self._tasks = [loop.create_task(self._follow(p, r)) for p, r in zip(parts, ready,
                                                                             strict=True)]
        try:
            await asyncio.gather(*ready)
        except BaseException:
            await self.aclose()
            raise

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        if self._closed and self._events.empty():
            raise StopAsyncIteration
        item = await self._events.get()
        if item is _END:
            self._events.put_nowait(_END)  # for any other reader
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        event: Event = item
        return event

    async def aclose(self) -> None:
        """Stop following; iteration ends after the events already received. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._cluster.close_lane(self._lane)
        self._events.put_nowait(_END)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- following one stored queue ------------------------------------------------

    async def _follow(self, stored: str, ready: asyncio.Future[None]) -> None:
        try:
            await self._follow_loop(stored, ready)
        except Exception as exc:  # a bug or an odd answer: the reader sees it
            if not ready.done():
                ready.set_exception(exc)
            else:
                self._events.put_nowait(exc)

    async def _follow_loop(self, stored: str, ready: asyncio.Future[None]) -> None:
        last: int | None = None
        while not self._closed:
            try:
                reply, pushes = await self._cluster.retries.run(
                    lambda: self._topology.route(stored),
                    functools.partial(self._subscribe, stored, last),
                    what=f"queue {stored!r}", closed=lambda: self._closed)
            except LINK_ERRORS:
                if self._closed:
                    return
                raise
            except ShardqError as exc:  # a budget ran out
                if not ready.done():
                    ready.set_exception(exc)
                    return
                # Live already: a subscription outlives outages; keep trying.
                log.warning("events of %s: %s; still trying", stored, exc)
                await self._topology.refresh()
                await asyncio.sleep(0.5)
                continue
            if ready.done():
                self.resumes += 1
            if reply.get("gap") and last is not None:
                self.gaps += 1
                log.warning("events of %s after seq %d may be missing", stored, last)
            last = self._deliver(stored, reply.get("events") or (), last)
            last = max(last or 0, int(reply.get("seq", 0)))
            if not ready.done():
                ready.set_result(None)
            while True:
                body = await pushes.get()
                if body is None:
                    break  # the link went: resume at the owner
                moved = body.get("moved")
                if moved is not None:
                    self._cluster.retries.follow(MovedError(
                        moved["slot"], moved["owner"], moved["addr"], moved["epoch"]))
                    break
                last = self._deliver(stored, body.get("events") or (), last)

    async def _subscribe(self, stored: str, last: int | None, bid: str, addr: str,
                         ) -> tuple[dict[str, Any], asyncio.Queue[Any]]:
        """One SUBSCRIBE on the subscription's lane; the pushes go to a queue
        of this attempt's own (a failed attempt's link-lost marker must not
        end the next one)."""
        pushes: asyncio.Queue[Any] = asyncio.Queue()
        conn = cast(Connection, await self._cluster.connection(bid, addr, self._lane))
        reply: dict[str, Any] = await conn.subscribe(
            protocol.SUBSCRIBE, {"queue": stored, "after_seq": last}, pushes.put_nowait)
        return reply, pushes

    def _deliver(self, stored: str, events: Any, last: int | None) -> int | None:
        for seq, kind, job_id, data in events:
            if last is not None and seq <= last:
                continue  # a repeat after a resume
            last = seq
            if kind == "completed" and isinstance(data, bytes):
                data = msgpack.unpackb(data, raw=False)
            self._events.put_nowait(Event(kind, self.queue, job_id, data, seq, stored))
        return last
