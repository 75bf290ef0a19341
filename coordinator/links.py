"""The coordinator's wire connections to brokers, for handoff commands (docs/design.md §4, §6).

One cached `shardq.client.connection.Connection` per broker id, opened on
first use with HELLO (and the coordinator's token), reopened when it broke
or when the broker re-registered at another address. `BrokerLinks.send` is
the `SendOp` the move executor (moves.py) is given; tests give it a fake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shardq import protocol
from shardq.client.connection import Connection, open_connection
from shardq.errors import ConnectionClosedError

log = logging.getLogger("shardq.coordinator.links")

CONNECT_TIMEOUT_S = 5.0


class BrokerGone(Exception):
    """The broker is not in the topology any more (left or forgotten): nothing to send to."""


class BrokerLinks:
    """Cached connections to brokers, addressed by broker id.

    Args:
        addr_of: broker id -> its current advertised address (None: unknown),
            read at every send so a broker that moved is followed.
        token: sent in HELLO when the brokers require one.
        connect_timeout_s: for the TCP connect and HELLO.
    """

    def __init__(self, addr_of: Callable[[str], str | None], token: str | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self._addr_of = addr_of
        self._token = token
        self._connect_timeout_s = connect_timeout_s
        self._conns: dict[str, Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    async def send(self, broker_id: str, op: str, args: dict[str, Any], timeout_s: float) -> Any:
        """Send one op to `broker_id` and return the reply body.

        Raises:
            BrokerGone: `broker_id` is not in the topology.
            OSError / TimeoutError / ConnectionClosedError: unreachable, or no
                answer within `timeout_s`.
            ServerError: the broker answered an error code (typed, shardq.errors).
        """
        conn = await self._conn(broker_id)
        try:
            return await conn.request(op, args, timeout=timeout_s)
        except ConnectionClosedError:
            self._conns.pop(broker_id, None)
            raise

    async def epoch(self, broker_id: str, timeout_s: float) -> int:
        """The topology epoch `broker_id` serves with now (a PING; every reply carries it).

        Raises:
            as `send`.
        """
        await self.send(broker_id, protocol.PING, {}, timeout_s)
        conn = self._conns.get(broker_id)
        return conn.max_epoch if conn is not None else 0

    async def _conn(self, broker_id: str) -> Connection:
        if self._closed:
            raise ConnectionClosedError("coordinator links are closed")
        addr = self._addr_of(broker_id)
        if addr is None:
            raise BrokerGone(f"broker {broker_id} is not in the topology")
        lock = self._locks.setdefault(broker_id, asyncio.Lock())
        async with lock:  # one connect at a time per broker; the others reuse it
            conn = self._conns.get(broker_id)
            if conn is not None and not conn.closed and conn.addr == addr:
                return conn
            if conn is not None:
                self._conns.pop(broker_id, None)
                await conn.aclose()
            conn = await open_connection(addr, token=self._token, client_name="shardq-coordinator",
                                         connect_timeout=self._connect_timeout_s)
            if self._closed:
                await conn.aclose()
                raise ConnectionClosedError("coordinator links are closed")
            self._conns[broker_id] = conn
            log.debug("connected to broker %s at %s", broker_id, addr)
            return conn

    async def aclose(self) -> None:
        """Close every connection; idempotent."""
        self._closed = True
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            await conn.aclose()
