"""shardq: a sharded, durable job-queue broker cluster with a BullMQ-like API.

    import shardq

    async with await shardq.connect("http://127.0.0.1:7070") as client:
        await client.queue("emails").add("send", {"to": "a@b"})

The client names (`connect`, `Client`, `Queue`, `Worker`, `Job`) are loaded
on first use, so `import shardq` (and the broker, which imports
`shardq.codec`) does not pay for the client's imports (httpx).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shardq.errors import (
    AuthError,
    BadRequestError,
    BusyError,
    ConnectionClosedError,
    JobStateError,
    LockLostError,
    MovedError,
    NotFoundError,
    OwnerUnavailableError,
    RequestTimeoutError,
    ServerError,
    ShardqError,
    StaleTermError,
    TlsError,
    TooLargeError,
    TryAgainError,
    UnavailableError,
    UnknownServerError,
)

if TYPE_CHECKING:
    from shardq.client import Client, Job, Queue, Worker, connect

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BadRequestError",
    "BusyError",
    "Client",
    "ConnectionClosedError",
    "Job",
    "JobStateError",
    "LockLostError",
    "MovedError",
    "NotFoundError",
    "OwnerUnavailableError",
    "Queue",
    "RequestTimeoutError",
    "ServerError",
    "ShardqError",
    "StaleTermError",
    "TlsError",
    "TooLargeError",
    "TryAgainError",
    "UnavailableError",
    "UnknownServerError",
    "Worker",
    "connect",
]

_CLIENT_NAMES = frozenset({"Client", "Job", "Queue", "Worker", "connect"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from shardq import client

        value = getattr(client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shardq' has no attribute {name!r}")
