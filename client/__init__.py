"""shardq.client: the asyncio client (docs/design.md §8).

Layers, bottom up: `shardq.codec` (frames) -> `connection` (one pipelined
broker link: request ids, futures, timeouts) -> `pool` (the links by broker
and lane; also the coordinator's and brokers' links to brokers) ->
`cluster` (routing by topology, bulk fan-out) with `retrying` (the one
redirect/retry loop, over `retry`'s budgets), `topology` (patches and
refreshes) and `batcher` (add coalescing) -> `queue` / `worker` / `events`
/ `client` (the API). The coordinator's HTTP API is reached through
`shardq.coordinator_http`.
"""

from .client import Client, connect
from .events import Event, Subscription
from .ids import uuid7
from .queue import Queue
from .worker import Job, Worker

__all__ = ["Client", "Event", "Job", "Queue", "Subscription", "Worker", "connect", "uuid7"]
