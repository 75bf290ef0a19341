"""Job management against a 3-broker cluster (docs/features-jobs.md "Job
management"): every getter and action on a queue whose slot is handed off
(with actions landing during the move) and whose owner is killed -9 and
restarted; the same on a partitioned queue spread over the brokers; and a
flow child removed on one broker releasing its parent on another."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import shardq
from shardq.router import Topology, partition_name
from tests.aio import run, running, until

from ..conftest import queue_on
from .conftest import SplitCluster, http_get, synced_topology
from .test_jobs_cluster import move, owner

pytestmark = pytest.mark.slow

HOUR = 3_600_000


async def finish_all(client: shardq.Client, queue: str, fail: set[str], n: int) -> None:
    """Run a worker until `n` jobs ended: ids in `fail` fail, others complete."""
    ended: set[str] = set()

    async def handle(job: shardq.Job) -> str:
        ended.add(job.id)
        if job.id in fail:
            raise RuntimeError(f"boom {job.id}")
        return f"done {job.id}"

    async with running(client.worker(queue, handle, concurrency=4)):
        await until(lambda: len(ended) >= n, f"{n} jobs to end")
    q = client.queue(queue)
    await until(lambda: _settled(q, n), "acks to land")


async def _settled(q: shardq.Queue, n: int) -> bool:
    c = await q.get_job_counts("waiting", "prioritized", "active")
    return c["waiting"] + c["prioritized"] + c["active"] == 0


async def snapshot(q: shardq.Queue) -> dict[str, Any]:
    """Everything the getters say, in a form to compare before and after."""
    jobs = await q.get_jobs(asc=True)
    return {
        "counts": await q.get_job_counts(),
        "jobs": [(j["id"], j["state"], j["priority"], j["attempts"], j["attempts_made"],
                  j["data"]) for j in jobs],
        "desc": [j["id"] for j in await q.get_jobs(["failed", "waiting"])],
        "page": [j["id"] for j in await q.get_jobs(None, 2, 5, asc=True)],
    }


async def setup(q: shardq.Queue, client: shardq.Client) -> None:
    """6 completed, 4 failed, 6 waiting, 2 prioritized, 3 delayed."""
    for i in range(10):
        await q.add("n", {"i": i}, job_id=f"e{i}")
    await finish_all(client, q.name, {f"e{i}" for i in range(6, 10)}, 10)
    for i in range(6):
        await q.add("n", {"i": i}, job_id=f"w{i}", attempts=5)
    await q.add("n", {}, job_id="p0", priority=3)
    await q.add("n", {}, job_id="p1", priority=1)
    for i in range(3):
        await q.add("n", {}, job_id=f"d{i}", delay_ms=HOUR + i)


def test_getters_and_actions_through_a_handoff_and_kill_9(split_cluster: SplitCluster) -> None:
    c = split_cluster
    queue = "jobs-admin"
    home = owner(c.url, queue)
    away = next(b for b in ("b1", "b2", "b3") if b != home)

    async def before_move() -> dict[str, Any]:
        async with await shardq.connect(c.url) as client:
            q = client.queue(queue)
            await setup(q, client)
            counts = await q.get_job_counts()
            assert counts == {"waiting": 6, "prioritized": 2, "delayed": 3, "active": 0,
                              "completed": 6, "failed": 4, "waiting-children": 0,
                              "completed_total": 6, "failed_total": 4}, counts
            assert [j["id"] for j in await q.get_jobs("prioritized", asc=True)] == ["p0", "p1"]
            assert [j["id"] for j in await q.get_jobs(["delayed"])] == ["d2", "d1", "d0"]
            assert [j["id"] for j in await q.get_jobs("failed", 1, 2, asc=True)] == ["e7", "e8"]
            # Single-job actions, each one checked by the getters after.
            await q.retry_job("e6")
            await q.remove_job("w0")
            await q.promote_job("d0")
            await q.update_job_data("w1", {"new": True})
            await q.change_job_priority("w2", 7)
            await q.change_job_delay("w3", HOUR)
            await q.discard_job("w4")
            with pytest.raises(shardq.JobStateError) as info:
                await q.promote_job("w5")
            assert info.value.state == "waiting" and info.value.job_id == "w5"
            with pytest.raises(shardq.NotFoundError):
                await q.remove_job("w0")
            assert (await q.set_retention(keep_completed=4))["removed"] == 2
            jobs = {j["id"]: j for j in await q.get_jobs()}
            assert "w0" not in jobs and jobs["w1"]["data"] == {"new": True}
            assert jobs["e6"]["state"] == "waiting" and jobs["e6"]["attempts_made"] == 0
            assert jobs["d0"]["state"] == "waiting" and jobs["w3"]["state"] == "delayed"
            assert jobs["w2"]["priority"] == 7 and jobs["w4"]["attempts"] == 1
            assert [j["id"] for j in await q.get_jobs("completed", asc=True)] == [
                "e2", "e3", "e4", "e5"]
            return await snapshot(q)

    async def during_move(before: dict[str, Any]) -> dict[str, Any]:
        async with await shardq.connect(c.url) as client:
            q = client.queue(queue)
            mover = asyncio.create_task(move(c.url, queue, away))
            # Actions while the slot moves: each is answered (TRYAGAIN rides
            # out the freeze) and must be in the new owner's copy.
            for i in range(40):
                await q.add("n", {"i": i}, job_id=f"m{i}", attempts=3)
                await q.change_job_priority(f"m{i}", 2)
                if i % 2:
                    await q.remove_job(f"m{i}")
                elif i % 4 == 0:
                    await q.update_job_data(f"m{i}", {"moved": i})
                    await q.discard_job(f"m{i}")
                elif i % 8 == 2:
                    await q.change_job_delay(f"m{i}", HOUR)
                    await q.promote_job(f"m{i}")
            await mover
            assert owner(c.url, queue) == away
            after = await snapshot(q)
            assert after["counts"]["prioritized"] == before["counts"]["prioritized"] + 20
            moved_jobs = [j for j in after["jobs"] if not j[0].startswith("m")]
            assert moved_jobs == before["jobs"]
            mine = {j[0]: j for j in after["jobs"] if j[0].startswith("m")}
            assert set(mine) == {f"m{i}" for i in range(0, 40, 2)}
            for i in range(0, 40, 2):  # (id, state, priority, attempts, made, data)
                data = {"moved": i} if i % 4 == 0 else {"i": i}
                attempts = 1 if i % 4 == 0 else 3
                assert mine[f"m{i}"] == (f"m{i}", "waiting", 2, attempts, 0, data), mine[f"m{i}"]
            # Queue-wide actions on the new owner; then a kill -9 of it.
            assert await q.retry_jobs("failed", count=2) == 2
            assert await q.retry_jobs() == 1
            assert await q.promote_jobs(count=1) == 1
            assert await q.clean(0, None, "completed") == 4
            assert (await q.set_retention(keep_failed=7))["keep_failed"] == 7
            return await snapshot(q)

    async def after_restart(want: dict[str, Any]) -> None:
        async with await shardq.connect(c.url) as client:
            q = client.queue(queue)
            got = await snapshot(q)
            assert got == want
            assert got["counts"]["failed"] == 0 and got["counts"]["completed"] == 0
            assert got["counts"]["completed_total"] == 6 and got["counts"]["failed_total"] == 4
            # The retention set before the kill still holds: 4 completed kept.
            left = sum(got["counts"][s] for s in ("waiting", "prioritized"))
            await finish_all(client, queue, set(), left)
            counts = await q.get_job_counts("completed")
            assert counts["completed"] == 4 and counts["completed_total"] == 6 + left

    before = run(before_move())
    after = run(during_move(before))
    c.brokers[away].kill()  # kill -9, by pid
    c.restart_broker(away)
    synced_topology(c.url)
    run(after_restart(after))


def test_partitioned_queue_getters_merge_and_actions_fan_out(split_cluster: SplitCluster) -> None:
    c = split_cluster
    hot, parts = "jobs-hot", 6

    async def main() -> dict[str, Any]:
        async with await shardq.connect(c.url) as client:
            await client.declare_queue(hot, partitions=parts)
            topo = client.topology
            owners = {topo.route(partition_name(hot, i))[0]  # type: ignore[index]
                      for i in range(parts)}
            assert len(owners) >= 2, owners
            q = client.queue(hot)
            await q.add_bulk([("n", {"i": i}, {"job_id": f"j{i:02d}", "partition_key": f"k{i}"})
                              for i in range(30)])
            await q.add_bulk([("n", {}, {"job_id": f"d{i}", "delay_ms": HOUR + i})
                              for i in range(5)])
            everything = [j["id"] for j in await q.get_jobs(asc=True)]
            assert sorted(everything) == sorted([f"j{i:02d}" for i in range(30)]
                                                + [f"d{i}" for i in range(5)])
            # Paging is one order over all partitions, in both directions.
            assert [j["id"] for j in await q.get_jobs(None, 7, 16, asc=True)] == everything[7:17]
            newest = [j["id"] for j in await q.get_jobs("waiting")]
            assert [j["id"] for j in await q.get_jobs("waiting", 3, 8)] == newest[3:9]
            counts = await q.get_job_counts("waiting", "delayed")
            assert counts["waiting"] == 30 and counts["delayed"] == 5
            # A single-job action finds the id in whichever partition holds it.
            await q.remove_job("j03")
            await q.change_job_priority("j04", 5)
            await q.update_job_data("j05", "x")
            await q.promote_job("d0")
            with pytest.raises(shardq.NotFoundError):
                await q.retry_job("j03")
            with pytest.raises(shardq.JobStateError):
                await q.retry_job("j06")
            assert await q.promote_jobs(count=2) == 2
            assert await q.promote_jobs() == 2
            assert await q.clean(0, 4, "waiting") == 4
            left = [j["id"] for j in await q.get_jobs(asc=True)]
            assert len(left) == 35 - 1 - 4
            fails = {jid for jid in left if jid >= "j10"}
            await finish_all(client, hot, fails, len(left))
            assert await q.retry_jobs(count=5) == 5
            counts = await q.get_job_counts()
            assert counts["failed"] == len(fails) - 5 and counts["failed_total"] == len(fails)
            return await snapshot(q)

    want = run(main())
    # A partition's slot handed off: the merged views are the same after.
    topo = Topology.from_dict(http_get(c.url, "/topology"))
    p0 = partition_name(hot, 0)
    first = topo.route(p0)[0]  # type: ignore[index]
    run(move(c.url, p0, next(b for b in ("b1", "b2", "b3") if b != first)))

    async def same() -> None:
        async with await shardq.connect(c.url) as client:
            assert await snapshot(client.queue(hot)) == want

    run(same())
    victim = Topology.from_dict(http_get(c.url, "/topology")).route(p0)[0]
    c.brokers[victim].kill()
    c.restart_broker(victim)
    synced_topology(c.url)

    async def again() -> None:
        async with await shardq.connect(c.url) as client:
            assert await snapshot(client.queue(hot)) == want

    run(again())


def test_removing_a_waiting_flow_child_releases_its_parent_on_another_broker(
        split_cluster: SplitCluster) -> None:
    c = split_cluster
    topo = synced_topology(c.url)
    pq, cq = queue_on(topo, "b1", "report"), queue_on(topo, "b2", "pages")

    async def main() -> None:
        async with await shardq.connect(c.url) as client:
            pid = await client.add_flow({
                "queue": pq, "name": "merge", "data": {},
                "children": [{"queue": cq, "name": "render", "data": {"p": i},
                              "opts": {"job_id": f"kid{i}"}} for i in range(2)]})
            kids = client.queue(cq)
            await until(lambda: _state(kids, "kid0", "waiting"), "the children committed")
            parents = client.queue(pq)
            assert [j["id"] for j in await parents.get_jobs("waiting-children")] == [pid]
            await kids.remove_job("kid0")
            await kids.remove_job("kid1")
            await until(lambda: _state(parents, pid, "waiting"), "the parent released")
            ran: list[dict[str, Any]] = []

            async def handle(job: shardq.Job) -> None:
                ran.append(await job.children_values())

            async with running(client.worker(pq, handle)):
                await until(lambda: bool(ran), "the parent to run")
            assert ran == [{f"{cq}:kid0": None, f"{cq}:kid1": None}]

    run(main())


async def _state(q: shardq.Queue, jid: str, state: str) -> bool:
    job = await q.get_job(jid)
    return job is not None and job["state"] == state


def test_handler_job_methods_act_on_the_job_it_runs(split_cluster: SplitCluster) -> None:
    c = split_cluster
    queue = "jobs-methods"

    async def main() -> None:
        async with await shardq.connect(c.url) as client:
            q = client.queue(queue)
            await q.add("n", {"v": 1}, job_id="a", attempts=5)
            seen: list[Any] = []

            async def handle(job: shardq.Job) -> None:
                await job.update_data({"v": 2})
                seen.append(job.data)
                await job.change_priority(4)
                with pytest.raises(shardq.JobStateError):
                    await job.remove()  # held by this worker
                await job.discard()
                raise RuntimeError("no retry after discard")

            async with running(client.worker(queue, handle)):
                await until(lambda: _state(q, "a", "failed"), "a to fail for good")
            job = await q.get_job("a")
            assert job is not None and job["attempts_made"] == 1
            assert seen == [{"v": 2}] and job["data"] == {"v": 2} and job["priority"] == 4

    run(main())
