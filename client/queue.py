"""The `Queue` API: add jobs, read counts and jobs, pause/resume/drain/obliterate.

Names follow BullMQ in snake_case (docs/design.md §8, §10). A partitioned queue
(docs/design.md §7: `topology.partitions[name] = P`) is stored as `name~0 ..
name~P-1`; `add` picks one partition per job and the read/admin calls fan
out over all of them.
"""

from __future__ import annotations

import asyncio
from builtins import max as builtins_max
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from shardq import protocol
from shardq.router import partition_for, partition_name

from . import tracing
from .ids import uuid7
from .jobs import JobsMixin

if TYPE_CHECKING:
    from .client import Client

COUNT_FIELDS = ("waiting", "delayed", "active", "completed", "failed")
_DLQ_PAGE = 1000

# add() options with a wire name of their own; anything else given to add()
# is passed through as is (newer broker options, docs/design.md §11).
_OPTION_NAMES = frozenset({
    "priority", "delay_ms", "attempts", "backoff", "job_id", "remove_on_complete",
    "remove_on_fail", "partition_key", "timestamp",
})


def unpack(value: Any) -> Any:
    """Decode a msgpack payload stored by the broker (data, result)."""
    if isinstance(value, bytes | bytearray):
        return msgpack.unpackb(value, raw=False)
    return value


