"""This broker's links to other brokers: flow deliveries and handoff streams.

They come from the client's connection pool (client/pool.py), dialed as
`broker-<id>` with the cluster's token, so brokers, the coordinator and
clients share one dial/HELLO/close path. The client package is imported on
first use: a broker that never calls another does not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shardq.client.pool import ConnectionPool

# A handoff frame carries up to a few MB of jobs into a target that may be
# checkpointing: far more than a client's 10 s (callers pass tighter ones).
PEER_REQUEST_TIMEOUT_S = 60.0


class Peers:
    """The pool of links to other brokers, created on first use."""

    def __init__(self, broker_id: str, token: str | None) -> None:
        self._name = f"broker-{broker_id}"
        self._token = token
        self._pool: ConnectionPool | None = None

    @property
    def pool(self) -> ConnectionPool:
        if self._pool is None:
            from shardq.client.pool import ConnectionPool, dialer

            self._pool = ConnectionPool(dialer(token=self._token, client_name=self._name,
                                               request_timeout=PEER_REQUEST_TIMEOUT_S))
        return self._pool

    async def aclose(self) -> None:
        """Close every link (the broker is stopping); idempotent."""
        if self._pool is not None:
            await self._pool.aclose()
