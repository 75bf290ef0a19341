"""Rate limits, groups and tenant limits across brokers (docs/design.md §11): the
queue's limits, group settings and rate windows move with it in a handoff."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import shardq
from shardq.router import Topology
from tests.aio import run
from tests.cluster.conftest import SplitCluster, poll
from tests.integration.rawwire import RawConn, add_args
from tests.unit.test_sched import max_in_any_window


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



@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_tenant_limit_holds_across_brokers_and_while_the_coordinator_is_down(
        split_cluster: SplitCluster) -> None:
    c = split_cluster
    topo = Topology.from_dict(httpx.get(f"{c.url}/topology", timeout=10).json())
    queues: dict[str, str] = {}  # one queue per broker
    i = 0
    while len(queues) < 3:
        name = f"t7-stage{i}"
        owner = topo.owner_of(name)
        assert owner is not None
        if owner not in queues.values():
            queues[name] = owner
        i += 1
    limit, per_ms = 60, 1000

    async def main() -> list[int]:
        async with await shardq.connect(c.url) as client:
            await client.set_tenant_rate_limit("tenant-7", list(queues), max=limit,
                                               per_ms=per_ms)
            async with asyncio.timeout(20):  # each owner tags its queue on a heartbeat
                while not all([(await client.queue(q).get_limits())["tenant"] == "tenant-7"
                               for q in queues]):
                    await asyncio.sleep(0.1)
            for q in queues:
                await client.queue(q).add_bulk([("j", {"i": n}) for n in range(1000)])
            done: list[tuple[str, str]] = []

            async def handle(job: shardq.Job) -> None:
                done.append((job.queue, job.id))

            worker = client.worker(list(queues), handle, concurrency=30)
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(2.5)
            c.coordinator.kill()  # leases are kept until they expire (5 s), then the fallback
            await asyncio.sleep(6)
            await worker.close()
            await task
            jobs = await asyncio.gather(*(client.queue(q).get_job(j) for q, j in done))
            return [j["processed_on"] for j in jobs if j]

    starts = run(main())
    worst = max_in_any_window(starts, per_ms)
    print(f"tenant starts={len(starts)} max_in_window={worst}")
    assert worst <= limit  # the documented bound: never over `max` in any window
    span = max(starts) - min(starts)
    assert len(starts) >= 0.6 * limit * (span // per_ms), (len(starts), span)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_broker_keeps_its_tenant_lease_across_kill9_while_the_coordinator_is_down(
        split_cluster: SplitCluster) -> None:
    c = split_cluster
    queue = "t8-only"
    owner, _ = owner_addr(c.url, queue)

    async def configure() -> None:
        async with await shardq.connect(c.url) as client:
            await client.set_tenant_rate_limit("tenant-8", [queue], max=5, per_ms=60_000)
            async with asyncio.timeout(20):
                while (await client.queue(queue).get_limits())["tenant"] != "tenant-8":
                    await asyncio.sleep(0.1)
            await client.queue(queue).add_bulk([("j", {"i": n}) for n in range(20)])

    run(configure())
    shares = poll(lambda: (httpx.get(f"{c.url}/tenants", timeout=5).json()
                           ["tenant-8"]["shares"]), "the lease to be granted")
    assert shares == {owner: 5}
    c.coordinator.kill()
    c.brokers[owner].kill()
    broker = c.restart_broker(owner)
    conn = RawConn(broker.addr)
    assert conn.ok("LIMITS", {"queue": queue})["tenant"] == "tenant-8"
    # The lease (5 per minute) came back from disk: 5 start, then nothing.
    assert len(conn.ok("PULL", {"queues": [queue], "count": 20})) == 5
    assert conn.ok("PULL", {"queues": [queue], "count": 20}) == []
    conn.close()
