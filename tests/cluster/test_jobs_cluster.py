"""Job features across brokers and handoffs (docs/design.md §11, docs/features-jobs.md):
an events subscription follows its queue through moves without missing a
completion, and logs, DLQ entries and TTL deadlines arrive at the new owner
(there and back again: a round trip)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

import shardq
from shardq.router import Topology
from tests.aio import run

from .conftest import SplitCluster, http_get

pytestmark = pytest.mark.slow



async def move(url: str, queue: str, to: str) -> None:
    """POST /queues/{queue}/move and wait until `to` owns it and nothing moves."""
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{url}/queues/{queue}/move", json={"to": to})
        assert r.status_code == 200, r.text
        async with asyncio.timeout(30):
            while True:
                body = (await http.get(f"{url}/topology")).json()
                topo = Topology.from_dict(body)
                if topo.owner_of(queue) == to and not topo.moving:
                    return
                await asyncio.sleep(0.05)


def owner(url: str, queue: str) -> str:
    topo = Topology.from_dict(http_get(url, "/topology"))
    found = topo.owner_of(queue)
    assert found is not None
    return found


def test_events_subscriber_sees_every_completion_while_the_queue_moves(
        split_cluster: SplitCluster) -> None:
    url, queue, n = split_cluster.url, "events-moving", 1000
    first = owner(url, queue)
    others = [b for b in ("b1", "b2", "b3") if b != first]

    async def main() -> None:
        async with await shardq.connect(url) as client:
            q = client.queue(queue)
            sub = await client.events(queue)
            completed: dict[str, int] = {}
            all_done = asyncio.Event()

            async def watch() -> None:
                async for ev in sub:
                    if ev.type == "completed":
                        completed[ev.job_id] = completed.get(ev.job_id, 0) + 1
                        if len(completed) == n:
                            all_done.set()

            async def handle(job: shardq.Job) -> int:
                await asyncio.sleep(0.04)  # ~500 jobs/s: the moves land mid-run
                return int(job.data["i"])

            watcher = asyncio.create_task(watch())
            worker = client.worker(queue, handle, concurrency=20)
            work = asyncio.create_task(worker.run())
            added: list[str] = []
            batches = [[("n", {"i": i}) for i in range(b, b + 100)] for b in range(0, n, 100)]
            plan = {3: others[0], 6: others[1], 8: first}  # three moves mid-run
            done_at_moves = []
            for k, batch in enumerate(batches):
                added += await q.add_bulk(batch)
                if k in plan:
                    done_at_moves.append(len(completed))
                    await move(url, queue, plan[k])
            try:
                async with asyncio.timeout(60):
                    await all_done.wait()
            finally:
                await worker.close()
                await work
                await sub.aclose()
                await watcher
            assert set(completed) == set(added)
            assert all(c >= 1 for c in completed.values())
            assert sub.gaps == 0 and sub.resumes >= len(plan)  # it followed every move
            # Every move found jobs still to complete, and completions between moves.
            assert done_at_moves == sorted(done_at_moves) and done_at_moves[-1] < n
            assert done_at_moves[0] < done_at_moves[-1], done_at_moves
            counts = await q.counts()
            assert counts["completed"] == n, counts

    run(main())
    assert owner(url, queue) == first


def test_logs_dlq_and_ttl_travel_with_the_queue_there_and_back(
        split_cluster: SplitCluster) -> None:
    url, queue = split_cluster.url, "jobs-roundtrip"
    home = owner(url, queue)
    away = next(b for b in ("b1", "b2", "b3") if b != home)

    async def check(q: shardq.Queue, expired: bool) -> None:
        assert await q.get_logs("logged") == [f"line {i}" for i in range(4)]
        dlq = {j["id"]: j["dlq_reason"] for j in await q.dlq_list()}
        want = {"dead": "attempts exhausted"}
        if expired:
            want["short"] = "ttl expired"
        assert dlq == want
        job = await q.get_job("long")
        assert job is not None and job["state"] == "waiting"

    async def main() -> None:
        async with await shardq.connect(url) as client:
            q = client.queue(queue)
            await q.add("n", {}, job_id="logged")
            await q.add("n", {}, job_id="dead")

            async def handle(job: shardq.Job) -> None:
                if job.id == "logged":
                    for i in range(4):
                        await job.log(f"line {i}")
                    return
                raise RuntimeError("broken")

            sub = await client.events(queue)
            ended: set[str] = set()
            async with asyncio.TaskGroup() as tg:
                worker = client.worker(queue, handle, concurrency=2)
                tg.create_task(worker.run())
                async for ev in sub:
                    if ev.type in ("completed", "failed"):
                        ended.add(ev.job_id)
                        if ended == {"logged", "dead"}:
                            break
                await worker.close()
            await q.pause()  # TTLs count paused time
            await q.add("n", {}, job_id="long", ttl_ms=120_000)
            await q.add("n", {}, job_id="short", ttl_ms=2500)
            added = time.monotonic()

            await move(url, queue, away)
            await check(q, expired=False)
            ev = await asyncio.wait_for(_next_failed(sub, "short"), 20)
            assert ev.data["reason"].startswith("ttl expired")
            assert time.monotonic() - added >= 2.4
            assert owner(url, queue) == away  # the new owner's timer fired it
            await check(q, expired=True)

            await move(url, queue, home)  # and back
            await check(q, expired=True)
            await q.resume()
            assert await q.dlq_retry(["short"]) == 1
            job = await q.get_job("short")
            assert job is not None and (job["state"], job["attempts_made"]) == ("waiting", 0)
            await sub.aclose()

    run(main())


async def _next_failed(sub: Any, job_id: str) -> Any:
    async for ev in sub:
        if ev.type == "failed" and ev.job_id == job_id:
            return ev
    raise AssertionError("subscription ended")
