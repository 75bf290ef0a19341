"""Job management on a `Queue` (docs/features-jobs.md "Job management"):
BullMQ's getters and actions in snake_case, mixed into `Queue`.

A partitioned queue (docs/design.md §7) is answered by all its partitions: getters
merge them in one order (each broker returns its jobs' sort keys),
queue-wide actions add up what each partition touched, and a single-job
action goes to every partition at once in one bulk `JOB_ACTIONS` frame per
broker (only the partition holding the id applies it; the others answer
NOT_FOUND), since a job added with a `partition_key` is not found by its
id alone.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from shardq import protocol
from shardq.errors import NotFoundError

if TYPE_CHECKING:
    from .client import Client

STATES = ("waiting", "prioritized", "delayed", "active", "completed", "failed",
          "waiting-children")
_PAGE = 1000  # jobs per GET_JOBS reply (the broker's bound)
_TOUCH = 10_000  # jobs per queue-wide request (the broker's bound)


def _decoded(job: dict[str, Any], queue: str) -> dict[str, Any]:
    from .queue import unpack

    out = dict(job)
    out["data"] = unpack(out.get("data"))
    out["result"] = unpack(out.get("result"))
    out.setdefault("queue", queue)
    return out


def _state_list(states: str | Iterable[str] | None) -> list[str]:
    if states is None:
        return list(STATES)
    listed = [states] if isinstance(states, str) else list(states)
    bad = [s for s in listed if s not in STATES]
    if bad or not listed:
        raise ValueError(f"states must be some of {', '.join(STATES)}; got {bad or listed!r}")
    return listed


class JobsMixin:
    """Getters and actions of `Queue` (see the module docstring)."""

    __slots__ = ()

    if TYPE_CHECKING:
        name: str
        _client: Client

        _packb: Callable[[Any], bytes]

        def partitions(self) -> list[str]: ...

    # -- getters -----------------------------------------------------------------

    async def get_jobs(self, states: str | Iterable[str] | None = None, start: int = 0,
                       end: int = -1, asc: bool = False) -> list[dict[str, Any]]:
        """Jobs `start..end` (inclusive; `end=-1`: to the last) in `states`
        (default all: waiting, prioritized, delayed, active, completed,
        failed, waiting-children), as `get_job` dicts.

        Order: by state as listed, then the state's time (due time for
        delayed, start for active, finish for completed/failed, added
        otherwise), then id; newest first unless `asc`. The order holds
        across partitions and pages, so paging a queue that does not change
        never repeats or skips a job.

        Raises:
            ValueError: an unknown state or a negative start.
        """
        if start < 0 or end < -1:
            raise ValueError("start must be >= 0 and end >= -1")
        listed = _state_list(states)
        parts = self.partitions()
        if len(parts) == 1:
            pairs = await self._fetch_range(parts[0], listed, start, end, asc)
            return [_decoded(job, self.name) for _, job in pairs]
        runs = await asyncio.gather(*(self._fetch_range(q, listed, 0, end, asc) for q in parts))
        merged = heapq.merge(*runs, key=lambda kj: _merge_key(kj[0], asc), reverse=not asc)
        stop = None if end < 0 else end + 1
        out = []
        for i, (_, job) in enumerate(merged):
            if stop is not None and i >= stop:
                break
            if i >= start:
                out.append(_decoded(job, self.name))
        return out

    async def _fetch_range(self, queue: str, states: list[str], start: int, end: int,
                           asc: bool) -> list[tuple[list[Any], dict[str, Any]]]:
        """(sort key, job) of one stored queue's jobs start..end, page by page."""
        out: list[tuple[list[Any], dict[str, Any]]] = []
        pos = start
        while end < 0 or pos <= end:
            reply = await self._client._call(queue, protocol.GET_JOBS, {
                "queue": queue, "states": states, "start": pos, "end": end, "asc": asc})
            jobs = reply["jobs"]
            out.extend(zip(reply["keys"], jobs, strict=True))
            pos += len(jobs)
            if len(jobs) < _PAGE or pos >= int(reply["total"]):
                break
        return out

    async def get_job_counts(self, *states: str) -> dict[str, int]:
        """Jobs per state (default every state; "waiting" excludes
        "prioritized", as BullMQ), plus `completed_total` and `failed_total`:
        jobs ever completed / failed for good, beyond the retained history.

        Raises:
            ValueError: an unknown state.
        """
        listed = _state_list(states or None)
        replies = await asyncio.gather(*(
            self._client._call(q, protocol.JOB_COUNTS, {"queue": q, "states": listed})
            for q in self.partitions()))
        total: dict[str, int] = dict.fromkeys([*listed, "completed_total", "failed_total"], 0)
        for reply in replies:
            for key in total:
                total[key] += int(reply.get(key, 0) or 0)
        return total

    # -- queue-wide actions --------------------------------------------------------

    async def _touch_all(self, op: str, count: int | None, key: str = "count",
                         **args: Any) -> int:
        """Run a queue-wide op until `count` jobs (None: all) were touched,
        partition by partition, each request within the broker's bound."""
        if count is not None and count < 0:
            raise ValueError(f"{key} must be >= 0 or None")
        done = 0
        for q in self.partitions():
            while count is None or done < count:
                ask = _TOUCH if count is None else min(_TOUCH, count - done)
                n = int(await self._client._call(q, op, {"queue": q, key: ask, **args}) or 0)
                done += n
                if n < ask:
                    break
        return done

    async def retry_jobs(self, state: str = "failed", count: int | None = None) -> int:
        """Put up to `count` (None: all) failed - or completed - jobs back to
        waiting with attempts reset, oldest first. Returns how many."""
        if state not in ("failed", "completed"):
            raise ValueError("state must be 'failed' or 'completed'")
        return await self._touch_all(protocol.RETRY_JOBS, count, state=state)

    async def promote_jobs(self, count: int | None = None) -> int:
        """Move up to `count` (None: all) delayed jobs to waiting now, soonest
        due first. Returns how many."""
        return await self._touch_all(protocol.PROMOTE_JOBS, count)

    async def clean(self, grace_ms: int, limit: int | None = None,
                    state: str = "completed") -> int:
        """Remove up to `limit` (None or 0: all) jobs of `state` (completed,
        failed, waiting, prioritized or delayed) that finished - or, for the
        unfinished states, were added - at least `grace_ms` ago, oldest
        first. Returns how many."""
        if grace_ms < 0:
            raise ValueError("grace_ms must be >= 0")
        return await self._touch_all(protocol.CLEAN, limit or None, key="limit",
                                     grace_ms=grace_ms, state=state)

    async def set_retention(self, keep_completed: int | None = None,
                            keep_failed: int | None = None) -> dict[str, int]:
        """Keep the last `keep_completed` completed and `keep_failed` failed
        jobs of this queue (None: unchanged; -1: the broker default, 10,000);
        a job's own `remove_on_complete` / `remove_on_fail` still wins.
        History over a lowered bound is removed at once. Returns the bounds
        in force and `removed` (summed over partitions)."""
        replies = await asyncio.gather(*(
            self._client._call(q, protocol.SET_RETENTION, {
                "queue": q, "keep_completed": keep_completed, "keep_failed": keep_failed})
            for q in self.partitions()))
        out = dict(replies[0])
        out["removed"] = sum(int(r.get("removed", 0)) for r in replies)
        return out

    # -- single-job actions ----------------------------------------------------------

    async def _job_action(self, job_id: str, action: str, arg: Any = None) -> None:
        await job_action(self._client, self.partitions(), job_id, action, arg, self.name)

    async def retry_job(self, job_id: str) -> None:
        """A completed or failed job back to waiting, attempts reset.

        Raises:
            NotFoundError: no such job. JobStateError: it has not finished.
        """
        await self._job_action(job_id, "retry")

    async def remove_job(self, job_id: str) -> None:
        """Remove a job no worker holds; its id stays taken for the dedup
        window. A flow child counts as done (None) on its parent.

        Raises:
            NotFoundError: no such job. JobStateError: it is active.
        """
        await self._job_action(job_id, "remove")

    async def promote_job(self, job_id: str) -> None:
        """Run a delayed job now.

        Raises:
            NotFoundError: no such job. JobStateError: it is not delayed.
        """
        await self._job_action(job_id, "promote")

    async def update_job_data(self, job_id: str, data: Any) -> None:
        """Replace a job's data (any state; a running handler keeps the data
        it was given).

        Raises:
            NotFoundError: no such job. TooLargeError: over the broker's limit.
        """
        await self._job_action(job_id, "update_data", self._packb(data))

    async def change_job_priority(self, job_id: str, priority: int) -> None:
        """A new priority (>= 0, lower runs first) for a job not yet started;
        a waiting job joins the back of its new priority's line.

        Raises:
            NotFoundError: no such job. JobStateError: it started or finished.
        """
        await self._job_action(job_id, "priority", priority)

    async def change_job_delay(self, job_id: str, delay_ms: int) -> None:
        """Run a waiting or delayed job `delay_ms` from now (0: now).

        Raises:
            NotFoundError: no such job. JobStateError: not waiting or delayed.
        """
        await self._job_action(job_id, "delay", delay_ms)

    async def discard_job(self, job_id: str) -> None:
        """No more retries: the job's current (or next) attempt is its last.

        Raises:
            NotFoundError: no such job. JobStateError: it has finished.
        """
        await self._job_action(job_id, "discard")


async def job_action(client: Client, parts: list[str], job_id: str, action: str, arg: Any,
                     queue: str) -> None:
    """One JOB_ACTIONS item per stored queue in `parts`, one frame per broker;
    done when one of them applied it (the others answer NOT_FOUND)."""
    items = [[q, job_id, action, arg] for q in parts]
    outcomes = await client._cluster.bulk(
        protocol.JOB_ACTIONS, items, lambda it: str(it[0]),
        lambda _bid, sub, _rnd: {"items": sub})
    if any(o is None for o in outcomes):
        return
    for o in outcomes:
        if isinstance(o, BaseException) and not isinstance(o, NotFoundError):
            raise o
    raise NotFoundError(f"no job {job_id!r} in {queue!r}")


def _merge_key(key: list[Any], asc: bool) -> tuple[Any, ...]:
    # Descending runs arrive largest first by (-rank, time, id): see
    # broker/jobadmin.py `list_jobs`.
    return (key[0], key[1], key[2]) if asc else (-key[0], key[1], key[2])
