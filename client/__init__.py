"""shardq.client: the asyncio client (docs/design.md §8).

Layers, bottom up: `shardq.codec` (frames) -> `connection` (one pipelined
broker link: request ids, futures, timeouts) -> `cluster` (routing by
topology, retries, bulk fan-out) with `topology` (patches and refreshes)
and `batcher` (add coalescing) -> `queue` / `worker` / `client` (the API).
"""

from .client import Client, connect
from .events import Event, Subscription
from .ids import uuid7
from .queue import Queue
from .worker import Job, Worker

__all__ = ["Client", "Event", "Job", "Queue", "Subscription", "Worker", "connect", "uuid7"]
