"""Routing layer: one lazy connection per broker, retries, bulk fan-out.

Above the connection layer (which only knows one broker) and below the
Queue/Worker API (which only knows queue names). Links come from the
connection pool (pool.py); every resend follows the one retry loop
(retrying.py, docs/design.md §4). `call()` sends one request for one queue; `bulk()` sends
a bulk op whose items may belong to many queues and brokers, splits it by
owner, sends the frames in parallel and retries failed items alone (a
`MOVED` item is re-routed by itself, the rest of its frame stays done).

The connection factory is injected (`Connector`), so this layer and the
batching above it are unit-tested with in-memory fake channels.

LINK_ERRORS, Channel and Connector are re-exported from retrying.py and
pool.py, where they are defined.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from shardq.errors import (
    ConnectionClosedError,
    MovedError,
    ServerError,
    ShardqError,
    error_from_wire,
)

from .pool import Channel, ConnectionPool, Connector
from .retry import Budget, Decision, RetryPolicy
from .retrying import LINK_ERRORS, RETRYABLE, RetryLoop, retry_kind
from .topology import TopologyManager

__all__ = ["LINK_ERRORS", "ArgsBuilder", "Channel", "Cluster", "Connector", "ReplyParser"]

ArgsBuilder = Callable[[str, list[Any], int], Any]
"""(broker_id, items, round) -> request args for one frame."""

ReplyParser = Callable[[str, Any], list[Any]]
"""(broker_id, reply body) -> the per-item list (for replies that wrap it)."""


class Cluster:
    """Connections to every broker, and requests routed by queue name."""

    def __init__(self, topology: TopologyManager, connector: Connector,
                 policy: RetryPolicy | None = None) -> None:
        self.topology = topology
        self.retries = RetryLoop(topology, policy)
        self.policy = self.retries.policy
        # Keyed by (broker id, lane). Lane "" is the shared pipelined
        # connection; a worker parks its long-poll PULLs on a lane of its own
        # so that closing the worker can drop them at once (see worker.py).
        self.pool = ConnectionPool(connector)

    # -- connections -----------------------------------------------------------

    @property
    def _closed(self) -> bool:
        return self.pool.closed

    def adopt(self, broker_id: str, conn: Channel) -> bool:
        """Register an already open channel (a seed asked for TOPOLOGY).

        Returns False when an open channel to that broker exists already;
        the caller then closes `conn`.
        """
        return self.pool.adopt(broker_id, conn)

    def open_channels(self) -> list[Channel]:
        return self.pool.open_channels()

    async def connection(self, broker_id: str, addr: str, lane: str = "") -> Channel:
        """The open channel to `broker_id` at `addr`, opening it if needed.

        Concurrent callers share one connect attempt.
        """
        return await self.pool.get(broker_id, addr, lane)

    def lane_closed(self, lane: str) -> bool:
        return self.pool.lane_closed(lane)

    async def close_lane(self, lane: str) -> None:
        """Close a lane's connections for good (half-close: requests already
        sent still get their answers, new ones fail at once)."""
        await self.pool.close_lane(lane)

    async def aclose(self) -> None:
        await self.pool.aclose()

    def broker_route(self, broker_id: str) -> tuple[str, str] | None:
        """(broker_id, its address), or None once the topology forgot it."""
        addr = self.topology.topo.addr_of(broker_id)
        return None if addr is None else (broker_id, addr)

    # -- single requests ---------------------------------------------------------

    async def call(self, queue: str, op: str, args: Any, timeout: float | None = None) -> Any:
        """Send one request for `queue` to its owner, with docs/design.md §4
        retries (client/retrying.py).

        Raises:
            MovedError: past the redirect budget.
            TryAgainError / BusyError / UnavailableError: past their budgets.
            ServerError: any other error answer (AUTH, BAD_REQUEST, ...), at once.
        """
        route = self.topology.route(queue)
        failed: tuple[BaseException, str] | None = None
        if route is not None:  # the first attempt inline: most calls need no other
            try:
                conn = await self.pool.get(*route)
                return await conn.request(op, args, timeout)
            except RETRYABLE as exc:
                failed = (exc, route[0])

        async def send(bid: str, addr: str) -> Any:
            conn = await self.pool.get(bid, addr)
            return await conn.request(op, args, timeout)

        return await self.retries.run(lambda: self.topology.route(queue), send,
                                      what=f"queue {queue!r}", closed=lambda: self._closed,
                                      failed=failed)

    async def call_broker(self, broker_id: str, op: str, args: Any,
                          timeout: float | None = None, lane: str = "") -> Any:
        """Send one request to a given broker, retrying only link failures.

        Raises:
            UnavailableError: the broker stayed unreachable past the budget,
                or the topology no longer knows it.
            ServerError: any error answer, as is (the caller handles MOVED).
        """
        async def send(bid: str, addr: str) -> Any:
            conn = await self.pool.get(bid, addr, lane)
            return await conn.request(op, args, timeout)

        return await self.retries.run(lambda: self.broker_route(broker_id), send,
                                      what=f"broker {broker_id}", retry=LINK_ERRORS,
                                      closed=lambda: self.lane_closed(lane))

    # -- bulk --------------------------------------------------------------------

    async def bulk(self, op: str, items: Sequence[Any], queue_of: Callable[[Any], str],
                   make_args: ArgsBuilder, parse: ReplyParser | None = None) -> list[Any]:
        """Send a bulk op; return one outcome per item, aligned with `items`.

        An outcome is the item's reply value, or the exception that item
        finally ended with (it is returned, not raised, so one bad item
        does not hide the others' results). Items are grouped by their
        queue's owner; each round sends one frame per owner in parallel and
        carries only the items still to do into the next round.
        """
        out: list[Any] = [None] * len(items)
        todo = list(range(len(items)))
        budget = self.retries.budget()
        rnd = 0
        while todo:
            if self._closed:
                for i in todo:
                    out[i] = ConnectionClosedError("client is closed")
                break
            groups, unroutable = self._group(items, todo, queue_of)
            retry = _Round()
            if unroutable:
                no_owner = ConnectionClosedError("no broker owns the queue")
                retry.frame_failed("?", unroutable, no_owner, out)
            sends = [
                self._send_frame(op, bid, addr, [items[i] for i in idxs], make_args, parse, rnd)
                for bid, (addr, idxs) in groups.items()
            ]
            results = await asyncio.gather(*sends, return_exceptions=True)
            for (bid, (_, idxs)), res in zip(groups.items(), results, strict=True):
                if isinstance(res, BaseException):
                    if isinstance(res, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                        raise res
                    retry.frame_failed(bid, idxs, res, out)
                else:
                    budget.reached()
                    retry.frame_answered(bid, idxs, res, out)
            todo = await self._settle(retry, budget, out)
            rnd += 1
        return out

    def _group(self, items: Sequence[Any], todo: list[int], queue_of: Callable[[Any], str],
               ) -> tuple[dict[str, tuple[str, list[int]]], list[int]]:
        groups: dict[str, tuple[str, list[int]]] = {}
        unroutable: list[int] = []
        route_of = self.topology.route
        last_queue: str | None = None
        route: tuple[str, str] | None = None
        for i in todo:
            queue = queue_of(items[i])
            # Bulk items mostly share a queue (ADD always does): route once per run.
            if queue != last_queue:
                last_queue, route = queue, route_of(queue)
            if route is None:
                unroutable.append(i)
                continue
            group = groups.get(route[0])
            if group is None:
                groups[route[0]] = (route[1], [i])
            else:
                group[1].append(i)
        return groups, unroutable

    async def _send_frame(self, op: str, bid: str, addr: str, items: list[Any],
                          make_args: ArgsBuilder, parse: ReplyParser | None, rnd: int) -> list[Any]:
        conn = await self.pool.get(bid, addr)
        await conn.wait_writable()
        reply = await conn.request(op, make_args(bid, items, rnd))
        result = parse(bid, reply) if parse is not None else reply
        if not isinstance(result, list) or len(result) != len(items):
            raise ServerError(f"{op} reply from {bid} is not aligned with its {len(items)} items")
        return result

    async def _settle(self, rnd: _Round, budget: Budget, out: list[Any]) -> list[int]:
        """Charge this round's failures to the budget, one charge per kind
        (client/retrying.py decides); return the items to resend."""
        todo: list[int] = []
        decisions: list[Decision] = []
        for kind, entries in rnd.retry.items():
            _, exc, bid = entries[0]
            try:
                decisions.append(self.retries.decide(budget, exc, bid))
            except ShardqError as final:
                for i, err, _ in entries:
                    out[i] = err if kind is not ConnectionClosedError else final
                continue
            finally:
                for _, err, _ in entries[1:]:
                    if isinstance(err, MovedError):
                        self.retries.follow(err)  # every moved slot, not only the first
            todo.extend(i for i, _, _ in entries)
        if todo:
            await self.retries.apply(Decision(delay=max(d.delay for d in decisions),
                                              refresh=any(d.refresh for d in decisions)))
        todo.sort()
        return todo


class _Round:
    """Sorts one bulk round's failures into retry kinds."""

    __slots__ = ("retry",)

    def __init__(self) -> None:
        # kind -> [(item index, error, broker sent to)]; link failures use
        # ConnectionClosedError as their kind.
        self.retry: dict[type, list[tuple[int, BaseException, str]]] = {}

    def _classify(self, i: int, exc: BaseException, bid: str, out: list[Any]) -> None:
        kind = retry_kind(exc)
        if kind is None:
            out[i] = exc
            return
        self.retry.setdefault(kind, []).append((i, exc, bid))

    def frame_failed(self, bid: str, idxs: list[int], exc: BaseException, out: list[Any]) -> None:
        for i in idxs:
            self._classify(i, exc, bid, out)

    def frame_answered(self, bid: str, idxs: list[int], values: list[Any], out: list[Any]) -> None:
        for i, v in zip(idxs, values, strict=True):
            # Item values are ids (str) or nil; an error item is [code, body].
            if v.__class__ is list and len(v) == 2 and isinstance(v[0], str):
                self._classify(i, error_from_wire(v[0], v[1]), bid, out)
            else:
                out[i] = v
