"""`shardq move QUEUE --to ID`: a hot queue's slot is pinned and moved, with its jobs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

import shardq
from shardq.router import Topology, slot_of
from tests.cluster.conftest import SplitCluster


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_move_pins_a_queue_to_a_broker_and_a_rebalance_leaves_it_there(
        split_cluster: SplitCluster) -> None:
    c = split_cluster
    queue = "hot-tenant"

    async def fill() -> str:
        async with await shardq.connect(c.url) as client:
            await client.queue(queue).add_bulk([("j", {"i": i}) for i in range(500)])
            return client.topology.route(queue)[0]  # type: ignore[index]

    owner = asyncio.run(fill())
    target = next(b for b in ("b1", "b2", "b3") if b != owner)
    r = subprocess.run([sys.executable, "-m", "shardq", "move", queue, "--to", target,
                        "--coordinator", c.url, "--json"],
                       capture_output=True, text=True, timeout=90, check=False)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["slot"] == slot_of(queue) and answer["to"] == target
    topo = Topology.from_dict(httpx.get(f"{c.url}/topology").json())
    assert topo.owner_of(queue) == target

    # Without the pin the planner would send the slot back to its ring target.
    plan = httpx.post(f"{c.url}/rebalance", json={"dry_run": True}, timeout=30).json()
    assert plan["moves"] == [], plan

    async def check() -> None:
        async with await shardq.connect(c.url) as client:
            assert client.topology.route(queue)[0] == target  # type: ignore[index]
            assert (await client.queue(queue).counts())["waiting"] == 500

    asyncio.run(check())
    bad = subprocess.run([sys.executable, "-m", "shardq", "move", queue, "--to", "nope",
                          "--coordinator", c.url], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode != 0 and "nope" in (bad.stderr + bad.stdout)
