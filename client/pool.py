"""The one connection pool: cached links to brokers, keyed by peer and lane.

Used by the client's routing layer (cluster.py), the coordinator's links to
brokers (coordinator/links.py) and broker-to-broker calls (broker/flows.py,
broker/handoff.py). Every link is opened by the pool's `Connector`, which
for real links is `dialer(...)`: TCP connect, HELLO with the token and a
client name, then idle pings (connection.py). So there is one dial, one
HELLO and one close path, whoever talks to a broker.

A key is whatever names the peer for its user (a broker id, or an address
when the user routes by address); `get` re-dials when the cached link broke
or when the peer now lives at another address. A lane separates traffic
that must not share a link: a worker's long-poll PULLs, an event
subscription's pushes. Closing a lane half-closes its links and refuses
new ones, so requests already sent still get their answers.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from shardq.errors import ConnectionClosedError

from .connection import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_PING_INTERVAL_S,
    DEFAULT_PING_TIMEOUT_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    EpochCallback,
    open_connection,
)


class Channel(Protocol):
    """What the pool's users need from a link (connection.py's `Connection`)."""

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


def dialer(*, token: str | None, client_name: str, on_epoch: EpochCallback | None = None,
           connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
           request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
           ping_interval: float = DEFAULT_PING_INTERVAL_S,
           ping_timeout: float = DEFAULT_PING_TIMEOUT_S,
           ssl_context: ssl.SSLContext | None = None) -> Connector:
    """The `Connector` for real links: `open_connection` with these settings
    (TLS with `ssl_context`, else the process's link context, shardq/tls.py)."""
    return functools.partial(open_connection, token=token, client_name=client_name,
                             on_epoch=on_epoch, connect_timeout=connect_timeout,
                             request_timeout=request_timeout, ping_interval=ping_interval,
                             ping_timeout=ping_timeout, ssl_context=ssl_context)


class ConnectionPool:
    """Links by (key, lane), opened on first use; concurrent callers share one dial."""

    def __init__(self, connector: Connector) -> None:
        self._connector = connector
        self._conns: dict[tuple[str, str], Channel] = {}
        self._opening: dict[tuple[str, str], asyncio.Task[Channel]] = {}
        self._closed_lanes: set[str] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def lane_closed(self, lane: str) -> bool:
        return self._closed or lane in self._closed_lanes

    def cached(self, key: str, lane: str = "") -> Channel | None:
        """The open link for (key, lane), without dialing."""
        conn = self._conns.get((key, lane))
        return conn if conn is not None and not conn.closed else None

    def open_channels(self) -> list[Channel]:
        """The open links of the shared lane ("")."""
        return [c for (_, lane), c in self._conns.items() if not lane and not c.closed]

    def adopt(self, key: str, conn: Channel) -> bool:
        """Register an already open link on the shared lane.

        Returns False when an open link for `key` exists already (or the
        pool is closed); the caller then closes `conn`.
        """
        old = self._conns.get((key, ""))
        if self._closed or (old is not None and not old.closed):
            return False
        self._conns[(key, "")] = conn
        return True

    async def dial(self, addr: str) -> Channel:
        """A link of the caller's own, not cached (it closes it): for a
        stream that must neither wait behind nor hold up other traffic."""
        if self._closed:
            raise ConnectionClosedError("connection pool is closed")
        return await self._connector(addr)

    async def get(self, key: str, addr: str, lane: str = "") -> Channel:
        """The open link for (key, lane) to `addr`, dialing if needed.

        Raises:
            ConnectionClosedError: the pool or the lane is closed.
            OSError / TimeoutError / AuthError: from the dial.
        """
        k = (key, lane)
        conn = self._conns.get(k)
        if conn is not None and not conn.closed and conn.addr == addr:
            return conn
        if self.lane_closed(lane):
            raise ConnectionClosedError("client is closed" if self._closed else "lane is closed")
        task = self._opening.get(k)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(k, addr, conn))
            self._opening[k] = task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                # The dial was abandoned by a close, not by this caller.
                raise ConnectionClosedError("closed while connecting") from None
            raise

    async def _open(self, k: tuple[str, str], addr: str, old: Channel | None) -> Channel:
        try:
            if old is not None and not old.closed:
                await old.aclose()  # the peer now lives at another address
            conn = await self._connector(addr)
            if self.lane_closed(k[1]):
                await conn.aclose()
                raise ConnectionClosedError("closed while connecting")
            self._conns[k] = conn
            return conn
        finally:
            self._opening.pop(k, None)

    async def drop(self, key: str, lane: str = "") -> None:
        """Close (key, lane)'s link (a timeout left it in doubt); the next
        `get` dials a new one."""
        conn = self._conns.pop((key, lane), None)
        if conn is not None:
            await conn.aclose()

    async def close_lane(self, lane: str) -> None:
        """Close a lane's links for good (half-close: requests already
        sent still get their answers, new ones fail at once)."""
        self._closed_lanes.add(lane)
        for k in [k for k in self._opening if k[1] == lane]:
            self._opening[k].cancel()
        conns = [self._conns.pop(k) for k in [k for k in self._conns if k[1] == lane]]
        await asyncio.gather(*(c.drain_close() for c in conns))

    async def aclose(self) -> None:
        """Close every link; idempotent."""
        self._closed = True
        for task in list(self._opening.values()):
            task.cancel()
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await conn.aclose()
