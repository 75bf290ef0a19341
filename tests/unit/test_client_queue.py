"""Queue and Client over in-memory channels: wire shape of adds, partitions, fan-out."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from shardq.client import Client
from shardq.router import Topology, partition_for
from tests.aio import run

from .test_client_cluster import FakeChannel

COUNTS = {"waiting": 2, "delayed": 1, "active": 0, "completed": 5, "failed": 1, "paused": False}


def script(bid: str, op: str, args: Any) -> Any:
    if op == "ADD":
        return [job[0] for job in args["jobs"]]
    if op == "COUNTS":
        return dict(COUNTS)
    if op == "GET_JOB":
        if args["queue"].endswith("~2"):
            return {"id": args["id"], "data": msgpack.packb({"a": 1}), "result": None}
        return None
    return None


async def make_client(partitions: dict[str, int] | None = None) -> tuple[Client, list[Any]]:
    log: list[Any] = []

    async def connector(addr: str) -> Any:
        return FakeChannel(addr, "b1", script, log)

    client = Client(seeds=["h:1"], connector=connector)
    topo = Topology.standalone("b1", "h:1")
    topo.partitions.update(partitions or {})
    client._topology.replace(topo)
    return client, log


def test_add_sends_packed_data_default_opts_as_nil_and_a_uuid7() -> None:
    async def main() -> None:
        client, log = await make_client()
        jid = await client.queue("q").add("send", {"to": "a@b"})
        await client.queue("q").add("send", None, priority=3, attempts=2, job_id="mine",
                                    remove_on_complete=True, group="g")
        (_, op, args), (_, _, args2) = log
        assert op == "ADD" and args["queue"] == "q"
        wid, name, data, opts = args["jobs"][0]
        assert (wid, name, opts) == (jid, "send", None)
        assert msgpack.unpackb(data) == {"to": "a@b"}
        assert args2["jobs"][0][0] == "mine"
        assert args2["jobs"][0][3] == {"priority": 3, "attempts": 2,
                                       "remove_on_complete": True, "group": "g"}
        await client.aclose()

    run(main())


def test_add_bulk_accepts_pairs_and_triples_with_options() -> None:
    async def main() -> None:
        client, log = await make_client()
        ids = await client.queue("q").add_bulk(
            [("a", 1), ("b", 2, {"priority": 1, "job_id": "x", "delay_ms": 5})])
        assert ids[1] == "x"
        jobs = log[0][2]["jobs"]
        assert jobs[0][3] is None
        assert jobs[1][3] == {"priority": 1, "delay_ms": 5}
        with pytest.raises(ValueError):
            await client.queue("q").add_bulk([("only-name",)])
        await client.aclose()

    run(main())


def test_partitioned_queue_add_picks_the_partition_by_key_or_id() -> None:
    async def main() -> None:
        client, log = await make_client({"hot": 4})
        q = client.queue("hot")
        jid = await q.add("n", 1)
        await q.add("n", 2, partition_key="tenant-7")
        ids = await q.add_bulk([("n", 3, {"partition_key": "tenant-7"})])
        assert ids
        queues = [args["queue"] for _, op, args in log if op == "ADD"]
        assert queues[0] == f"hot~{partition_for(jid, 4)}"
        assert queues[1] == queues[2] == f"hot~{partition_for('tenant-7', 4)}"
        await client.aclose()

    run(main())


def test_partitioned_queue_counts_sum_and_get_job_searches_partitions() -> None:
    async def main() -> None:
        client, log = await make_client({"hot": 3})
        q = client.queue("hot")
        counts = await q.counts()
        assert counts["waiting"] == 6 and counts["completed"] == 15
        assert counts["paused"] is False
        assert sorted(args["queue"] for _, op, args in log) == ["hot~0", "hot~1", "hot~2"]
        job = await q.get_job("j1")
        assert job is not None and job["data"] == {"a": 1} and job["queue"] == "hot"
        await q.pause()
        assert len([1 for _, op, _ in log if op == "PAUSE"]) == 3
        await client.aclose()

    run(main())


def test_queue_objects_are_cached() -> None:
    async def main() -> None:
        client, _ = await make_client()
        assert client.queue("a") is client.queue("a")
        await client.aclose()

    run(main())
