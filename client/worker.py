"""The `Worker`: pull jobs, run the handler, ack in pipelined batches.

Slots. A worker has `concurrency` slots; the invariant is
`free + reserved + running == concurrency`. A pull (or the pull riding on
an ack) reserves slots before it is sent and gives back what it did not
fill, so a worker never holds more jobs than it has slots, whichever
brokers they come from.

Flow. One pull loop per broker that owns some of the worker's queues
(re-planned when the topology changes) long-polls `PULL`. When a handler
returns, its slot frees at once and the ack joins a pending `ACK` batch
flushed with `call_soon`; the batch carries a `pull` for the free slots
(ack-and-fetch), so under load one frame both acks and refills. Failures go
out as `FAIL` items with the attempt's stack trace (its last STACKTRACE_MAX
characters; the broker keeps the last few as `job.stacktrace`); the broker
decides retry or final failure. Every
`lock_ms / 2` one `EXTEND` frame renews the locks of all running jobs.

`LOCK_LOST` (the lock expired and the job went back to waiting): the
result is dropped and logged; the broker redelivers the job (at-least-once,
docs/design.md §2).

Timeouts. A job added with `timeout_ms` arrives with it; when the timer
fires the handler's task is cancelled and the attempt fails with a reason
saying "timed out" (the broker then retries per attempts/backoff).

Processes. With `processes=N` the handler is a sync top-level function run
in a `ProcessPoolExecutor` (spawned processes) on a picklable `JobInfo`;
its return value or exception maps to ack/fail as for async handlers. A
timed-out process job is failed at once, but its process runs the function
to its end (a pool process cannot be cancelled safely).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import multiprocessing
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import msgpack

from shardq import protocol
from shardq.errors import (
    AuthError,
    BadRequestError,
    ConnectionClosedError,
    LockLostError,
    MovedError,
    ShardqError,
)
from shardq.router import partition_name

from . import tracing

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("shardq.worker")

Handler = Callable[["Job"], Awaitable[Any] | Any]
_queue_of = itemgetter(0)
_FATAL = (AuthError, BadRequestError)
PULL_PAUSE_S = 0.5  # after a pull gave up, before the next one (a fresh budget)


class Job:
    """A job delivered to a handler.

    Attributes:
        id, name, data: as added (`data` is decoded on first access).
        queue: the queue name the worker was given; `partition` is the
            stored name it came from (`queue~i` for a partitioned queue).
        attempts_made: finished attempts before this one.
        attempts_started: deliveries including this one.
        timestamp: when it was added (ms). token: this delivery's lock token.
    """

    __slots__ = ("_client", "_data", "_raw", "_timer", "attempts_made", "attempts_started",
                 "broker", "id", "lock_lost", "lock_ms", "name", "partition", "queue",
                 "timed_out", "timeout_ms", "timestamp", "token", "trace")

    def __init__(self, client: Client, broker: str, wire: list[Any]) -> None:
        part: str = wire[protocol.J_QUEUE]
        self.partition = part
        self.queue = part.split("~", 1)[0] if "~" in part else part
        self.id: str = wire[protocol.J_ID]
        self.name: str = wire[protocol.J_NAME]
        self._raw: Any = wire[protocol.J_DATA]
        self._data: Any = _UNSET
        self.token: Any = wire[protocol.J_TOKEN]
        self.attempts_made: int = wire[protocol.J_ATTEMPTS_MADE]
        self.attempts_started: int = wire[protocol.J_ATTEMPTS_STARTED]
        self.timestamp: int = wire[protocol.J_TIMESTAMP]
        self.lock_ms: int = wire[protocol.J_LOCK_MS] if len(wire) > protocol.J_LOCK_MS else 0
        self.timeout_ms: int = (wire[protocol.J_TIMEOUT_MS]
                                if len(wire) > protocol.J_TIMEOUT_MS else 0)
        # The adder's trace context (client/tracing.py), when it had one.
        self.trace: dict[str, str] | None = (wire[protocol.J_TRACE]
                                             if len(wire) > protocol.J_TRACE else None)
        self.broker = broker
        self.lock_lost = False
        self.timed_out = False
        self._timer: asyncio.TimerHandle | None = None
        self._client = client

    @property
    def data(self) -> Any:
        if self._data is _UNSET:
            raw = self._raw
            self._data = msgpack.unpackb(raw, raw=False) if isinstance(raw, bytes) else raw
        return self._data

    def __repr__(self) -> str:
        return f"Job({self.partition!r}, {self.id!r}, {self.name!r})"

    async def update_progress(self, progress: Any) -> None:
        """Record progress (a number or any msgpack value).

        Raises:
            LockLostError: this delivery no longer holds the job.
        """
        await self._client._call(self.partition, protocol.PROGRESS, {
            "queue": self.partition, "id": self.id, "token": self.token, "progress": progress})

    async def log(self, line: str) -> None:
        """Append a line to the job's log (`queue.get_logs(job_id)`); the last
        1000 lines are kept, each cut to 2000 characters.

        Raises:
            LockLostError: this delivery no longer holds the job.
        """
        await self._client._call(self.partition, protocol.LOG, {
            "queue": self.partition, "id": self.id, "token": self.token, "line": str(line)})

    async def children_values(self) -> dict[str, Any]:
        """A flow parent's children's results: `{f"{queue}:{job_id}": result}`
        (None for a child that failed with `ignore_failure`).

        Raises:
            BadRequestError: this job is not a flow's parent.
        """
        from .queue import unpack

        raw = await self._client._call(self.partition, protocol.FLOW_CHILDREN,
                                       {"queue": self.partition, "id": self.id})
        return {k: unpack(v) for k, v in raw.items()}

    # -- job management (client/jobs.py), BullMQ's Job methods --------------------

    async def _act(self, action: str, arg: Any = None) -> None:
        from .jobs import job_action

        await job_action(self._client, [self.partition], self.id, action, arg, self.queue)

    async def retry(self) -> None:
        """Put this job back to waiting once it has finished (`Queue.retry_job`)."""
        await self._act("retry")

    async def remove(self) -> None:
        """Remove this job (`Queue.remove_job`); refused (JobStateError) while
        a worker - this one too - holds it."""
        await self._act("remove")

    async def promote(self) -> None:
        """Run this job now if it is delayed (`Queue.promote_job`)."""
        await self._act("promote")

    async def update_data(self, data: Any) -> None:
        """Replace this job's stored data, and `job.data` here."""
        await self._act("update_data", self._client._packb(data))
        self._data = data

    async def change_priority(self, priority: int) -> None:
        """A new priority for this job's next run (`Queue.change_job_priority`)."""
        await self._act("priority", priority)

    async def change_delay(self, delay_ms: int) -> None:
        """Run this job `delay_ms` from now if waiting or delayed."""
        await self._act("delay", delay_ms)

    async def discard(self) -> None:
        """No more retries: when this attempt fails, the job fails for good
        (BullMQ's `job.discard()`)."""
        await self._act("discard")

    def info(self) -> JobInfo:
        """The job as a picklable value (what a process-pool handler gets)."""
        return JobInfo(self.id, self.name, self.data, self.queue, self.partition,
                       self.attempts_made, self.attempts_started, self.timestamp)


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job as a process-pool handler sees it (no client, no lock calls)."""

    id: str
    name: str
    data: Any
    queue: str
    partition: str
    attempts_made: int
    attempts_started: int
    timestamp: int


def _run_in_process(handler: Callable[[Any], Any], job: JobInfo) -> Any:
    return handler(job)



_UNSET: Any = object()


def failure_reason(exc: BaseException) -> str:
    """What a failed attempt records as `failed_reason`."""
    return str(exc) or repr(exc)


STACKTRACE_MAX = 8192  # the broker's bound too (broker/job.py): more would be cut there


def failure_stacktrace(exc: BaseException) -> str:
    """The formatted traceback a failed attempt sends with FAIL, cut to its last
    STACKTRACE_MAX characters (the raising frame and the message are at the end).
    A process-pool handler's remote traceback is included as the exception's cause."""
    return "".join(traceback.format_exception(exc))[-STACKTRACE_MAX:]


class Worker:
    """Runs `handler` on jobs of some queues. Create with `client.worker(...)`."""

    def __init__(self, client: Client, queues: list[str], handler: Handler, *,
                 concurrency: int = 1, lock_ms: int = protocol.DEFAULT_LOCK_MS,
                 wait_ms: int = 5000, processes: int = 0) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not queues:
            raise ValueError("a worker needs at least one queue")
        if processes < 0:
            raise ValueError("processes must be >= 0")
        if processes and inspect.iscoroutinefunction(handler):
            raise ValueError("a process-pool handler must be a plain (sync) function")
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self.queues = queues
        self.handler = handler
        self.concurrency = concurrency
        self.lock_ms = lock_ms
        self.wait_ms = min(wait_ms, protocol.MAX_WAIT_MS)
        self.completed = 0
        self.failed = 0
        self._client = client
        self._cluster = client._cluster
        self._topology = client._topology
        self._packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
        self._free = concurrency
        self._running: set[Job] = set()
        self._handlers: set[asyncio.Future[Any]] = set()
        self._slots = asyncio.Event()
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._acks: list[list[Any]] = []
        self._fails: list[list[Any]] = []
        self._flush_scheduled = False
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._pull_loops = 0
        self._started = False
        self._closing = False
        self._lane = f"pull-{id(self):x}"

    # -- lifecycle ---------------------------------------------------------------

    @property
    def running(self) -> int:
        """Jobs whose handler is running now."""
        return len(self._running)

    async def run(self) -> None:
        """Pull and process jobs until `close()`; then finish in-flight jobs and acks.

        Raises:
            AuthError / BadRequestError: the broker refused the worker's requests.
        """
        if self._started:
            raise RuntimeError("Worker.run() was already called")
        self._started = True
        if self.processes:
            # Spawned, not forked: a fork of a process running an event loop
            # (and threads) is unsafe; the handler is found by its import path.
            self._pool = ProcessPoolExecutor(self.processes,
                                             mp_context=multiprocessing.get_context("spawn"))
        extender = asyncio.get_running_loop().create_task(self._extend_loop())
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    await self._supervise(tg)
            except BaseExceptionGroup as group:
                raise _first(group) from None
            await self._drain()
        finally:
            await self._cluster.close_lane(self._lane)
            extender.cancel()
            # Only left when run() itself failed or was cancelled: nothing
            # outlives run() (their jobs' locks run out and are redelivered).
            for fut in [*self._handlers, *self._ack_tasks]:
                fut.cancel()
            if self._pool is not None:
                pool, self._pool = self._pool, None
                pool.shutdown(wait=False, cancel_futures=True)
            self._finished.set()

    async def close(self) -> None:
        """Stop pulling, wait for running handlers, flush their acks. Idempotent.

        Long-poll PULLs wait on the worker's own connections, which close
        half-closes: a broker answers a parked PULL with what it already
        handed it (those jobs are run too) and drops the rest, so close
        takes one round trip for an idle queue rather than `wait_ms`, and
        no job is left locked by a reply nobody read.
        """
        self._closing = True
        self._stop.set()
        self._slots.set()
        await self._cluster.close_lane(self._lane)
        if not self._started:
            return
        current = asyncio.current_task()
        if current is not None and current in self._handlers:
            return  # called from a handler: waiting here would wait for ourselves
        await self._finished.wait()

    async def _supervise(self, tg: asyncio.TaskGroup) -> None:
        """Keep one pull loop per broker owning our queues, until close()."""
        loops: dict[str, asyncio.Task[None]] = {}
        seen = -1
        while not self._closing:
            for bid in self._owners():
                task = loops.get(bid)
                if task is None or task.done():
                    loops[bid] = tg.create_task(self._pull_loop(bid))
            changed = asyncio.ensure_future(self._topology.wait_changed(seen))
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait((changed, stop), return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                stop.cancel()
            seen = self._topology.version

    async def _drain(self) -> None:
        """After the pull loops ended: wait for handlers, then for their acks."""
        while self._handlers or self._ack_tasks or self._acks or self._fails:
            if self._handlers:
                await asyncio.wait(set(self._handlers))
                continue
            self._flush()
            if self._ack_tasks:
                await asyncio.wait(set(self._ack_tasks))

    # -- routing -----------------------------------------------------------------

    def _stored_queues(self) -> list[str]:
        parts = self._topology.topo.partitions
        out: list[str] = []
        for q in self.queues:
            p = parts.get(q)
            out.extend([partition_name(q, i) for i in range(p)] if p else [q])
        return out

    def _owners(self) -> set[str]:
        owners: set[str] = set()
        for q in self._stored_queues():
            route = self._topology.route(q)
            if route is not None:
                owners.add(route[0])
        return owners

    def _queues_on(self, bid: str) -> list[str]:
        route = self._topology.route
        return [q for q in self._stored_queues() if (r := route(q)) is not None and r[0] == bid]

    # -- slots -------------------------------------------------------------------

    def _reserve(self, share: int) -> int:
        n = min(self._free, share)
        self._free -= n
        return n

    def _release(self, n: int) -> None:
        if n > 0:
            self._free += n
            self._slots.set()

    async def _wait_slots(self, at_least: int = 1) -> None:
        """Wait for a free slot; while other slots are still taken (running
        jobs, in-flight pulls and ack-and-fetches will hand them back), for
        `at_least`, so a pull asks for a batch, not for the one slot that freed."""
        while not self._closing and (
                self._free <= 0
                or (self._free < min(at_least, self.concurrency)
                    and self._free < self.concurrency)):
            self._slots.clear()
            await self._slots.wait()

    # -- pulling -----------------------------------------------------------------

    async def _pull_loop(self, bid: str) -> None:
        self._pull_loops += 1
        try:
            while not self._closing:
                queues = self._queues_on(bid)
                if not queues:
                    return  # none of our queues lives there any more
                loops = max(self._pull_loops, 1)
                await self._wait_slots(max(1, self.concurrency // (4 * loops)))
                if self._closing:
                    return
                n = self._reserve(math.ceil(self._free / loops))
                try:
                    jobs = await self._pull(bid, n)
                except BaseException:
                    self._release(n)
                    raise
                self._release(n - self._dispatch(bid, jobs))
        finally:
            self._pull_loops -= 1

    async def _pull(self, bid: str, n: int) -> list[Any]:
        """One PULL from `bid` for our queues it owns, resent by the client's
        retry loop (client/retrying.py) with the budgets of any call: a
        MOVED patches the map and the resend leaves that queue out (the
        supervisor starts a pull loop at its new owner). Past a budget, or on
        an odd answer, the pull is logged and given up (the loop pulls
        again): a worker outlives outages, it never crashes on one."""
        timeout = self.wait_ms / 1000 + self._client._request_timeout

        async def send(bid: str, addr: str) -> list[Any]:
            queues = self._queues_on(bid)
            if not queues:
                return []  # all moved away: the pull loop ends
            args = {"queues": queues, "count": n, "wait_ms": self.wait_ms,
                    "lock_ms": self.lock_ms}
            conn = await self._cluster.connection(bid, addr, self._lane)
            jobs: list[Any] = await conn.request(protocol.PULL, args, timeout)
            return jobs

        try:
            return await self._cluster.retries.run(
                lambda: self._cluster.broker_route(bid), send, what=f"broker {bid}",
                closed=lambda: self._cluster.lane_closed(self._lane))
        except ConnectionClosedError:
            if not self._closing:
                raise
        except _FATAL:
            raise
        except ShardqError as exc:  # a budget ran out, or an odd answer
            log.warning("pull from %s failed: %s; retrying", bid, exc)
            await self._topology.refresh()
            if not isinstance(exc, MovedError):  # a refreshed map settles a MOVED
                await asyncio.sleep(PULL_PAUSE_S)
        return []

    def _dispatch(self, bid: str, jobs: list[Any]) -> int:
        """Start a handler per delivered job; return how many."""
        loop = asyncio.get_running_loop()
        for wire in jobs:
            job = Job(self._client, bid, wire)
            self._running.add(job)
            try:
                if job.trace is not None:
                    res: Any = tracing.traced(job, functools.partial(self._call, loop, job))
                else:
                    res = self._call(loop, job)
            except Exception as exc:
                self._finish(job, None, exc)
                continue
            if inspect.iscoroutine(res) or inspect.isawaitable(res):
                fut = loop.create_task(res) if inspect.iscoroutine(res) \
                    else asyncio.ensure_future(res)
                self._handlers.add(fut)
                fut.add_done_callback(functools.partial(self._on_done, job))
                if job.timeout_ms:
                    job._timer = loop.call_later(job.timeout_ms / 1000, self._time_out, job, fut)
            else:
                self._finish(job, res, None)
        return len(jobs)

    def _call(self, loop: asyncio.AbstractEventLoop, job: Job) -> Any:
        if self._pool is not None:
            return loop.run_in_executor(self._pool, _run_in_process, self.handler, job.info())
        return self.handler(job)

    @staticmethod
    def _time_out(job: Job, fut: asyncio.Future[Any]) -> None:
        job.timed_out = True
        fut.cancel()

    def _on_done(self, job: Job, fut: asyncio.Future[Any]) -> None:
        self._handlers.discard(fut)
        if job._timer is not None:
            job._timer.cancel()
        if job.timed_out:
            # Cancelled by its timer (or it swallowed the cancel and returned):
            # the attempt fails either way.
            self._finish(job, None, TimeoutError(
                f"job {job.id} timed out after {job.timeout_ms} ms"))
            return
        if fut.cancelled():
            # Cancelled by run()'s own cancellation: no ack, the lock runs
            # out and the broker redelivers (at-least-once).
            self._running.discard(job)
            self._release(1)
            log.warning("handler for %r was cancelled; the job will be redelivered", job)
            return
        exc = fut.exception()
        self._finish(job, None if exc is not None else fut.result(), exc)

    def _finish(self, job: Job, result: Any, exc: BaseException | None) -> None:
        self._running.discard(job)
        if job.lock_lost:
            log.warning("%r lost its lock while running; its result is dropped", job)
        elif exc is None:
            try:
                packed = None if result is None else self._packb(result)
            except Exception as pack_exc:
                exc = TypeError(f"handler result cannot be packed: {pack_exc}")
            else:
                self._acks.append([job.partition, job.id, job.token, packed])
        if exc is not None and not job.lock_lost:
            reason = failure_reason(exc)
            self._fails.append([job.partition, job.id, job.token, reason,
                                failure_stacktrace(exc)])
            log.info("job %s in %s failed (attempt %d): %s", job.id, job.partition,
                     job.attempts_started, reason)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Scheduled before the slot event wakes a pull loop, so the ack
            # frame takes the free slot (ack-and-fetch) rather than a new PULL.
            asyncio.get_running_loop().call_soon(self._flush)
        self._release(1)

    # -- acks ------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        acks, self._acks = self._acks, []
        fails, self._fails = self._fails, []
        if acks:
            # Reserve free slots now, before a woken pull loop can take them,
            # so that the refill rides on this ACK (ack-and-fetch). As many as
            # this batch frees, not all: the reply waits for the broker's
            # commit, and a broker slow to commit (a checkpoint after a move)
            # would otherwise hold the whole worker idle meanwhile.
            pool = self._reserve(min(self._free, len(acks))) if not self._closing else 0
            self._spawn(self._send_acks(acks, pool))
        if fails:
            self._spawn(self._send_fails(fails))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._ack_tasks.add(task)
        task.add_done_callback(self._ack_tasks.discard)

    async def _send_acks(self, items: list[list[Any]], pool: int) -> None:
        """ACK `items`; the first frame to a broker with our queues carries a
        pull for the `pool` slots reserved by `_flush`."""
        reserved: dict[str, int] = {}
        left = [pool]

        def make_args(bid: str, sub: list[Any], rnd: int) -> Any:
            args: dict[str, Any] = {"items": sub}
            if rnd > 0 and (left[0] or reserved):
                # Items to resend (a frozen or moved queue) keep this call
                # going for rounds; slots whose pull never went out (or whose
                # frame failed) must not idle the worker meanwhile (seen as a
                # collapse of throughput during and after a scale out).
                self._release(left[0] + sum(reserved.values()))
                left[0] = 0
                reserved.clear()
            if rnd == 0 and left[0] and not self._closing:
                queues = self._queues_on(bid)
                if queues:
                    n, left[0] = left[0], 0
                    reserved[bid] = n
                    args["pull"] = {"queues": queues, "count": n, "lock_ms": self.lock_ms}
            return args

        def parse(bid: str, reply: Any) -> list[Any]:
            if isinstance(reply, dict):
                n = reserved.pop(bid, 0)
                self._release(n - self._dispatch(bid, reply.get("jobs") or []))
                acks: list[Any] = reply.get("acks") or []
                return acks
            result: list[Any] = reply
            return result

        try:
            outcomes = await self._cluster.bulk(protocol.ACK, items, _queue_of, make_args, parse)
        finally:
            self._release(left[0] + sum(reserved.values()))
        self.completed += _report("ack", items, outcomes)

    async def _send_fails(self, items: list[list[Any]]) -> None:
        outcomes = await self._cluster.bulk(protocol.FAIL, items, _queue_of, _items_args)
        self.failed += _report("fail", items, outcomes)

    # -- locks -------------------------------------------------------------------------

    async def _extend_loop(self) -> None:
        interval = self.lock_ms / 2000
        while True:
            await asyncio.sleep(interval)
            jobs = list(self._running)
            if not jobs:
                continue
            items = [[j.partition, j.id, j.token, self.lock_ms] for j in jobs]
            outcomes = await self._cluster.bulk(protocol.EXTEND, items, _queue_of, _items_args)
            for job, outcome in zip(jobs, outcomes, strict=True):
                if isinstance(outcome, LockLostError):
                    job.lock_lost = True
                    log.warning("%r lost its lock; its result will be dropped", job)
                elif isinstance(outcome, BaseException):
                    log.warning("extending the lock of %r failed: %s", job, outcome)


def _report(what: str, items: list[list[Any]], outcomes: list[Any]) -> int:
    """Log each ACK/FAIL that did not land (it will be redelivered); count the rest."""
    ok = 0
    for item, outcome in zip(items, outcomes, strict=True):
        if isinstance(outcome, LockLostError):
            log.warning("%s of job %s in %s: lock lost, result dropped", what, item[1], item[0])
        elif isinstance(outcome, BaseException):
            log.error("%s of job %s in %s failed: %s (it will be redelivered)",
                      what, item[1], item[0], outcome)
        else:
            ok += 1
    return ok


def _items_args(_bid: str, sub: list[Any], _rnd: int) -> Any:
    return {"items": sub}


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
