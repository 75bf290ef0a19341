"""Routing layer: one lazy connection per broker, retries, bulk fan-out.

Above the connection layer (which only knows one broker) and below the
Queue/Worker API (which only knows queue names). `call()` sends one
request for one queue and follows the docs/design.md §4 retry rules; `bulk()` sends
a bulk op whose items may belong to many queues and brokers, splits it by
owner, sends the frames in parallel and retries failed items alone (a
`MOVED` item is re-routed by itself, the rest of its frame stays done).

The connection factory is injected (`Connector`), so this layer and the
batching above it are unit-tested with in-memory fake channels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from shardq.errors import (
    BusyError,
    ConnectionClosedError,
    MovedError,
    OwnerUnavailableError,
    ServerError,
    ShardqError,
    TryAgainError,
    error_from_wire,
)

from .retry import Budget, Decision, RetryPolicy
from .topology import TopologyManager

log = logging.getLogger("shardq.client")

# Errors that mean "the link, not the broker's answer": reconnect and resend.
# OwnerUnavailableError: the owner is up but cannot serve (lost storage): wait
# for the map to change as for a dead owner, then UnavailableError.
LINK_ERRORS = (OSError, TimeoutError, ConnectionClosedError, OwnerUnavailableError)


class Channel(Protocol):
    """What the routing layer needs from a connection (see connection.py)."""

    addr: str
    broker_id: str
    max_epoch: int

    @property
    def closed(self) -> bool: ...

    def request(self, op: str, args: Any, timeout: float | None = None) -> asyncio.Future[Any]: ...

    async def wait_writable(self) -> None: ...

    async def drain_close(self) -> None: ...

    async def aclose(self) -> None: ...


Connector = Callable[[str], Awaitable[Channel]]
"""Open a channel to `addr` (HELLO done); raises OSError/TimeoutError/AuthError."""

ArgsBuilder = Callable[[str, list[Any], int], Any]
"""(broker_id, items, round) -> request args for one frame."""

ReplyParser = Callable[[str, Any], list[Any]]
"""(broker_id, reply body) -> the per-item list (for replies that wrap it)."""


class Cluster:
    """Connections to every broker, and requests routed by queue name."""

    def __init__(self, topology: TopologyManager, connector: Connector,
                 policy: RetryPolicy | None = None) -> None:
        self.topology = topology
        self.policy = policy or RetryPolicy()
        self._connector = connector
        # Keyed by (broker id, lane). Lane "" is the shared pipelined
        # connection; a worker parks its long-poll PULLs on a lane of its own
        # so that closing the worker can drop them at once (see worker.py).
        self._conns: dict[tuple[str, str], Channel] = {}
        self._opening: dict[tuple[str, str], asyncio.Task[Channel]] = {}
        self._closed_lanes: set[str] = set()
        self._closed = False

    # -- connections -----------------------------------------------------------

    def adopt(self, broker_id: str, conn: Channel) -> bool:
        """Register an already open channel (a seed asked for TOPOLOGY).

        Returns False when an open channel to that broker exists already;
        the caller then closes `conn`.
        """
        old = self._conns.get((broker_id, ""))
        if self._closed or (old is not None and not old.closed):
            return False
        self._conns[(broker_id, "")] = conn
        return True

    def open_channels(self) -> list[Channel]:
        return [c for (_, lane), c in self._conns.items() if not lane and not c.closed]

    async def connection(self, broker_id: str, addr: str, lane: str = "") -> Channel:
        """The open channel to `broker_id` at `addr`, opening it if needed.

        Concurrent callers share one connect attempt.
        """
        key = (broker_id, lane)
        conn = self._conns.get(key)
        if conn is not None and not conn.closed and conn.addr == addr:
            return conn
        if self._closed or lane in self._closed_lanes:
            raise ConnectionClosedError("client is closed" if self._closed else "lane is closed")
        task = self._opening.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(key, addr, conn))
            self._opening[key] = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                # The connect was abandoned by close(), not this caller.
                raise ConnectionClosedError("closed while connecting") from None
            raise

    async def _open(self, key: tuple[str, str], addr: str, old: Channel | None) -> Channel:
        try:
            if old is not None and not old.closed:
                await old.aclose()  # the broker now lives at another address
            conn = await self._connector(addr)
            if self._closed or key[1] in self._closed_lanes:
                await conn.aclose()
                raise ConnectionClosedError("closed while connecting")
            self._conns[key] = conn
            return conn
        finally:
            self._opening.pop(key, None)

    def lane_closed(self, lane: str) -> bool:
        return self._closed or lane in self._closed_lanes

    async def close_lane(self, lane: str) -> None:
        """Close a lane's connections for good (half-close: requests already
        sent still get their answers, new ones fail at once)."""
        self._closed_lanes.add(lane)
        for key in [k for k in self._opening if k[1] == lane]:
            self._opening[key].cancel()
        conns = [self._conns.pop(k) for k in [k for k in self._conns if k[1] == lane]]
        await asyncio.gather(*(c.drain_close() for c in conns))

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._opening.values()):
            task.cancel()
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.aclose()

    # -- retries ---------------------------------------------------------------

    async def _apply(self, decision: Decision) -> None:
        if decision.refresh:
            await self.topology.refresh()
        if decision.delay:
            await asyncio.sleep(decision.delay)

    async def call(self, queue: str, op: str, args: Any, timeout: float | None = None) -> Any:
        """Send one request for `queue` to its owner, with docs/design.md §4 retries.

        Raises:
            MovedError: past the redirect budget.
            TryAgainError / BusyError / UnavailableError: past their budgets.
            ServerError: any other error answer (AUTH, BAD_REQUEST, ...), at once.
        """
        budget = Budget(self.policy)
        while True:
            route = self.topology.route(queue)
            if route is None:
                # No owner known (not bootstrapped yet, or a forgotten
                # broker): like an unreachable owner, refresh and wait.
                no_owner = ConnectionClosedError(f"no broker owns queue {queue!r}")
                await self._apply(budget.unreachable("?", no_owner))
                continue
            bid, addr = route
            try:
                conn = await self.connection(bid, addr)
                return await conn.request(op, args, timeout)
            except MovedError as exc:
                stale = self.topology.is_stale(exc)
                self.topology.patch(exc)
                decision = budget.moved(exc, bid, stale)
            except TryAgainError as exc:
                decision = budget.tryagain(exc)
            except BusyError as exc:
                decision = budget.busy(exc)
            except LINK_ERRORS as exc:
                if self._closed:
                    raise
                decision = budget.unreachable(bid, exc)
            await self._apply(decision)

    async def call_broker(self, broker_id: str, op: str, args: Any,
                          timeout: float | None = None, lane: str = "") -> Any:
        """Send one request to a given broker, retrying only link failures.

        Raises:
            UnavailableError: the broker stayed unreachable past the budget,
                or the topology no longer knows it.
            ServerError: any error answer, as is (the caller handles MOVED).
        """
        budget = Budget(self.policy)
        while True:
            addr = self.topology.topo.addr_of(broker_id)
            try:
                if addr is None:
                    raise ConnectionClosedError(f"broker {broker_id} is not in the topology")
                conn = await self.connection(broker_id, addr, lane)
                return await conn.request(op, args, timeout)
            except LINK_ERRORS as exc:
                if self.lane_closed(lane):
                    raise
                await self._apply(budget.unreachable(broker_id, exc))

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
        budget = Budget(self.policy)
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
        conn = await self.connection(bid, addr)
        await conn.wait_writable()
        reply = await conn.request(op, make_args(bid, items, rnd))
        result = parse(bid, reply) if parse is not None else reply
        if not isinstance(result, list) or len(result) != len(items):
            raise ServerError(f"{op} reply from {bid} is not aligned with its {len(items)} items")
        return result

    async def _settle(self, rnd: _Round, budget: Budget, out: list[Any]) -> list[int]:
        """Charge this round's failures to the budget; return the items to resend."""
        todo: list[int] = []
        decisions: list[Decision] = []
        for kind, entries in rnd.retry.items():
            exc, bid = entries[0][1], entries[0][2]
            try:
                if kind is MovedError:
                    assert isinstance(exc, MovedError)
                    stale = self.topology.is_stale(exc)
                    for _, err, _ in entries:
                        assert isinstance(err, MovedError)
                        self.topology.patch(err)
                    decisions.append(budget.moved(exc, bid, stale))
                elif kind is TryAgainError:
                    assert isinstance(exc, TryAgainError)
                    decisions.append(budget.tryagain(exc))
                elif kind is BusyError:
                    assert isinstance(exc, BusyError)
                    decisions.append(budget.busy(exc))
                else:
                    decisions.append(budget.unreachable(bid, exc))
            except ShardqError as final:
                for i, err, _ in entries:
                    out[i] = err if kind is not ConnectionClosedError else final
                continue
            todo.extend(i for i, _, _ in entries)
        if todo:
            await self._apply(Decision(delay=max(d.delay for d in decisions),
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
        if isinstance(exc, MovedError | TryAgainError | BusyError):
            kind: type = type(exc)
        elif isinstance(exc, LINK_ERRORS):
            kind = ConnectionClosedError
        else:
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
