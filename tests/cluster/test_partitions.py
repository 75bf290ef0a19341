"""Partitioned hot queues (docs/design.md §7): one logical queue served by several
brokers at once, per-key order kept, and partitions moving in a scale out."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import pytest

import shardq
from shardq.router import partition_name
from tests.cluster.conftest import SplitCluster, http_get, poll

HOT = "hot"
P = 8
KEYS = [f"tenant-{i}" for i in range(24)]


async def run_bounded(coro: Any, timeout: float = 120) -> Any:
    async with asyncio.timeout(timeout):
        return await coro


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_logical_queue_is_served_by_three_brokers_and_follows_a_scale_out(
        split_cluster: SplitCluster, start_broker: Any) -> None:
    c = split_cluster
    seen: dict[str, list[int]] = collections.defaultdict(list)
    runs: collections.Counter[str] = collections.Counter()

    async def main() -> None:
        async with await shardq.connect(c.url) as client:
            await client.declare_queue(HOT, partitions=P)
            await client.declare_queue(HOT, partitions=P)  # idempotent
            with pytest.raises(shardq.ShardqError):
                await client.declare_queue(HOT, partitions=P + 1)
            topo = client.topology
            assert topo.partitions[HOT] == P
            owners = {topo.route(partition_name(HOT, i))[0] for i in range(P)}  # type: ignore[index]
            assert len(owners) == 3, f"partitions sit on {owners} only"

            q = client.queue(HOT)
            n = 0
            for _ in range(60):  # 60 x 24 keys = 1440 jobs, each key in order
                await q.add_bulk([("job", {"key": k, "n": n + i}, {"partition_key": k})
                                  for i, k in enumerate(KEYS)])
                n += len(KEYS)
            counts = await q.counts()
            assert counts["waiting"] == n

            async def handle(job: Any) -> None:
                seen[job.data["key"]].append(job.data["n"])
                runs[job.id] += 1

            worker = client.worker(HOT, handle, concurrency=1)
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(0.3)
            # Scale out while the worker runs: some partitions move to b4.
            start_broker("b4", "--coordinator", c.url, data_dir=c.broker_dir("b4"))

            def moved() -> bool:
                st = http_get(c.url, "/status") or {"brokers": []}
                rb = http_get(c.url, "/rebalance") or {}
                b4_slots = next((b["slots"] for b in st["brokers"] if b["id"] == "b4"), 0)
                return b4_slots > 0 and not rb.get("running")

            await asyncio.to_thread(poll, moved, "b4 to take slots")
            deadline = time.monotonic() + 90
            while sum(runs.values()) < n:
                assert time.monotonic() < deadline, f"{sum(runs.values())}/{n} ran"
                await asyncio.sleep(0.05)
            await worker.close()
            await task
            assert (await q.counts())["completed"] == n

    asyncio.run(run_bounded(main(), 150))
    assert all(v == 1 for v in runs.values()), "a job ran twice"
    for key, ns in seen.items():
        assert ns == sorted(ns), f"{key} ran out of order"
