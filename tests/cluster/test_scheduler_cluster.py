"""A scheduler ticks exactly once per tick across handoffs and a kill -9 (docs/design.md §9.5)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

import shardq
from tests.cluster.conftest import SplitCluster, http_get

EVERY_MS = 200


async def until(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def state_of(url: str, bid: str) -> tuple[str, int]:
    st = http_get(url, "/status") or {"brokers": []}
    return next(((b["state"], b["slots"]) for b in st["brokers"] if b["id"] == bid), ("", -1))


def idle(url: str) -> bool:
    r = http_get(url, "/rebalance") or {}
    return not r.get("running") and not r.get("moves_in_flight")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_scheduler_moved_three_times_and_killed_once_ticks_exactly_once(
        split_cluster: SplitCluster) -> None:
    c = split_cluster
    queue = "cron-q"

    async def main() -> tuple[int, int, int, int, set[int]]:
        async with await shardq.connect(c.url) as client:
            q = client.queue(queue)
            sched = await q.upsert_scheduler("beat", every_ms=EVERY_MS, name="beat",
                                             data={"hello": 1})
            first = sched["next_tick_ms"]
            with pytest.raises(shardq.BadRequestError):
                await q.upsert_scheduler("bad", cron="not a cron")
            for _ in range(3):  # move the queue's slot three times
                await client.refresh_topology()
                owner = client.topology.route(queue)[0]  # type: ignore[index]
                httpx.post(f"{c.url}/brokers/{owner}/drain", json={}, timeout=30)
                await until(lambda o=owner: state_of(c.url, o) == ("drained", 0), "drain")
                httpx.post(f"{c.url}/brokers/{owner}/undrain", json={}, timeout=30)
                await until(lambda: idle(c.url), "undrain rebalance")
                await asyncio.sleep(0.5)
            await client.refresh_topology()
            owner = client.topology.route(queue)[0]  # type: ignore[index]
            kill_at = int(time.time() * 1000)
            c.brokers[owner].kill()
            await asyncio.sleep(1.5)  # ~7 ticks missed
            c.restart_broker(owner)
            await until(lambda: state_of(c.url, owner)[0] == "active", "restart")
            back_at = int(time.time() * 1000)
            await asyncio.sleep(1.0)
            end = int(time.time() * 1000) - 2 * EVERY_MS
            present = set()
            for tick in range(first, end + 1, EVERY_MS):
                if await q.get_job(f"beat:{tick}") is not None:
                    present.add(tick)
            assert [s["id"] for s in await q.list_schedulers()] == ["beat"]
            return first, end, kill_at, back_at, present

    first, end, kill_at, back_at, present = asyncio.run(main())
    up = [t for t in range(first, end + 1, EVERY_MS)
          if t < kill_at - EVERY_MS or t > back_at + 2 * EVERY_MS]
    missing = [t for t in up if t not in present]
    assert not missing, f"ticks lost while an owner was up: {missing[:10]}"
    down = [t for t in present if kill_at + EVERY_MS < t < back_at - 2 * EVERY_MS]
    assert len(down) <= 1, f"a burst after downtime: {down}"
