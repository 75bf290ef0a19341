"""A broker back on an empty disk never serves its slots empty (docs/design.md §5).

`shardq cluster up -n 3` (real supervisor, coordinator and brokers): b2 loses
its data directory and is restarted at once by the supervisor, under the
same id. Its queues answer `UnavailableError` until `forget --accept-data-loss`;
a restart on the same disk keeps every slot and job; swapped data directories
are refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import shardq
from shardq.client.retry import RetryPolicy
from shardq.router import Topology
from tests.aio import run

from ..conftest import Proc, queue_on
from .conftest import http_get, poll
from .test_cluster_up import children, cli

pytestmark = pytest.mark.slow

JOBS_PER_QUEUE = 350
# Short budgets, so each refused call answers in about a second (the default
# waits 5 s for an unreachable owner to come back).
QUICK = RetryPolicy(unavailable_budget=1.0, tryagain_budget=1.0)


def b2_queues(url: str) -> list[str]:
    topo = Topology.from_dict(http_get(url, "/topology"))
    return [queue_on(topo, "b2", f"lost-{i}") for i in range(4)]


async def push(url: str, queues: list[str]) -> dict[str, int]:
    async with await shardq.connect(url) as client:
        for name in queues:
            ids = await client.queue(name).add_bulk(
                [("job", {"n": i}) for i in range(JOBS_PER_QUEUE)])
            assert len(ids) == JOBS_PER_QUEUE
        return {name: (await client.queue(name).counts())["waiting"] for name in queues}


async def refused(url: str, queue: str) -> list[str]:
    """Every kind of call on `queue` fails with UnavailableError; their messages."""
    messages = []
    async with await shardq.connect(url, policy=QUICK) as client:
        q = client.queue(queue)
        with pytest.raises(shardq.UnavailableError) as counts:
            await q.counts()
        with pytest.raises(shardq.UnavailableError) as add:
            await q.add("after-loss", {})
        with pytest.raises(shardq.UnavailableError) as bulk:
            await q.add_bulk([("bulk-after-loss", {})])
        messages += [str(counts.value), str(add.value), str(bulk.value)]
    return messages


async def counts_of(url: str, queues: list[str]) -> dict[str, int]:
    async with await shardq.connect(url) as client:
        return {name: (await client.queue(name).counts())["waiting"] for name in queues}


async def add_one(url: str, queue: str) -> dict[str, Any]:
    async with await shardq.connect(url) as client:
        q = client.queue(queue)
        await q.add("after-forget", {"ok": True})
        return await q.counts()


def state_of(url: str, bid: str) -> str | None:
    status = http_get(url, "/status")
    if status is None:
        return None
    return next((b["state"] for b in status["brokers"] if b["id"] == bid), None)


def test_a_broker_back_on_an_empty_disk_is_held_until_forget(cluster: Proc,
                                                             tmp_path: Path) -> None:
    url = cluster.addr
    data = tmp_path / "data"
    queues = b2_queues(url)
    assert run(push(url, queues)) == dict.fromkeys(queues, JOBS_PER_QUEUE)
    pid = children(cluster.pid)["b2"]

    # The disk is lost: the directory goes away under the running broker
    # (it keeps its open files), then the broker dies; the supervisor
    # restarts it at once, on an empty directory, under the same id.
    (data / "b2").rename(tmp_path / "b2-lost-disk")
    os.kill(pid, signal.SIGKILL)

    poll(lambda: state_of(url, "b2") == "lost-storage", "b2 held as lost-storage")
    assert children(cluster.pid)["b2"] != pid  # it is up again, held
    for message in run(refused(url, queues[0])):
        assert "b2" in message and "storage" in message, message

    status = http_get(url, "/status")
    [b2] = [b for b in status["brokers"] if b["id"] == "b2"]
    assert b2["slots"] > 0 and "forget b2 --accept-data-loss" in b2["problem"]
    table = subprocess.run([sys.executable, "-m", "shardq", "status", "--coordinator", url],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    assert "lost-storage" in table and "forget b2 --accept-data-loss" in table
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert 'shardq_broker_lost_storage{broker="b2"} 1.0' in metrics
    logs = data / "logs"
    assert "lost-storage" in (logs / "coordinator.log").read_text()
    assert "not serving the slots" in (logs / "b2.log").read_text()

    forgotten = cli("forget", "b2", "--accept-data-loss", "--json", "--coordinator", url)
    assert forgotten["reassigned"] == {"b2": b2["slots"]}

    poll(lambda: state_of(url, "b2") == "active", "b2 active again")
    after = run(add_one(url, queues[0]))
    assert after["waiting"] == 1  # empty (the loss was accepted) and writable
    assert run(counts_of(url, queues[1:])) == dict.fromkeys(queues[1:], 0)
    assert Topology.from_dict(http_get(url, "/topology")).owner_of(queues[0]) == "b2"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_restart_on_the_same_disk_keeps_every_slot_and_job(cluster: Proc,
                                                             sig: signal.Signals) -> None:
    url = cluster.addr
    queues = b2_queues(url)
    before = http_get(url, "/topology")
    assert run(push(url, queues)) == dict.fromkeys(queues, JOBS_PER_QUEUE)
    pid = children(cluster.pid)["b2"]

    os.kill(pid, sig)

    poll(lambda: children(cluster.pid).get("b2") not in (None, pid), "b2 restarted")
    assert run(counts_of(url, queues)) == dict.fromkeys(queues, JOBS_PER_QUEUE)
    after = http_get(url, "/topology")
    assert after["slots"] == before["slots"]  # a rolling restart moves nothing
    assert {b["state"] for b in after["brokers"].values()} == {"active"}


def test_swapped_data_directories_are_refused(start_broker: Any, tmp_path: Path) -> None:
    first = start_broker("b1", data_dir=tmp_path / "b1-data")
    assert first.terminate() == 0

    r = subprocess.run(
        [sys.executable, "-m", "shardq", "broker", "--id", "b2", "--port", "0",
         "--data-dir", str(tmp_path / "b1-data")],
        capture_output=True, text=True, timeout=30, check=False)

    assert r.returncode == 2
    assert "READY" not in r.stdout
    assert "belongs to broker 'b1'" in r.stderr and "swapped" in r.stderr
    again = start_broker("b1", data_dir=tmp_path / "b1-data")  # its own id still starts
    assert again.alive()