def wire_opts(priority: int = 0, delay_ms: int = 0, attempts: int | None = None,
              backoff: dict[str, Any] | None = None,
              remove_on_complete: bool | int | None = None,
              remove_on_fail: bool | int | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ADD `opts` map, or None when every option is the default."""
    opts: dict[str, Any] | None = dict(extra) if extra else None
    if priority or delay_ms or attempts is not None or backoff is not None:
        opts = opts or {}
        if priority:
            opts["priority"] = priority
        if delay_ms:
            opts["delay_ms"] = delay_ms
        if attempts is not None:
            opts["attempts"] = attempts
        if backoff is not None:
            opts["backoff"] = backoff
    if remove_on_complete is not None or remove_on_fail is not None:
        opts = opts or {}
        if remove_on_complete is not None:
            opts["remove_on_complete"] = remove_on_complete
        if remove_on_fail is not None:
            opts["remove_on_fail"] = remove_on_fail
    return opts


def _add_trace(items: list[Any]) -> None:
    """The current trace context on every item (client/tracing.py); items
    are shared with add_bulk's per-partition lists, so set in place."""
    trace = tracing.carrier()
    if trace is not None:
        for item in items:
            item[3] = {**(item[3] or {}), "trace": trace}


class Queue(JobsMixin):
    """One named queue. Get it with `client.queue(name)` (cached, cheap).
    Job management (get_jobs, retry_job, clean, ...): client/jobs.py."""

    __slots__ = ("_batcher", "_client", "_packb", "name")

    def __init__(self, client: Client, name: str) -> None:
        if not name:
            raise ValueError("queue name must not be empty")
        self.name = name
        self._client = client
        self._batcher = client._batcher
        self._packb = client._packb

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"

    # -- partitions ------------------------------------------------------------

    def partitions(self) -> list[str]:
        """The stored queue names: `[name]`, or `name~0 .. name~P-1` if partitioned."""
        p = self._client._topology.topo.partitions.get(self.name)
        if not p:
            return [self.name]
        return [partition_name(self.name, i) for i in range(p)]

    def _target(self, job_id: str, partition_key: str | None) -> str:
        p = self._client._topology.topo.partitions.get(self.name)
        if not p:
            return self.name
        stored: str = partition_name(self.name, partition_for(partition_key or job_id, p))
        return stored

    # -- adding ----------------------------------------------------------------

    async def add(self, name: str, data: Any = None, *, priority: int = 0, delay_ms: int = 0,
                  attempts: int | None = None, backoff: dict[str, Any] | None = None,
                  job_id: str | None = None, remove_on_complete: bool | int | None = None,
                  remove_on_fail: bool | int | None = None, partition_key: str | None = None,
                  group: str | None = None, **extra: Any) -> str:
        """Add one job; return its id.

        Concurrent calls are sent together in bulk ADD frames. Adding an id
        that exists returns that id and changes nothing.

        Args:
            name: the job name given to the handler.
            data: any msgpack-serialisable value (packed once, here).
            priority: >= 0, lower runs first. delay_ms: run no earlier than this.
            attempts: tries before the job fails for good (broker default 1).
            backoff: `{"type": "fixed" | "exponential", "delay_ms": n}`.
            job_id: your id; default a UUIDv7 made before sending, so a
                resend after a timeout or redirect cannot add twice.
            remove_on_complete / remove_on_fail: retention override (bool or count).
            partition_key: picks the partition of a partitioned queue.
            group: a group key (e.g. a tenant): waiting jobs are handed out
                round-robin across groups, one per turn, so one group's burst
                does not starve the others (see `set_group_concurrency`).
            extra: further broker options, sent as is; among them
                `timeout_ms` (the worker cancels an attempt running longer
                and fails it with a reason saying "timed out"; retries and
                backoff apply) and `ttl_ms` (counted from the add, paused
                time included: a job not started by then is discarded to
                the DLQ, never handed out).

        Raises:
            ShardqError: the add was refused (`BadRequestError`,
                `TooLargeError`, `BusyError`, `UnavailableError`, ...).
        """
        jid = job_id or uuid7()
        if group is not None:
            extra["group"] = group
        trace = tracing.carrier()
        if trace is not None:
            extra["trace"] = trace
        opts = None
        if priority or delay_ms or attempts is not None or backoff is not None or extra \
                or remove_on_complete is not None or remove_on_fail is not None:
            opts = wire_opts(priority, delay_ms, attempts, backoff,
                             remove_on_complete, remove_on_fail, extra)
        queue = self.name
        if self._client._topology.topo.partitions:
            queue = self._target(jid, partition_key)
        result: str = await self._batcher.add(queue, [jid, name, self._packb(data), opts])
        return result

    async def add_bulk(self, jobs: Iterable[Sequence[Any]]) -> list[str]:
        """Add many jobs; return their ids in order.

        Each entry is `(name, data)` or `(name, data, opts)` with the option
        names of `add`. Jobs are split by partition and owner broker and
        sent in frames of up to 5000, in parallel.

        Raises:
            ShardqError: the first item error, after every item was tried
                (the others are added).
        """
        partitioned = self.name in self._client._topology.topo.partitions
        by_queue: dict[str, tuple[list[int], list[Any]]] = {}
        items: list[Any] = []
        packb = self._packb
        # Hot loop: a (name, data) entry costs one id, one pack, one list.
        for entry in jobs:
            if len(entry) == 2 and not partitioned:
                items.append([uuid7(), entry[0], packb(entry[1]), None])
                continue
            item, key = self._bulk_item(entry)
            if not partitioned:
                items.append(item)
                continue
            queue = self._target(item[0], key)
            group = by_queue.get(queue)
            if group is None:
                group = by_queue[queue] = ([], [])
            group[0].append(len(items))
            group[1].append(item)
            items.append(item)
        _add_trace(items)
        if not partitioned:
            by_queue = {self.name: (list(range(len(items))), items)}
        ids: list[Any] = [None] * len(items)
        chunk = self._batcher.max_items
        sends: list[tuple[list[int], Any]] = []
        for queue, (idxs, group_items) in by_queue.items():
            for lo in range(0, len(group_items), chunk):
                sends.append((idxs[lo:lo + chunk],
                              self._client._send_add(queue, group_items[lo:lo + chunk])))
        results = await asyncio.gather(*(s for _, s in sends))
        first_error: BaseException | None = None
        for (idxs, _), outcomes in zip(sends, results, strict=True):
            for i, outcome in zip(idxs, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    first_error = first_error or outcome
                ids[i] = outcome
        if first_error is not None:
            raise first_error
        return ids

    def _bulk_item(self, entry: Sequence[Any]) -> tuple[list[Any], str | None]:
        """(wire item, partition key) of one add_bulk entry."""
        if len(entry) == 2:
            return [uuid7(), entry[0], self._packb(entry[1]), None], None
        if len(entry) != 3:
            raise ValueError(f"add_bulk entries are (name, data[, opts]), got {entry!r}")
        name, data, given = entry
        if not given:
            return [uuid7(), name, self._packb(data), None], None
        jid = given.get("job_id") or uuid7()
        extra = {k: v for k, v in given.items() if k not in _OPTION_NAMES}
        opts = wire_opts(given.get("priority", 0), given.get("delay_ms", 0), given.get("attempts"),
                         given.get("backoff"), given.get("remove_on_complete"),
                         given.get("remove_on_fail"), extra)
        if "timestamp" in given:
            opts = opts or {}
            opts["timestamp"] = given["timestamp"]
        return [jid, name, self._packb(data), opts], given.get("partition_key")

    # -- reading -----------------------------------------------------------------

    async def counts(self) -> dict[str, Any]:
        """Jobs retained per state: `{waiting, delayed, active, completed, failed}` -> int,
        plus `paused` (bool; for a partitioned queue, true when all partitions are)."""
        parts = self.partitions()
        replies = await asyncio.gather(
            *(self._client._call(q, protocol.COUNTS, {"queue": q}) for q in parts))
        total: dict[str, Any] = dict.fromkeys(COUNT_FIELDS, 0)
        paused = True
        for reply in replies:
            for key in COUNT_FIELDS:
                total[key] += int(reply.get(key, 0) or 0)
            paused = paused and bool(reply.get("paused", False))
        total["paused"] = paused
        return total

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        """The job as a dict (`id, name, data, state, attempts_made, result,
        failed_reason, ...`; data and result decoded), or None if unknown."""
        for q in self.partitions():
            reply = await self._client._call(q, protocol.GET_JOB, {"queue": q, "id": job_id})
            if reply:
                job = dict(reply)
                job["data"] = unpack(job.get("data"))
                job["result"] = unpack(job.get("result"))
                job.setdefault("queue", self.name)
                return job
        return None

    # -- admin -----------------------------------------------------------------

    async def _each(self, op: str, **args: Any) -> list[Any]:
        return list(await asyncio.gather(
            *(self._client._call(q, op, {"queue": q, **args}) for q in self.partitions())))

    async def pause(self) -> None:
        """Stop handing out jobs (adds still work)."""
        await self._each(protocol.PAUSE)

    async def resume(self) -> None:
        """Hand out jobs again after `pause`."""
        await self._each(protocol.RESUME)

    async def drain(self, delayed: bool = False) -> int:
        """Remove waiting jobs (and delayed ones when asked); return how many."""
        return sum(int(n or 0) for n in await self._each(protocol.DRAIN, delayed=delayed))

    async def obliterate(self) -> None:
        """Remove the queue and every job in it."""
        await self._each(protocol.OBLITERATE)

    # -- logs and dead letters (docs/design.md §11) ---------------------------------------

    async def get_logs(self, job_id: str) -> list[str]:
        """The lines the job's handlers logged with `job.log(line)`, oldest
        first (the last 1000 are kept); [] for an unknown job."""
        for q in self.partitions():
            reply = await self._client._call(q, protocol.GET_LOGS, {"queue": q, "id": job_id})
            if reply:
                return [str(line) for line in reply]
        return []

    async def dlq_list(self) -> list[dict[str, Any]]:
        """Jobs in the dead-letter queue, oldest failure first: `get_job`
        dicts (state "failed", "dlq": True) plus `dlq_reason` ("attempts
        exhausted", "stalled too many times" or "ttl expired"). Every final
        failure lands here, bounded like failed history (the queue's
        retention, 10,000 by default; `remove_on_fail` jobs are removed)."""
        out: list[dict[str, Any]] = []
        for q in self.partitions():
            offset = 0
            while True:
                page = await self._client._call(
                    q, protocol.DLQ_LIST, {"queue": q, "offset": offset, "limit": _DLQ_PAGE})
                for reply in page:
                    job = dict(reply)
                    job["data"] = unpack(job.get("data"))
                    job["result"] = unpack(job.get("result"))
                    job.setdefault("queue", self.name)
                    out.append(job)
                if len(page) < _DLQ_PAGE:
                    break
                offset += len(page)
        return out

    async def dlq_retry(self, job_ids: Iterable[str] | None = None) -> int:
        """Put DLQ jobs back to waiting with `attempts_made` reset to 0 (and
        no TTL); None retries all of them. Returns how many were retried
        (ids not in the DLQ are skipped)."""
        ids = None if job_ids is None else list(job_ids)
        return sum(int(n or 0) for n in await self._each(protocol.DLQ_RETRY, ids=ids))

    async def dlq_purge(self) -> int:
        """Remove every job in the DLQ; returns how many."""
        return sum(int(n or 0) for n in await self._each(protocol.DLQ_PURGE))
    # -- rate limits and groups (docs/design.md §11) ------------------------------------

    async def set_rate_limit(self, max: int | None, per_ms: int = 1000) -> None:
        """Let at most `max` jobs start (be handed to workers) in any sliding
        window of `per_ms` ms; `None` clears the limit. Workers held back wait
        in the broker (no polling) and get jobs as soon as the window has room.
        A partitioned queue gives each partition `max // P` (at least 1).

        Raises:
            BadRequestError: max not in [1, 10^7], or per_ms not in [1, 1 day].
        """
        parts = self.partitions()
        share = None if max is None else (max if len(parts) == 1 else
                                          builtins_max(1, max // len(parts)))
        await asyncio.gather(*(self._client._call(q, protocol.RATE_LIMIT,
                                                  {"queue": q, "max": share, "per_ms": per_ms})
                               for q in parts))

    async def set_group_rate_limit(self, group: str, max: int | None,
                                   per_ms: int = 1000) -> None:
        """At most `max` jobs of `group` start in any `per_ms` window; `None` clears."""
        rate = None if max is None else [max, per_ms]
        await self._each(protocol.GROUP_SET, group=group, rate=rate)

    async def set_group_concurrency(self, group: str, concurrency: int | None) -> None:
        """At most `concurrency` jobs of `group` active at once (unlimited
        unless set; `None` clears). For a partitioned queue, per partition."""
        await self._each(protocol.GROUP_SET, group=group, concurrency=concurrency)

    async def pause_group(self, group: str) -> None:
        """Stop handing out `group`'s jobs (adds still work; other groups go on)."""
        await self._each(protocol.GROUP_SET, group=group, paused=True)

    async def resume_group(self, group: str) -> None:
        """Hand out `group`'s jobs again after `pause_group`."""
        await self._each(protocol.GROUP_SET, group=group, paused=False)

    async def get_limits(self) -> dict[str, Any]:
        """`{"rate": [max, per_ms] | None, "tenant": str | None, "groups": {group:
        {concurrency?, paused?, rate?, active, waiting}}}` (of partition 0 for
        a partitioned queue)."""
        reply: dict[str, Any] = await self._client._call(
            self.partitions()[0], protocol.LIMITS, {"queue": self.partitions()[0]})
        return reply

    # -- job schedulers (docs/design.md §6, §10) ----------------------------------------

    async def upsert_scheduler(self, scheduler_id: str, *, every_ms: int | None = None,
                               cron: str | None = None, tz: str = "UTC",
                               name: str | None = None, data: Any = None,
                               opts: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create or replace a job scheduler: a job named `name` with `data` at
        every tick (`every_ms` multiples since the epoch, or 5-field `cron` in
        `tz`). Only the queue's owner fires it; each tick makes exactly one job,
        id `f"{scheduler_id}:{tick_ms}"`, across restarts and moves.

        Returns:
            The scheduler, with `next_tick_ms`.
        Raises:
            BadRequestError: bad cron, zone, interval or options.
        """
        args: dict[str, Any] = {"queue": self._scheduler_home(), "id": scheduler_id, "tz": tz,
                                "name": name, "data": msgpack.packb(data, use_bin_type=True),
                                "opts": opts}
        if every_ms is not None:
            args["every_ms"] = every_ms
        if cron is not None:
            args["cron"] = cron
        reply: dict[str, Any] = await self._client._call(
            self._scheduler_home(), protocol.SCHED_UPSERT, args)
        reply["data"] = unpack(reply.get("data"))
        return reply

    async def list_schedulers(self) -> list[dict[str, Any]]:
        """The queue's schedulers with their next tick."""
        reply: list[dict[str, Any]] = await self._client._call(
            self._scheduler_home(), protocol.SCHED_LIST, {"queue": self._scheduler_home()})
        for s in reply:
            s["data"] = unpack(s.get("data"))
        return reply

    async def remove_scheduler(self, scheduler_id: str) -> bool:
        """Remove a scheduler; False if there was none."""
        home = self._scheduler_home()
        return bool(await self._client._call(home, protocol.SCHED_REMOVE,
                                             {"queue": home, "id": scheduler_id}))

    def _scheduler_home(self) -> str:
        # A partitioned queue keeps its schedulers on partition 0.
        return self.partitions()[0]
