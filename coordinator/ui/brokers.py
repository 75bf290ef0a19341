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

PAGE_DEADLINE_S = 1.5  # the table's extra cells; the rest of the page does not wait longer
DETAIL_DEADLINE_S = 6.0  # one queue or job: the client's own budgets (5 s) decide first
FLAGS_TTL_S = 2.0


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
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- queue table -------------------------------------------------------------

    async def queue_flags(self, names: list[str]) -> dict[str, QueueFlags]:
        """Paused, rate limit and groups of `names`, cached FLAGS_TTL_S; rows whose
        owner does not answer within PAGE_DEADLINE_S are left unknown."""
        now = time.monotonic()
        out: dict[str, QueueFlags] = {}
        missing = []
        for name in names:
            hit = self._flags.get(name)
            if hit is not None and now - hit[0] < FLAGS_TTL_S:
                out[name] = hit[1]
            else:
                missing.append(name)
        if missing:
            try:
                client = await self.client()
            except (ShardqError, OSError) as e:
                log.warning("dashboard: no broker client: %s", e)
                return {n: out.get(n, QueueFlags()) for n in names}
            tasks = {n: asyncio.ensure_future(self._read_flags(client, n)) for n in missing}
            await asyncio.wait(tasks.values(), timeout=PAGE_DEADLINE_S)
            for name, task in tasks.items():
                if task.done() and not task.cancelled() and task.exception() is None:
                    flags = task.result()
                    self._flags[name] = (now, flags)
                    out[name] = flags
                else:
                    task.cancel()
                    out[name] = QueueFlags()
            if len(self._flags) > 10_000:  # only rows recently on screen are worth keeping
                self._flags = {k: v for k, v in self._flags.items() if now - v[0] < FLAGS_TTL_S}
        return out

    async def _read_flags(self, client: Client, name: str) -> QueueFlags:
        q = client.queue(name)
        counts, limits = await asyncio.gather(q.counts(), q.get_limits())
        return QueueFlags(bool(counts.get("paused")), limits.get("rate"), limits.get("tenant"),
                          dict(limits.get("groups") or {}), True)

    def forget_flags(self, name: str) -> None:
        """Drop a cached row after an action changed it."""
        self._flags.pop(name, None)

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
