"""The client against a coordinator and two brokers: routing by topology, MOVED."""

from __future__ import annotations

import asyncio
import collections
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import shardq
from shardq.router import slot_of
from tests.aio import run

from ..conftest import Proc

WAIT_S = 20.0



async def until(cond: Any, what: str, timeout: float = WAIT_S) -> Any:
    try:
        async with asyncio.timeout(timeout):
            while True:
                value = cond()
                if not isinstance(value, bool) and value is not None:
                    value = await value if asyncio.iscoroutine(value) else value
                if value:
                    return value
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
def cluster(procs: list[Proc], tmp_path: Path, start_broker):  # type: ignore[no-untyped-def]
    """A coordinator expecting two brokers, and the two brokers; returns (url, b1, b2)."""
    coord = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / "coordinator"),
                  "--expect", "2", "--heartbeat-timeout-ms", "1500"],
                 log_path=tmp_path / "coordinator.log")
    procs.append(coord)
    url = coord.addr if coord.addr.startswith("http") else f"http://{coord.addr}"
    b1 = start_broker("b1", "--coordinator", url)
    b2 = start_broker("b2", "--coordinator", url)

    async def bootstrapped() -> bool:
        async with httpx.AsyncClient() as http:
            topo = (await http.get(f"{url}/topology")).json()
        owners = {run_[2] for run_ in topo.get("slots", [])}
        return owners == {"b1", "b2"}

    async def wait() -> None:
        await until(bootstrapped, "both brokers to own slots")
        # ...and each broker to have received that map, so neither answers MOVED.
        for b in (b1, b2):
            async with await shardq.connect(b.addr) as client:
                await until(lambda c=client: _owns_some(c), f"{b.addr} to learn its slots")

    run(wait())
    return url, b1, b2


async def _owns_some(client: shardq.Client) -> bool:
    await client.refresh_topology()
    return len({o for o in client.topology.slot_owners if o}) == 2


QUEUES = [f"stage-{i}" for i in range(24)]


def test_connect_by_url_routes_queues_to_their_owners(cluster) -> None:  # type: ignore[no-untyped-def]
    url, b1, b2 = cluster

    async def main() -> None:
        async with await shardq.connect(url) as client:
            owners = {q: client.topology.route(q) for q in QUEUES}
            assert {o[0] for o in owners.values() if o} == {"b1", "b2"}
            for q in QUEUES:
                await client.queue(q).add_bulk([("n", {"q": q, "i": i}) for i in range(10)])
            counts = await asyncio.gather(*(client.queue(q).counts() for q in QUEUES))
            assert all(c["waiting"] == 10 for c in counts)
            # each queue really lives on its owner: ask the brokers directly
            per_broker: dict[str, set[str]] = {}
            for bid, b in (("b1", b1), ("b2", b2)):
                async with await shardq.connect(b.addr) as direct:
                    conn = await direct._cluster.connection(bid, b.addr)
                    per_broker[bid] = set(await conn.request("QUEUES", {}))
            for q, (owner, _) in owners.items():  # type: ignore[misc]
                assert q in per_broker[owner]

    run(main())


def test_connect_by_broker_address_gets_the_cluster_map(cluster) -> None:  # type: ignore[no-untyped-def]
    _, b1, _ = cluster

    async def main() -> None:
        async with await shardq.connect(b1.addr) as client:
            assert set(client.topology.brokers) == {"b1", "b2"}
            ids = await asyncio.gather(*(client.queue(q).add("n", q) for q in QUEUES))
            assert len(set(ids)) == len(QUEUES)

    run(main())


def test_a_worker_pulls_from_every_broker_owning_its_queues(cluster) -> None:  # type: ignore[no-untyped-def]
    url, _, _ = cluster

    async def main() -> None:
        async with await shardq.connect(url) as client:
            for q in QUEUES:
                await client.queue(q).add_bulk([("n", i) for i in range(20)])
            seen: collections.Counter[str] = collections.Counter()

            async def handle(job: shardq.Job) -> None:
                seen[job.queue] += 1

            worker = client.worker(QUEUES, handle, concurrency=20, wait_ms=500)
            task = asyncio.create_task(worker.run())
            await until(lambda: worker.completed >= 20 * len(QUEUES), "all jobs")
            await worker.close()
            await task
            assert seen == {q: 20 for q in QUEUES}

    run(main())


def test_a_wrong_owner_answers_moved_and_the_client_follows(cluster) -> None:  # type: ignore[no-untyped-def]
    url, _, _ = cluster

    async def main() -> None:
        async with await shardq.connect(url) as client:
            q = next(q for q in QUEUES if client.topology.route(q)[0] == "b1")  # type: ignore[index]
            jid = await client.queue(q).add("n", 1)
            # Make the client's map wrong for that slot: b2 will answer MOVED.
            slot = slot_of(q)
            client.topology.slot_owners[slot] = "b2"
            assert await client.queue(q).get_job(jid) is not None
            assert client.topology.route(q)[0] == "b1"  # type: ignore[index]
            client.topology.slot_owners[slot] = "b2"
            ids = await client.queue(q).add_bulk([("n", i) for i in range(100)])
            assert len(ids) == 100
            assert client.topology.route(q)[0] == "b1"  # type: ignore[index]
            assert (await client.queue(q).counts())["waiting"] == 101

    run(main())


def test_queues_of_a_forgotten_broker_follow_the_new_map(cluster) -> None:  # type: ignore[no-untyped-def]
    url, _, b2 = cluster

    async def main() -> None:
        async with await shardq.connect(url) as client:
            on_b2 = [q for q in QUEUES if client.topology.route(q)[0] == "b2"]  # type: ignore[index]
            assert on_b2
            epoch = client.topology.epoch
            b2.kill()  # its disk is "lost": forget gives its slots to b1 at a new epoch

            def forget() -> bool:
                r = subprocess.run([sys.executable, "-m", "shardq", "forget", "b2",
                                    "--accept-data-loss", "--coordinator", url, "--json"],
                                   capture_output=True, text=True, timeout=WAIT_S, check=False)
                return r.returncode == 0

            await until(lambda: asyncio.to_thread(forget), "b2 to be dead and forgotten")
            # The client still routes to b2; the refused connection makes it re-read the map.
            assert client.topology.route(on_b2[0])[0] == "b2"  # type: ignore[index]
            jid = await client.queue(on_b2[0]).add("n", 1)
            assert client.topology.route(on_b2[0])[0] == "b1"  # type: ignore[index]
            assert client.topology.epoch > epoch
            assert await client.queue(on_b2[0]).get_job(jid) is not None

    run(main())


def test_the_data_plane_keeps_working_with_the_coordinator_down(cluster, procs, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "shardq.client")
    url, _, _ = cluster
    coordinator = next(p for p in procs if p.addr == url or url.endswith(p.addr))

    async def main() -> None:
        async with await shardq.connect(url) as client:
            epoch = client.topology.epoch
            coordinator.kill()
            before = client._topology.refreshes
            await client.refresh_topology()  # falls back to TOPOLOGY from a broker
            assert client._topology.refreshes == before + 1
            assert "topology source failed" in caplog.text
            assert client.topology.epoch == epoch
            assert set(client.topology.brokers) == {"b1", "b2"}
            for q in QUEUES[:6]:
                await client.queue(q).add("n", 1)
                assert (await client.queue(q).counts())["waiting"] == 1

    run(main())
