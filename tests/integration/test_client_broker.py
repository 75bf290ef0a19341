"""The client against a real standalone broker process (queue API, batching, auth)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import shardq
from shardq.client.retry import RetryPolicy
from tests.aio import run, running


@pytest.fixture
def broker(start_broker):  # type: ignore[no-untyped-def]
    return start_broker("b1")


def test_add_then_get_job_round_trips_data_and_options(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("emails")
            jid = await q.add("send", {"to": "a@b", "n": [1, 2]}, priority=2, attempts=3,
                              backoff={"type": "fixed", "delay_ms": 10})
            job = await q.get_job(jid)
            assert job is not None
            assert job["id"] == jid and job["name"] == "send"
            assert job["data"] == {"to": "a@b", "n": [1, 2]}
            assert job["state"] == "waiting"
            assert job["priority"] == 2
            assert job["attempts_made"] == 0
            assert await q.get_job("no-such-job") is None

    run(main())


def test_client_generated_ids_are_uuid7(broker) -> None:  # type: ignore[no-untyped-def]
    import uuid

    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            jid = await client.queue("q").add("x")
            assert uuid.UUID(jid).version == 7

    run(main())


def test_adding_an_existing_id_returns_it_and_changes_nothing(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("dedup")
            assert await q.add("a", {"v": 1}, job_id="job-1") == "job-1"
            assert await q.add("b", {"v": 2}, job_id="job-1") == "job-1"
            ids = await q.add_bulk([("c", {"v": 3}, {"job_id": "job-1"}), ("d", {"v": 4})])
            assert ids[0] == "job-1"
            job = await q.get_job("job-1")
            assert job is not None and job["name"] == "a" and job["data"] == {"v": 1}
            assert (await q.counts())["waiting"] == 2

    run(main())


def test_add_bulk_returns_ids_in_order(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("bulk")
            entries: list[Any] = [("n", {"i": i}) for i in range(12_000)]
            entries[5] = ("n", {"i": 5}, {"priority": 1, "job_id": "x"})
            ids = await q.add_bulk(entries)
            assert len(ids) == 12_000 and ids[5] == "x"
            assert len(set(ids)) == 12_000
            assert (await q.counts())["waiting"] == 12_000
            job = await q.get_job(ids[11_999])
            assert job is not None and job["data"] == {"i": 11_999}

    run(main())


def test_counts_pause_resume_drain_obliterate(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("admin")
            await q.add_bulk([("n", i) for i in range(10)])
            await q.add("later", None, delay_ms=60_000)
            counts = await q.counts()
            assert counts["waiting"] == 10 and counts["delayed"] == 1
            assert counts["paused"] is False
            await q.pause()
            assert (await q.counts())["paused"] is True
            await q.resume()
            assert (await q.counts())["paused"] is False
            assert await q.drain() == 10
            counts = await q.counts()
            assert counts["waiting"] == 0 and counts["delayed"] == 1
            await q.obliterate()
            assert (await q.counts())["delayed"] == 0

    run(main())


def test_concurrent_adds_are_batched_into_few_frames(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("batched")
            before = client.add_frames_sent
            ids = await asyncio.gather(*(q.add("n", i) for i in range(200)))
            assert len(set(ids)) == 200
            assert client.add_frames_sent - before <= 2
            assert (await q.counts())["waiting"] == 200

    run(main())


def test_many_adds_from_many_tasks(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("tasks")

            async def producer(k: int) -> None:
                for i in range(100):
                    await q.add("n", {"k": k, "i": i})

            await asyncio.gather(*(producer(k) for k in range(100)))
            assert (await q.counts())["waiting"] == 10_000
            assert client.add_frames_sent <= 200  # ~one frame per round of the 100 producers

    run(main())


def test_connect_accepts_lists_and_skips_dead_seeds(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        for target in ([broker.addr], f"127.0.0.1:1,{broker.addr}"):
            async with await shardq.connect(target) as client:
                assert "b1" in client.topology.brokers
                await client.queue("q").add("x")

    run(main())


def test_wrong_or_missing_token_raises_auth_error(start_broker) -> None:  # type: ignore[no-untyped-def]
    b = start_broker("b1", "--token", "s3cret")

    async def main() -> None:
        with pytest.raises(shardq.AuthError):
            await shardq.connect(b.addr, token="wrong")
        with pytest.raises(shardq.AuthError):
            await shardq.connect(b.addr)
        async with await shardq.connect(b.addr, token="s3cret") as client:
            assert await client.queue("q").add("x", job_id="j") == "j"

    run(main())


def test_a_dead_broker_raises_unavailable_after_the_budget(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        policy = RetryPolicy(unavailable_budget=1.0)
        async with await shardq.connect(broker.addr, policy=policy) as client:
            q = client.queue("q")
            await q.add("x")
            broker.kill()
            with pytest.raises(shardq.UnavailableError) as info:
                await q.add("y")
            assert info.value.broker == "b1"
            with pytest.raises(shardq.UnavailableError):
                await q.counts()

    run(main())


def test_aclose_is_idempotent(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        client = await shardq.connect(broker.addr)
        await client.queue("q").add("x")
        await client.aclose()
        await client.aclose()
        with pytest.raises(shardq.ShardqError):
            await client.queue("q").add("y")

    run(main())


def test_calls_on_a_closed_client_fail_at_once(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        client = await shardq.connect(broker.addr)
        q = client.queue("q")
        await q.add("x")
        await client.aclose()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(shardq.ConnectionClosedError):
            await q.counts()
        with pytest.raises(shardq.ConnectionClosedError):
            await q.add_bulk([("n", 1)])
        assert loop.time() - t0 < 1.0

    run(main())


def test_delayed_jobs_over_many_queues_each_start_at_their_own_time(broker) -> None:  # type: ignore[no-untyped-def]
    """The broker's timer visits only the queues that are due (a heap of queues by
    next due time): 200 queues, each with one job delayed a different amount; every
    delayed job is delivered, none before its time by the broker's clock."""
    async def main() -> dict[str, tuple[int, int]]:
        async with await shardq.connect(broker.addr) as client:
            t0: dict[str, int] = {}
            for i in range(200):
                q = client.queue(f"dq-{i:03d}")
                jid = await q.add("d", None, delay_ms=20 + 3 * i)
                job = await q.get_job(jid)
                t0[f"dq-{i:03d}"] = job["timestamp"] + job["delay_ms"]
            started: dict[str, tuple[int, int]] = {}
            done = asyncio.Event()

            async def handle(job: shardq.Job) -> None:
                info = await client.queue(job.queue).get_job(job.id)
                started[job.queue] = (t0[job.queue], info["processed_on"])
                if len(started) == len(t0):
                    done.set()

            async with running(client.worker(list(t0), handle, concurrency=50)), \
                    asyncio.timeout(30):
                await done.wait()
            return started

    started = run(main())
    assert len(started) == 200
    early = {q: (due, at) for q, (due, at) in started.items() if at < due}
    assert not early, f"started before their delay: {sorted(early.items())[:5]}"
