"""Jobs pushed before a scale out / in, then worked: each exactly once (docs/design.md §9.2)."""

from __future__ import annotations

import asyncio
import collections

import shardq
from tests.cluster.conftest import http_get

QUEUES = [f"deploy-{i:02d}" for i in range(24)]
PER_QUEUE = 25
Key = tuple[str, str]



async def push(url: str) -> set[Key]:
    """PER_QUEUE jobs on each of QUEUES, with ids of our own."""
    async with await shardq.connect(url) as client:
        await asyncio.gather(*(
            client.queue(q).add_bulk([("job", {"n": n}, {"job_id": f"{q}:{n}"})
                                      for n in range(PER_QUEUE)])
            for q in QUEUES))
    return {(q, f"{q}:{n}") for q in QUEUES for n in range(PER_QUEUE)}


async def work(url: str, expected: int) -> tuple[collections.Counter[Key], dict[str, int]]:
    """Work every queue until `expected` handler calls; then the cluster-wide counts."""
    handled: collections.Counter[Key] = collections.Counter()
    enough = asyncio.Event()

    def handle(job: shardq.Job) -> None:
        handled[(job.queue, job.id)] += 1
        if sum(handled.values()) >= expected:
            enough.set()

    async with await shardq.connect(url) as client:
        worker = client.worker(QUEUES, handle, concurrency=50)
        running = asyncio.create_task(worker.run())
        await enough.wait()
        await worker.close()
        await running
        counts = await asyncio.gather(*(client.queue(q).counts() for q in QUEUES))
    totals = {k: sum(c[k] for c in counts) for k in counts[0]}
    return handled, totals


def slots_by_broker(url: str) -> dict[str, tuple[str, int]] | None:
    """id -> (state, slots) from GET /status; None while unreachable."""
    body = http_get(url, "/status")
    if not body:
        return None
    return {b["id"]: (b["state"], b["slots"]) for b in body["brokers"]}


def serving(url: str, ids: set[str]) -> bool:
    """Exactly `ids` are active and each owns slots, and no rebalance is running."""
    rows = slots_by_broker(url)
    progress = http_get(url, "/rebalance")
    if not rows or not progress or progress["running"]:
        return False
    active = {b for b, (state, slots) in rows.items() if state == "active" and slots > 0}
    return active == ids and sum(slots for _, slots in rows.values()) == 4096
