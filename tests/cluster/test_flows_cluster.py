"""Flows across brokers (docs/design.md §11), against a real coordinator and b1..b3.

The parent and its children sit in queues owned by different brokers (names
picked from the coordinator's topology). Each test checks the flow ends
exactly once: every child ran once, the parent ran once after them and saw
all their results - through a creation cut short by kill -9, handoffs of
the parent's and a child's queue, and kill -9 of a child's broker around
the outbox delivery.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import shardq
from shardq.client.retry import RetryPolicy
from shardq.errors import ShardqError
from shardq.router import Topology
from tests import aio
from tests.aio import run, running
from tests.cluster.conftest import SplitCluster, http_get, poll, synced_topology

from ..conftest import Proc, queue_on

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]





def restart(c: SplitCluster, start_broker: Callable[..., Proc], bid: str,
            failpoints: str | None = None) -> None:
    """kill -9 `bid` (if alive) and start it again on its data, with failpoints."""
    c.brokers[bid].kill()
    env = {"SHARDQ_LOG_LEVEL": "INFO"}
    if failpoints:
        env["SHARDQ_FAILPOINTS"] = failpoints
    c.brokers[bid] = start_broker(bid, "--coordinator", c.url, data_dir=c.broker_dir(bid),
                                  env=env)
    synced_topology(c.url)


def move(c: SplitCluster, queue: str, to: str) -> None:
    r = httpx.post(f"{c.url}/queues/{queue}/move", json={"to": to}, timeout=60)
    assert r.status_code < 400, r.text

    def moved() -> bool:
        body = http_get(c.url, "/topology")
        return bool(body) and not body["moving"] and \
            Topology.from_dict(body).owner_of(queue) == to

    poll(moved, f"{queue} to move to {to}", timeout=60)


class Flow:
    """Handlers that count runs: children return their page, the parent its
    children's values."""

    def __init__(self) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.values: list[dict[str, Any]] = []
        self.children: list[tuple[str, str]] = []

    async def child(self, job: shardq.Job) -> Any:
        self.runs[job.id] += 1
        self.children.append((job.queue, job.id))
        return {"page": job.data["p"]}

    async def parent(self, job: shardq.Job) -> Any:
        self.runs[job.id] += 1
        self.values.append(await job.children_values())
        return "merged"



until = functools.partial(aio.until, timeout=30, every=0.05)


async def job_state(client: shardq.Client, queue: str, jid: str) -> dict[str, Any] | None:
    job: dict[str, Any] | None = await client.queue(queue).get_job(jid)
    return job


def spec(parent_q: str, child_qs: list[str]) -> dict[str, Any]:
    return {"queue": parent_q, "name": "merge", "data": {},
            "children": [{"queue": q, "name": "render", "data": {"p": i}}
                         for i, q in enumerate(child_qs)]}


def check_once(flow: Flow, pid: str, n: int) -> None:
    assert flow.runs[pid] == 1, flow.runs
    assert len(flow.runs) == n + 1 and set(flow.runs.values()) == {1}, flow.runs
    [values] = flow.values
    assert sorted(v["page"] for v in values.values()) == list(range(n))


def flow_queues(c: SplitCluster, *child_owners: str) -> tuple[str, list[str]]:
    """A parent queue on b1 and one child queue on each of `child_owners`."""
    topo = synced_topology(c.url)
    return queue_on(topo, "b1", "report"), [queue_on(topo, b, "pages") for b in child_owners]


def test_a_flow_across_three_brokers_completes_once(split_cluster: SplitCluster) -> None:
    c = split_cluster
    pq, cqs = flow_queues(c, "b1", "b2", "b3")

    async def main() -> None:
        async with await shardq.connect(c.url) as client:
            flow = Flow()
            pid = await client.add_flow(spec(pq, cqs))
            async with running(client.worker(cqs, flow.child, concurrency=3)), \
                    running(client.worker(pq, flow.parent)):
                await until(lambda: flow.values != [], "the parent to run")
                await until(lambda: _state(client, pq, pid, "completed"), "the parent to end")
            check_once(flow, pid, 3)
            assert set(flow.values[0]) == {f"{q}:{jid}" for q, jid in flow.children}

    run(main())


async def _state(client: shardq.Client, queue: str, jid: str, state: str) -> bool:
    job = await job_state(client, queue, jid)
    return job is not None and job["state"] == state


