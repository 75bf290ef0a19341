"""Every dashboard action through `POST /ui/api/action` against a real cluster, checked
on the cluster itself (the browser tests press retry, pause and resume; these cover
the rest without a browser)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

import shardq

from .conftest import LoopThread, UiCluster, wait_for

pytestmark = pytest.mark.slow


def act(c: UiCluster, **body: str) -> str:
    r = httpx.post(c.url + "/ui/api/action", json=body, headers=c.headers, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["message"])


def test_queue_and_job_actions_do_what_they_say(ui_cluster: Any, aloop: LoopThread) -> None:
    c = ui_cluster()
    queue, failing = "ui-acts", [True]
    handled: list[str] = []

    async def start() -> tuple[shardq.Client, shardq.Worker, Any]:
        client = await shardq.connect(c.url)

        async def handle(job: shardq.Job) -> str:
            handled.append(job.id)
            if failing[0]:
                raise RuntimeError("not yet")
            return "done"

        worker = client.worker(queue, handle, concurrency=4)
        return client, worker, asyncio.get_running_loop().create_task(worker.run())

    client, worker, task = aloop.call(start())
    q = client.queue(queue)
    try:
        aloop.call(q.add_bulk([("x", i, {"attempts": 1}) for i in range(3)]))
        wait_for(lambda: aloop.call(q.counts())["failed"] == 3, "three failures")
        failing[0] = False
        assert act(c, action="retry_failed", queue=queue).startswith("3 failed jobs")
        wait_for(lambda: aloop.call(q.counts())["completed"] == 3, "the retries to complete")
        assert act(c, action="clean", queue=queue, state="completed").startswith("3 completed")
        assert aloop.call(q.counts())["completed"] == 0

        later = aloop.call(q.add("later", None, delay_ms=3_600_000))
        assert "promoted" in act(c, action="promote_job", queue=queue, job_id=later)
        wait_for(lambda: (aloop.call(q.get_job(later)) or {}).get("state") == "completed",
                 "the promoted job to run")
        assert "removed" in act(c, action="remove_job", queue=queue, job_id=later)
        assert aloop.call(q.get_job(later)) is None

        failing[0] = True
        aloop.call(q.add_bulk([("dead", i, {"attempts": 1}) for i in range(2)]))
        wait_for(lambda: len(aloop.call(q.dlq_list())) == 2, "two jobs in the DLQ")
        assert act(c, action="dlq_purge", queue=queue).startswith("2 dead-lettered")
        assert aloop.call(q.dlq_list()) == []

        dead = aloop.call(q.add("dead", None, attempts=1))
        wait_for(lambda: len(aloop.call(q.dlq_list())) == 1, "the job in the DLQ")
        aloop.call(worker.close())  # so the retried job stays waiting
        assert act(c, action="dlq_retry", queue=queue).startswith("1 dead-lettered")
        assert (aloop.call(q.get_job(dead)) or {}).get("state") == "waiting"
        assert act(c, action="clean", queue=queue, state="waiting").startswith("1 waiting")
        assert aloop.call(q.get_job(dead)) is None
    finally:
        aloop.call(_stop(client, worker, task))


async def _stop(client: shardq.Client, worker: shardq.Worker, task: Any) -> None:
    await worker.close()
    await task
    await client.aclose()


def test_broker_actions_drain_undrain_and_rebalance(ui_cluster: Any) -> None:
    c = ui_cluster()
    assert "rebalance started: 0 moves" in act(c, action="rebalance")
    assert "draining" in act(c, action="drain", broker="b3")
    assert c.get("/status")["brokers"][2]["state"] == "draining"
    assert "active" in act(c, action="undrain", broker="b3")
    c.synced(("b1", "b2", "b3"))
    refused = httpx.post(c.url + "/ui/api/action", json={"action": "drain", "broker": "b9"})
    assert refused.status_code == 404 and "b9" in refused.json()["error"]


def test_an_action_on_a_job_that_is_not_there_says_so(ui_cluster: Any) -> None:
    c = ui_cluster()
    r = httpx.post(c.url + "/ui/api/action",
                   json={"action": "retry_job", "queue": "nope", "job_id": "missing"})
    assert r.status_code == 404 and "missing" in r.json()["error"]


def test_a_partitioned_queue_reads_and_pauses_as_one_across_brokers(
        ui_cluster: Any, aloop: LoopThread) -> None:
    c = ui_cluster()
    topo = c.topology
    # A name whose 3 partitions do not all live on one broker.
    name = next(n for n in (f"ui-hot-{i}" for i in range(100))
                if len({topo.owner_of(f"{n}~{p}") for p in range(3)}) > 1)

    async def fill() -> None:
        async with await shardq.connect(c.url) as client:
            await client.declare_queue(name, partitions=3)
            q = client.queue(name)
            await q.add_bulk([("x", i, {"partition_key": f"k{i}"}) for i in range(30)])

    aloop.call(fill())
    jobs = httpx.get(c.url + "/ui/api/jobs", params={"queue": name, "state": "waiting"}).text
    assert jobs.count('class="job"') == 30 and "(30)" in jobs
    assert "paused" in act(c, action="pause", queue=name)

    async def paused() -> list[bool]:
        async with await shardq.connect(c.url) as client:
            return [bool((await client.queue(f"{name}~{p}").counts())["paused"])
                    for p in range(3)]

    assert aloop.call(paused()) == [True, True, True]
    table = wait_for(lambda: (t := httpx.get(c.url + "/ui/api/queues",
                                             params={"q": name}).text).count('class="queue"')
                     == 3 and t, "the three partitions in the queue table")
    assert table.count(f"partition of {name}") == 3
