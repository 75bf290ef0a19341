"""`connect()` and the `Client`: topology, connections, queues and workers.

    client = await shardq.connect("http://127.0.0.1:7070")        # coordinator
    client = await shardq.connect("127.0.0.1:7101,127.0.0.1:7102")  # brokers
    async with client: ...

With a coordinator URL the topology comes from `GET {url}/topology`; with
broker addresses it comes from the first reachable broker's `TOPOLOGY`
answer. Either way later refreshes fall back to the brokers when the
coordinator is down (docs/design.md §6: the coordinator is not on the data path).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import msgpack

from shardq import coordinator_http, protocol
from shardq.errors import (
    AuthError,
    BadRequestError,
    BusyError,
    ShardqError,
    TlsError,
    UnavailableError,
)
from shardq.router import Topology
from shardq.tls import client_context

from .batcher import DEFAULT_MAX_ITEMS, AddBatcher
from .cluster import LINK_ERRORS, Channel, Cluster, Connector
from .connection import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_PING_INTERVAL_S,
    DEFAULT_PING_TIMEOUT_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    Connection,
)
from .events import Subscription
from .flow import add_flow
from .pool import dialer
from .queue import Queue
from .retry import RetryPolicy
from .topology import TopologyManager, TopologySource
from .worker import Handler, Worker

log = logging.getLogger("shardq.client")


class Client:
    """A connection to a shardq cluster. Make one with `await shardq.connect(...)`."""

    def __init__(self, *, coordinator: str | None = None, seeds: Sequence[str] = (),
                 token: str | None = None, client_name: str | None = None,
                 policy: RetryPolicy | None = None,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 max_batch: int = DEFAULT_MAX_ITEMS,
                 connector: Connector | None = None,
                 ping_interval: float = DEFAULT_PING_INTERVAL_S,
                 ping_timeout: float = DEFAULT_PING_TIMEOUT_S,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """Prefer `connect()`, which also loads the topology before returning."""
        self.coordinator = coordinator.rstrip("/") if coordinator else None
        self.seeds = list(seeds)
        self.token = token
        self._client_name = client_name or f"shardq-py/{os.getpid()}"
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._http: httpx.AsyncClient | None = None
        if self.coordinator:
            self._http = coordinator_http.async_client(self.coordinator, token,
                                                       timeout_s=connect_timeout,
                                                       ssl_context=ssl_context)
        self._open = dialer(token=token, client_name=self._client_name, on_epoch=self._on_epoch,
                            connect_timeout=connect_timeout, request_timeout=request_timeout,
                            ping_interval=ping_interval, ping_timeout=ping_timeout,
                            ssl_context=ssl_context)
        sources: list[TopologySource] = [self._from_brokers]
        if self.coordinator:
            sources.insert(0, self._from_coordinator)
        self._topology = TopologyManager(Topology.empty(), sources)
        self._cluster = Cluster(self._topology, connector or self._open, policy)
        self._packb: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
        self._batcher = AddBatcher(self._send_add, max_batch)
        self._queues: dict[str, Queue] = {}
        self._workers: list[Worker] = []
        self._loading = False
        self._closed = False

    # -- public API --------------------------------------------------------------

    def queue(self, name: str) -> Queue:
        """The `Queue` named `name` (cached: calling again is free)."""
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = Queue(self, name)
        return q

    def worker(self, queues: str | Sequence[str], handler: Handler, *, concurrency: int = 1,
               lock_ms: int = protocol.DEFAULT_LOCK_MS, wait_ms: int = 5000,
               processes: int = 0) -> Worker:
        """A `Worker` running `handler` on jobs of `queues` (one name or a list).

        With `processes=N`, `handler` is a plain (sync) top-level function,
        run in a pool of N processes (`concurrency` jobs at a time), so
        CPU-bound work does not block the event loop; see `Worker`.
        Call `await worker.run()` to start it and `await worker.close()` to stop.
        """
        names = [queues] if isinstance(queues, str) else list(queues)
        worker = Worker(self, names, handler, concurrency=concurrency, lock_ms=lock_ms,
                        wait_ms=wait_ms, processes=processes)
        self._workers.append(worker)
        return worker

    async def events(self, queue: str) -> Subscription:
        """Subscribe to a queue's job events; returns once the subscription
        is live (every event after that is delivered).

        The subscription follows the queue across brokers and handoffs and
        resumes by sequence number, so no event is missed unless the owner's
        ring (the last 5000 events per queue) overflowed or the owner
        restarted meanwhile (`sub.gaps` counts those). See `Subscription`.

        Raises:
            UnavailableError / TryAgainError: no owner answered within the budgets.
        """
        sub = Subscription(self, queue)
        await sub._start()
        return sub

    @property
    def topology(self) -> Topology:
        """The topology this client routes with (a live object; do not mutate)."""
        return self._topology.topo

    @property
    def add_frames_sent(self) -> int:
        """How many ADD frames the add batcher has sent (for tests and stats)."""
        return self._batcher.frames

    async def declare_queue(self, name: str, partitions: int) -> None:
        """Store queue `name` as `partitions` queues `name~0..name~P-1`, spread
        over brokers by their slots (docs/design.md §7); adds pick a partition by
        `partition_key` (else job id), workers and `counts` fan out.

        Raises:
            ShardqError: no coordinator (connect by URL), or it refused.
        """
        await self._coordinator_post(f"/queues/{name}/declare", {"partitions": partitions},
                                     f"declare_queue({name!r})")
        await self.refresh_topology()

    async def add_flow(self, flow: dict[str, Any], *, timeout_ms: int = 30_000) -> str:
        """Add a parent job and its children, all or nothing; return the parent's id.

        `flow` is `{"queue", "name", "data", "opts"?, "children": [{"queue",
        "name", "data", "opts"?}, ...]}`; `opts` takes `add`'s option names
        (`job_id`, `priority`, `delay_ms`, `attempts`, `backoff`,
        `remove_on_complete`, `remove_on_fail`, `partition_key`), and a child's
        also `ignore_failure` (its failure counts as done, value None).
        Children may live in any queue, on any broker. The parent runs once
        every child completed; its handler reads their results with
        `await job.children_values()` -> `{f"{queue}:{job_id}": result}`. A
        child that fails for good fails the parent (reason names the child).
        One level of children (a child cannot have children).

        Args:
            timeout_ms: the creation deadline: a flow not fully written by
                then (this client died, a broker was down) is removed by the
                brokers shortly after, so nothing of it runs.

        Raises:
            ValueError: a malformed flow.
            ShardqError: the flow could not be written (nothing of it will run).
        """
        return await add_flow(self, flow, timeout_ms)
    async def set_tenant_rate_limit(self, tenant: str, queues: Sequence[str] = (), *,
                                    max: int | None, per_ms: int = 1000) -> dict[str, Any]:
        """Let at most `max` jobs of `queues` start in any `per_ms` window,
        cluster-wide, whichever brokers own them (docs/design.md §11); `max=None`
        removes the limit. The coordinator leases each owner a share, by
        demand, in its heartbeats; it is never asked per job. Takes effect
        within about a heartbeat (1 s); see docs/features-sched.md for the
        bound on overshoot and what happens while the coordinator is down.

        Raises:
            ShardqError: no coordinator (connect by URL).
            BadRequestError: it refused the arguments.
            UnavailableError: it could not be reached.
        """
        body = {"queues": list(queues), "max": max, "per_ms": per_ms}
        answer: dict[str, Any] = await self._coordinator_post(
            f"/tenants/{tenant}/rate_limit", body, f"set_tenant_rate_limit({tenant!r})")
        return answer

    async def _coordinator_post(self, path: str, body: dict[str, Any], what: str) -> Any:
        if not self.coordinator or self._http is None:
            raise ShardqError(f"{what} needs the coordinator: connect with its URL")
        try:
            resp = await self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise UnavailableError("coordinator", str(exc)) from exc
        if resp.status_code >= 400:
            raise BadRequestError(f"{what}: {resp.text}")
        return resp.json()

    async def refresh_topology(self) -> None:
        """Fetch the whole topology now."""
        await self._topology.refresh()

    async def aclose(self) -> None:
        """Stop workers, let adds in flight finish (5 s at most), close everything.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            await worker.close()
        self._batcher.flush()
        await self._batcher.aclose(grace=5.0)
        await self._topology.aclose()
        await self._cluster.aclose()
        if self._http is not None:
            await self._http.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals used by Queue / Worker ----------------------------------------------

    def _call(self, queue: str, op: str, args: Any, timeout: float | None = None) -> Awaitable[Any]:
        return self._cluster.call(queue, op, args, timeout)

    def _send_add(self, queue: str, items: list[Any]) -> Awaitable[list[Any]]:
        def make_args(_bid: str, sub: list[Any], _rnd: int) -> Any:
            return {"queue": queue, "jobs": sub}

        return self._cluster.bulk(protocol.ADD, items, lambda _item: queue, make_args)

    def _on_epoch(self, _conn: Connection, epoch: int) -> None:
        if not self._loading:  # the first load is fetching the map anyway
            self._cluster.retries.saw_epoch(epoch)

    # -- topology sources -------------------------------------------------------------

    async def _from_coordinator(self) -> Topology:
        assert self._http is not None
        try:
            resp = await self._http.get("/topology")
            resp.raise_for_status()
            body = resp.json()
        except httpx.HTTPError as exc:
            tls_reason = _tls_failure(exc)
            if tls_reason is not None:
                raise TlsError(self.coordinator or "coordinator", tls_reason) from None
            raise UnavailableError("coordinator", str(exc) or type(exc).__name__) from exc
        topo: Topology = Topology.from_dict(body)
        return topo

    async def _from_brokers(self) -> Topology:
        """TOPOLOGY from the freshest open connection, else any reachable broker."""
        conns = sorted(self._cluster.open_channels(), key=lambda c: -c.max_epoch)
        last: BaseException | None = None
        for conn in conns:
            try:
                return await self._ask_topology(conn)
            except LINK_ERRORS as exc:
                last = exc
        known = [b.addr for b in self._topology.topo.brokers.values()]
        for addr in dict.fromkeys([*known, *self.seeds]):
            try:
                conn = await self._open(addr)
            except (AuthError, TlsError):
                raise
            except (BusyError, *LINK_ERRORS) as exc:  # BUSY: its connection limit is full
                last = exc
                continue
            try:
                return await self._ask_topology(conn)
            finally:
                if not self._cluster.adopt(conn.broker_id, conn):
                    await conn.aclose()
        raise UnavailableError("any", f"no broker answered TOPOLOGY: {last}")

    async def _ask_topology(self, conn: Channel) -> Topology:
        reply = await conn.request(protocol.TOPOLOGY, {})
        if reply is None:
            # A broker with no map of its own is standalone: it owns every slot.
            topo: Topology = Topology.standalone(conn.broker_id, conn.addr)
            return topo
        parsed: Topology = Topology.from_dict(reply)
        return parsed

    async def _load(self) -> None:
        """The first topology; retried with backoff for the unavailable budget."""
        self._loading = True
        try:
            await self._load_first()
        finally:
            self._loading = False

    async def _load_first(self) -> None:
        budget = self._cluster.policy.unavailable_budget
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        delay = 0.05
        while True:
            errors: list[str] = []
            for source in self._topology.sources:
                try:
                    self._topology.replace(await source())
                    return
                except (UnavailableError, *LINK_ERRORS) as exc:
                    errors.append(str(exc))
            if loop.time() + delay > deadline:
                raise UnavailableError(self.coordinator or ",".join(self.seeds), "; ".join(errors))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


