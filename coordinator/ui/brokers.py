"""What the dashboard asks the brokers, through the Python client (docs/design.md §8).

The coordinator is never on the data path, and the dashboard does not make
it one: it reads paused flags, limits and jobs only for what is on screen,
with one shared client that routes each queue to its owner (partitions,
moves and MOVED included), and gives each page a deadline, so a broker that
is down makes its cells read "?" instead of stalling the page.

The client is made on first use from the brokers' addresses in the
coordinator's topology and the coordinator's token (the one brokers take in
HELLO, as the rebalancer's links do).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from shardq.errors import ShardqError

if TYPE_CHECKING:
    from shardq.client import Client

log = logging.getLogger("shardq.coordinator.ui")

T = TypeVar("T")

PAGE_DEADLINE_S = 2.0  # a background read of the table's extra cells gives up after this
FLAGS_WAIT_S = 0.1  # how long the queue table waits for that read before answering
DETAIL_DEADLINE_S = 6.0  # one queue or job: the client's own budgets (5 s) decide first
FLAGS_TTL_S = 3.0


class ReadFailed(ShardqError):
    """A broker read did not answer in time (or the owner is unavailable)."""


@dataclass(slots=True)
class QueueFlags:
    """What stats do not carry for one queue row: paused, rate limit, groups."""

    paused: bool | None = None
    rate: list[int] | None = None
    tenant: str | None = None
    groups: dict[str, Any] = field(default_factory=dict)
    known: bool = False  # False: the owner did not answer in time


@dataclass(slots=True)
class JobListing:
    """One page of a queue's jobs in a state."""

    jobs: list[dict[str, Any]]
    page: int
    pages: int
    count: int


class BrokerReader:
    """Reads and commands queues on their owners through one shared `Client`."""

    def __init__(self, addrs: Callable[[], list[str]], token: str | None) -> None:
        self._addrs = addrs
        self._token = token
        self._client: Client | None = None
        self._connecting: asyncio.Lock | None = None
        self._flags: dict[str, tuple[float, QueueFlags]] = {}
        self._refreshing: set[str] = set()
        self._forgotten: dict[str, float] = {}  # name -> when an action changed it
        self._tasks: set[asyncio.Future[None]] = set()

    async def client(self) -> Client:
        """The shared client, connected on first use."""
        if self._client is not None:
            return self._client
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is None:
                from shardq.client import connect  # the client only when the dashboard is used

                addrs = self._addrs()
                if not addrs:
                    raise ReadFailed("no broker has registered yet")
                self._client = await connect(addrs, token=self._token,
                                             client_name="shardq-dashboard")
        return self._client

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- queue table -------------------------------------------------------------

    async def queue_flags(self, names: list[str]) -> dict[str, QueueFlags]:
        """Paused, rate limit and groups of `names` as last read (unknown if never).

        Rows older than FLAGS_TTL_S are read again in one background task,
        which the page waits for FLAGS_WAIT_S at most: a slow or dead broker
        delays the queue table by that much, never more, and the next poll
        shows what came in meanwhile.
        """
        now = time.monotonic()
        stale = [n for n in names if n not in self._refreshing
                 and now - self._flags.get(n, (float("-inf"), None))[0] >= FLAGS_TTL_S]
        if stale:
            self._refreshing.update(stale)
            task = asyncio.ensure_future(self._refresh_flags(stale))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.wait([task], timeout=FLAGS_WAIT_S)
        return {n: self._flags[n][1] if n in self._flags else QueueFlags() for n in names}

    async def _refresh_flags(self, names: list[str]) -> None:
        started = time.monotonic()
        try:
            client = await self.client()
            tasks = {n: asyncio.ensure_future(self._read_flags(client, n)) for n in names}
            await asyncio.wait(tasks.values(), timeout=PAGE_DEADLINE_S)
            now = time.monotonic()
            for name, task in tasks.items():
                if task.done() and not task.cancelled() and task.exception() is None:
                    # A read that began before an action changed the queue is stale.
                    if self._forgotten.get(name, float("-inf")) < started:
                        self._flags[name] = (now, task.result())
                else:
                    task.cancel()
            if len(self._flags) > 10_000:  # only rows recently on screen are worth keeping
                self._flags = {k: v for k, v in self._flags.items()
                               if now - v[0] < FLAGS_TTL_S}
                self._forgotten = {k: t for k, t in self._forgotten.items()
                                   if now - t < PAGE_DEADLINE_S}
        except (ShardqError, OSError) as e:
            log.warning("dashboard: cannot read queue flags: %s", e)
        finally:
            self._refreshing.difference_update(names)

    async def _read_flags(self, client: Client, name: str) -> QueueFlags:
        q = client.queue(name)
        counts, limits = await asyncio.gather(q.counts(), q.get_limits())
        return QueueFlags(bool(counts.get("paused")), limits.get("rate"), limits.get("tenant"),
                          dict(limits.get("groups") or {}), True)

    def forget_flags(self, name: str) -> None:
        """Drop a cached row after an action changed it (and any read in flight)."""
        self._flags.pop(name, None)
        self._forgotten[name] = time.monotonic()

    # -- one queue, its jobs, one job -----------------------------------------------

    async def queue_detail(self, name: str) -> dict[str, Any]:
        """Counts (with paused), limits, groups, schedulers and DLQ size of one queue."""
        async def read() -> dict[str, Any]:
            client = await self.client()
            q = client.queue(name)
            counts, states, limits, schedulers = await asyncio.gather(
                q.counts(), q.get_job_counts(), q.get_limits(), q.list_schedulers())
            return {"counts": {**states, "paused": counts.get("paused", False)},
                    "limits": limits, "schedulers": schedulers,
                    "partitions": q.partitions(),
                    "owners": [client.topology.owner_of(p) for p in q.partitions()]}
        return await self._deadline(read(), f"queue {name}")

    async def jobs(self, name: str, state: str, page: int, size: int) -> JobListing:
        """One page of `name`'s jobs in `state`, newest first, over every partition
        (the client's `get_jobs` merges them in one order)."""
        async def read() -> JobListing:
            q = (await self.client()).queue(name)
            counts = await q.get_job_counts(state)
            count = int(counts.get(state, 0))
            pages = max(1, -(-count // size))
            page_no = min(page, pages)
            start = (page_no - 1) * size
            jobs = await q.get_jobs(state, start, start + size - 1)
            return JobListing(jobs, page_no, pages, count)
        return await self._deadline(read(), f"jobs of {name}")

    async def job(self, name: str, job_id: str) -> dict[str, Any] | None:
        """One job with its logs, or None if unknown."""
        async def read() -> dict[str, Any] | None:
            client = await self.client()
            q = client.queue(name)
            job = await q.get_job(job_id)
            if job is None:
                return None
            job["logs"] = await q.get_logs(job_id)
            return job
        return await self._deadline(read(), f"job {job_id} of {name}")

    async def _deadline(self, coro: Awaitable[T], what: str) -> T:
        try:
            async with asyncio.timeout(DETAIL_DEADLINE_S):
                return await coro
        except TimeoutError:
            raise ReadFailed(f"{what}: no answer from its broker in {DETAIL_DEADLINE_S:g} s"
                             ) from None