def test_an_interrupted_flow_creation_leaves_nothing_behind(
        split_cluster: SplitCluster, start_broker: Callable[..., Proc]) -> None:
    c = split_cluster
    pq, cqs = flow_queues(c, "b1", "b2", "b3")
    restart(c, start_broker, "b1", "broker.before_flow_parent=kill")
    flow = Flow()
    ids: dict[str, str] = {}

    async def create() -> None:
        policy = RetryPolicy(unavailable_budget=1.0)
        async with await shardq.connect(c.url, policy=policy) as client:
            fspec = spec(pq, cqs)
            for i, child in enumerate(fspec["children"]):
                child["opts"] = {"job_id": f"child-{i}"}
            fspec["opts"] = {"job_id": "the-parent"}
            ids.update({f"child-{i}": q for i, q in enumerate(cqs)})
            with pytest.raises(ShardqError):
                await client.add_flow(fspec, timeout_ms=1500)

    run(create())
    poll(lambda: not c.brokers["b1"].alive(), "b1 to be killed by its failpoint")
    restart(c, start_broker, "b1")

    async def check() -> None:
        async with await shardq.connect(c.url) as client:
            async with running(client.worker([*cqs, pq], flow.child, concurrency=4)):
                async def gone() -> bool:
                    jobs = [await job_state(client, q, jid) for jid, q in ids.items()]
                    return all(j is None for j in jobs)

                await until(gone, "the pending children to be removed")
                for q in cqs:
                    assert await client.queue(q).counts() == {
                        "waiting": 0, "delayed": 0, "active": 0, "completed": 0, "failed": 0,
                        "paused": False}
                assert await job_state(client, pq, "the-parent") is None
            assert flow.runs == {}

    run(check())


def test_a_flow_survives_handoffs_and_the_outbox_follows_moved(
        split_cluster: SplitCluster, start_broker: Callable[..., Proc]) -> None:
    """The child's broker dies (kill -9) with a completed child's entry in its
    outbox; meanwhile the parent's queue moves away; back up, that broker
    still routes the entry to the old owner, which answers MOVED, and the
    entry follows it. Then a child's queue moves, and its child completes
    at the new owner."""
    c = split_cluster
    pq, cqs = flow_queues(c, "b2", "b3")
    restart(c, start_broker, "b2", "broker.before_flow_deliver=kill")
    flow = Flow()

    async def main() -> None:
        async with await shardq.connect(c.url) as client:
            pid = await client.add_flow(spec(pq, cqs))
            async with running(client.worker(cqs[0], flow.child)):
                await until(lambda: not c.brokers["b2"].alive(), "b2's failpoint")
            await asyncio.to_thread(move, c, pq, "b3")  # the parent's queue
            await asyncio.to_thread(restart, c, start_broker, "b2")

            async def done(n: int) -> bool:
                job = await job_state(client, pq, pid)
                return job is not None and job["children"]["done"] == n

            await until(lambda: done(1), "the first child's delivery after MOVED")
            await asyncio.to_thread(move, c, cqs[1], "b1")  # a child's queue
            async with running(client.worker(cqs[1], flow.child)), \
                    running(client.worker(pq, flow.parent)):
                await until(lambda: _state(client, pq, pid, "completed"), "the parent to end")
            check_once(flow, pid, 2)

    run(main())
    b2_log = c.brokers["b2"].log_path.read_text()  # type: ignore[union-attr]
    assert f"flow message for queue {pq}: MOVED to b3" in b2_log


def test_kill_9_of_a_childs_broker_after_delivery_completes_the_parent_once(
        split_cluster: SplitCluster, start_broker: Callable[..., Proc]) -> None:
    """The parent's owner recorded the child, but the child's broker died
    before it noted the delivery: it delivers again after restart, and the
    parent's owner sees the child key it has (a duplicate changes nothing)."""
    c = split_cluster
    pq, cqs = flow_queues(c, "b2", "b3")
    restart(c, start_broker, "b2", "broker.after_flow_deliver=kill")
    flow = Flow()

    async def first() -> str:
        async with await shardq.connect(c.url) as client:
            pid = await client.add_flow(spec(pq, cqs))
            async with running(client.worker(cqs[0], flow.child)):
                await until(lambda: not c.brokers["b2"].alive(), "b2's failpoint")
            return pid

    pid = run(first())
    restart(c, start_broker, "b2")

    async def second() -> None:
        async with await shardq.connect(c.url) as client:
            async with running(client.worker(cqs[1], flow.child)), \
                    running(client.worker(pq, flow.parent)):
                await until(lambda: _state(client, pq, pid, "completed"), "the parent to end")
            job = await job_state(client, pq, pid)
            assert job is not None and job["children"]["done"] == 2
            check_once(flow, pid, 2)

    run(second())
    poll(lambda: "already recorded on its parent" in
         c.brokers["b2"].log_path.read_text(),  # type: ignore[union-attr]
         "b2 to log the redelivery")
