"""Rate limits, groups and tenant limits across brokers (DESIGN §11): the
queue's limits, group settings and rate windows move with it in a handoff."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

import shardq
from shardq.router import Topology
from tests.cluster.conftest import SplitCluster, poll
from tests.integration.rawwire import RawConn, add_args


def run(coro: Any, timeout: float = 90) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def owner_addr(url: str, queue: str) -> tuple[str, str]:
    topo = Topology.from_dict(httpx.get(f"{url}/topology", timeout=10).json())
    owner = topo.owner_of(queue)
    assert owner is not None
    addr = topo.addr_of(owner)
    assert addr is not None
    return owner, addr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_limits_groups_and_windows_move_with_the_queue(split_cluster: SplitCluster) -> None:
    c = split_cluster
    queue = "tenant-work"
    source, addr = owner_addr(c.url, queue)
    conn = RawConn(addr)
    conn.ok("RATE_LIMIT", {"queue": queue, "max": 4, "per_ms": 60_000})
    conn.ok("GROUP_SET", {"queue": queue, "group": "a", "concurrency": 1, "rate": [9, 1000]})
    conn.ok("GROUP_SET", {"queue": queue, "group": "c", "paused": True})
    conn.ok("ADD", add_args(queue, "a1", "a2", opts={"group": "a"}))
    conn.ok("ADD", add_args(queue, "b1", "b2", "b3", opts={"group": "b"}))
    conn.ok("ADD", add_args(queue, "c1", opts={"group": "c"}))
    got = [r[1] for r in conn.ok("PULL", {"queues": [queue], "count": 3})]
    assert got == ["a1", "b1", "b2"]
    before = conn.ok("LIMITS", {"queue": queue})
    conn.close()

    target = next(b for b in ("b1", "b2", "b3") if b != source)
    r = httpx.post(f"{c.url}/queues/{queue}/move", json={"to": target}, timeout=60)
    assert r.status_code == 200, r.text
    poll(lambda: owner_addr(c.url, queue)[0] == target, "the move to commit")

    async def at_target() -> None:
        async with await shardq.connect(c.url) as client:
            q = client.queue(queue)
            limits = await q.get_limits()
            assert limits == before
            assert limits["rate"] == [4, 60_000]
            assert limits["groups"]["a"]["active"] == 1
            counts = await q.counts()
            assert counts["active"] == 3 and counts["waiting"] == 3

    run(at_target())
    _, new_addr = owner_addr(c.url, queue)
    conn = RawConn(new_addr)
    # The window came along: one more start fits in this minute, and group a
    # is at its concurrency, so b3 goes.
    assert [r[1] for r in conn.ok("PULL", {"queues": [queue], "count": 5})] == ["b3"]
    assert conn.ok("PULL", {"queues": [queue], "count": 5}) == []
    conn.ok("RATE_LIMIT", {"queue": queue, "max": None})
    conn.ok("GROUP_SET", {"queue": queue, "group": "c", "paused": False})
    assert sorted(r[1] for r in conn.ok("PULL", {"queues": [queue], "count": 5})) == ["c1"]
    conn.close()