def _tls_failure(exc: BaseException) -> str | None:
    """The reason when an HTTP error is a failed TLS handshake (not retried)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return str(seen.reason or seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _parse_target(target: str | Sequence[str]) -> tuple[str | None, list[str]]:
    if isinstance(target, str):
        if target.startswith(("http://", "https://")):
            return target, []
        seeds = [a.strip() for a in target.split(",") if a.strip()]
    else:
        seeds = [a.strip() for a in target if a.strip()]
    if not seeds:
        raise ValueError("connect() needs a coordinator URL or at least one broker address")
    return None, seeds


async def connect(target: str | Sequence[str], token: str | None = None, *,
                  client_name: str | None = None,
                  request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                  connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                  policy: RetryPolicy | None = None,
                  ping_interval: float = DEFAULT_PING_INTERVAL_S,
                  ping_timeout: float = DEFAULT_PING_TIMEOUT_S,
                  ssl_ca: str | None = None, ssl_cert: str | None = None,
                  ssl_key: str | None = None,
                  ssl_context: ssl.SSLContext | None = None) -> Client:
    """Connect to a cluster and load its topology.

    Args:
        target: a coordinator URL (`http://host:7070`), or broker addresses
            as `"host:port,host:port"` or a list of `"host:port"`.
        token: the cluster's auth token, if brokers run with `--token`.
        client_name: how brokers see this client in HELLO (default `shardq-py/<pid>`).
        request_timeout: seconds before one request is given up and resent.
        connect_timeout: seconds for a TCP connect + HELLO (and coordinator HTTP calls).
        policy: retry budgets (docs/design.md §4).
        ping_interval: seconds of silence on a connection before it sends a
            PING (0: never); a pong later than `ping_timeout` seconds marks
            the link dead: it is closed, its requests are resent on a new one.
        ssl_ca: PEM CA file: talk TLS to brokers (and an `https://`
            coordinator) and verify their certificates against it.
        ssl_cert, ssl_key: a client certificate to present (mutual TLS).
        ssl_context: a ready `ssl.SSLContext` instead of the three above.

    Returns:
        A `Client`; use it as `async with await shardq.connect(...) as client:`.

    Raises:
        UnavailableError: no topology source answered within 5 s.
        AuthError: a broker refused the token.
        TlsError: the TLS handshake failed (certificate not trusted, or a
            cleartext broker).
        TlsConfigError: an ssl_* file cannot be used.
    """
    if ssl_context is None and (ssl_ca or ssl_cert):
        ssl_context = client_context(ssl_ca, ssl_cert, ssl_key)
    coordinator, seeds = _parse_target(target)
    client = Client(coordinator=coordinator, seeds=seeds, token=token, client_name=client_name,
                    policy=policy, request_timeout=request_timeout,
                    connect_timeout=connect_timeout, ping_interval=ping_interval,
                    ping_timeout=ping_timeout, ssl_context=ssl_context)
    try:
        await client._load()
    except BaseException:
        await client.aclose()
        raise
    return client
