"""A blocking facade over the asyncio client, for Django/Flask views and scripts.

    import shardq.sync

    client = shardq.sync.connect("http://127.0.0.1:7070")
    client.queue("emails").add("send", {"to": "a@b"})
    client.close()

`connect` starts one event loop in a background thread and the async client
on it; every call is sent to that loop (`run_coroutine_threadsafe`) and
waits for its answer. Calls are safe from any number of threads at once,
and adds from many threads meet in the async client's batcher, so they go
out in bulk frames exactly as concurrent `await q.add(...)` do. A call must
not be made from the facade's own loop (a handler of an async worker on it
would wait for itself): that raises RuntimeError.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

if TYPE_CHECKING:
    from shardq.client import Client, Queue

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_CALL_TIMEOUT_S = 120.0  # beyond the client's own retry budget


class SyncClient:
    """The blocking client; make it with `shardq.sync.connect`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 client: Client, call_timeout: float) -> None:
        self._loop = loop
        self._thread = thread
        self._client = client
        self._timeout = call_timeout
        self._queues: dict[str, SyncQueue] = {}
        self._lock = threading.Lock()
        self._closed = False

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run a coroutine on the facade's loop and wait for its result.

        Raises:
            RuntimeError: the client is closed, or called from its own loop.
            TimeoutError: no answer within the call timeout (the call is cancelled).
        """
        if self._closed:
            coro.close()
            raise RuntimeError("the shardq.sync client is closed")
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise RuntimeError("shardq.sync called from its own event loop; use the async API")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(self._timeout)
        except FutureTimeout:
            fut.cancel()
            raise TimeoutError(f"no answer within {self._timeout} s") from None

    def queue(self, name: str) -> SyncQueue:
        """The blocking `Queue` of that name (cached)."""
        with self._lock:
            q = self._queues.get(name)
            if q is None:
                q = self._queues[name] = SyncQueue(self, self._client.queue(name))
            return q

    def add_flow(self, flow: dict[str, Any], *, timeout_ms: int = 30_000) -> str:
        """`Client.add_flow`, blocking."""
        return self.run(self._client.add_flow(flow, timeout_ms=timeout_ms))

    def declare_queue(self, name: str, partitions: int) -> None:
        """`Client.declare_queue`, blocking."""
        self.run(self._client.declare_queue(name, partitions))

    def close(self) -> None:
        """Close the async client, stop the loop and join its thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(
                self._timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self._timeout)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _blocking(fn: Callable[Concatenate[Queue, P], Coroutine[Any, Any, R]]
              ) -> Callable[Concatenate[SyncQueue, P], R]:
    """The blocking twin of an async `Queue` method (same arguments, docs)."""
    def method(self: SyncQueue, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._sync.run(fn(self._queue, *args, **kwargs))

    method.__name__ = method.__qualname__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method


def _queue_class() -> type[Queue]:
    from shardq.client import Queue

    return Queue


_Q = _queue_class()


class SyncQueue:
    """A `Queue` whose methods block (see `shardq.client.Queue` for each)."""

    __slots__ = ("_queue", "_sync", "name")

    def __init__(self, sync: SyncClient, queue: Queue) -> None:
        self._sync = sync
        self._queue = queue
        self.name = queue.name

    def __repr__(self) -> str:
        return f"SyncQueue({self.name!r})"

    def partitions(self) -> list[str]:
        return self._queue.partitions()

    def add(self, name: str, data: Any = None, **options: Any) -> str:
        """`Queue.add` (same options), blocking; adds from many threads share
        bulk frames."""
        return self._sync.run(self._queue.add(name, data, **options))

    add_bulk = _blocking(_Q.add_bulk)
    get_job = _blocking(_Q.get_job)
    counts = _blocking(_Q.counts)
    pause = _blocking(_Q.pause)
    resume = _blocking(_Q.resume)
    drain = _blocking(_Q.drain)
    obliterate = _blocking(_Q.obliterate)
    get_logs = _blocking(_Q.get_logs)
    dlq_list = _blocking(_Q.dlq_list)
    dlq_retry = _blocking(_Q.dlq_retry)
    dlq_purge = _blocking(_Q.dlq_purge)
    set_rate_limit = _blocking(_Q.set_rate_limit)
    upsert_scheduler = _blocking(_Q.upsert_scheduler)
    list_schedulers = _blocking(_Q.list_schedulers)
    remove_scheduler = _blocking(_Q.remove_scheduler)
    # job management (client/jobs.py)
    get_jobs = _blocking(_Q.get_jobs)
    get_job_counts = _blocking(_Q.get_job_counts)
    retry_jobs = _blocking(_Q.retry_jobs)
    promote_jobs = _blocking(_Q.promote_jobs)
    clean = _blocking(_Q.clean)
    set_retention = _blocking(_Q.set_retention)
    retry_job = _blocking(_Q.retry_job)
    remove_job = _blocking(_Q.remove_job)
    promote_job = _blocking(_Q.promote_job)
    update_job_data = _blocking(_Q.update_job_data)
    change_job_priority = _blocking(_Q.change_job_priority)
    change_job_delay = _blocking(_Q.change_job_delay)
    discard_job = _blocking(_Q.discard_job)


def connect(target: str | Sequence[str], token: str | None = None, *,
            call_timeout: float = DEFAULT_CALL_TIMEOUT_S, **options: Any) -> SyncClient:
    """Connect like `shardq.connect` (same arguments), with the client on a
    loop of its own in a daemon thread.

    Args:
        target, token, options: as `shardq.connect`.
        call_timeout: seconds a blocking call waits before TimeoutError.

    Raises:
        ShardqError: the cluster could not be reached (the thread is stopped).
    """
    from shardq.client import connect as aconnect

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="shardq-sync", daemon=True)
    thread.start()
    try:
        client = asyncio.run_coroutine_threadsafe(
            aconnect(target, token, **options), loop).result(call_timeout)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(call_timeout)
        loop.close()
        raise
    return SyncClient(loop, thread, client, call_timeout)
