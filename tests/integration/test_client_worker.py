"""Workers against a real broker: exactly-once completion, retries, close, locks."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

import shardq
from tests.aio import run, running, until


@pytest.fixture
def broker(start_broker):  # type: ignore[no-untyped-def]
    return start_broker("b1")




def test_worker_completes_every_job_exactly_once(broker) -> None:  # type: ignore[no-untyped-def]
    n = 3000

    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("work")
            await q.add_bulk([("n", {"i": i}) for i in range(n)])
            seen: collections.Counter[str] = collections.Counter()
            values: list[int] = []

            async def handle(job: shardq.Job) -> Any:
                seen[job.id] += 1
                values.append(job.data["i"])
                assert job.queue == "work" and job.name == "n"
                assert job.attempts_made == 0 and job.attempts_started == 1
                await asyncio.sleep(0.001)
                return {"double": job.data["i"] * 2}

            worker = client.worker("work", handle, concurrency=50, wait_ms=200)
            async with running(worker):
                await until(lambda: worker.completed >= n)
            assert len(seen) == n and set(seen.values()) == {1}
            assert sorted(values) == list(range(n))
            counts = await q.counts()
            assert counts["completed"] == n and counts["active"] == 0
            assert counts["waiting"] == 0
            one = next(iter(seen))
            job = await q.get_job(one)
            assert job is not None and job["state"] == "completed"
            assert job["result"] == {"double": job["data"]["i"] * 2}

    run(main())


def test_concurrency_bounds_jobs_in_flight(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("bounded")
            await q.add_bulk([("n", i) for i in range(200)])
            now = [0]
            peak = [0]

            async def handle(job: shardq.Job) -> None:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
                await asyncio.sleep(0.005)
                now[0] -= 1

            worker = client.worker("bounded", handle, concurrency=7, wait_ms=200)
            async with running(worker):
                await until(lambda: worker.completed >= 200)
            assert peak[0] == 7

    run(main())


def test_a_failing_handler_is_retried_then_fails_with_every_attempt_made(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("flaky")
            jid = await q.add("boom", {"x": 1}, attempts=3,
                              backoff={"type": "fixed", "delay_ms": 20})
            tries: list[tuple[int, int]] = []

            async def handle(job: shardq.Job) -> None:
                tries.append((job.attempts_made, job.attempts_started))
                raise ValueError(f"bad attempt {job.attempts_made}")

            worker = client.worker("flaky", handle, concurrency=2, wait_ms=100)
            async with running(worker):
                async def failed() -> bool:
                    job = await q.get_job(jid)
                    return job is not None and job["state"] == "failed"

                await until(failed)
            job = await q.get_job(jid)
            assert job is not None
            assert job["attempts_made"] == 3
            assert job["attempts_started"] == 3
            assert "bad attempt 2" in job["failed_reason"]
            assert tries == [(0, 1), (1, 2), (2, 3)]
            assert (await q.counts())["failed"] == 1

    run(main())


def test_fail_then_succeed_ends_completed_with_attempts_made_counted(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("retry-ok")
            jid = await q.add("x", None, attempts=3)

            async def handle(job: shardq.Job) -> str:
                if job.attempts_made < 2:
                    raise RuntimeError("not yet")
                return "ok"

            worker = client.worker("retry-ok", handle, wait_ms=100)
            async with running(worker):
                await until(lambda: worker.completed >= 1)
            job = await q.get_job(jid)
            assert job is not None and job["state"] == "completed"
            assert job["attempts_made"] == 3 and job["result"] == "ok"

    run(main())


def test_close_finishes_in_flight_jobs_and_stops_pulling(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("closing")
            await q.add_bulk([("n", i) for i in range(50)])
            started: list[str] = []
            finished: list[str] = []

            async def handle(job: shardq.Job) -> None:
                started.append(job.id)
                await asyncio.sleep(0.3)
                finished.append(job.id)

            worker = client.worker("closing", handle, concurrency=10, wait_ms=200)
            task = asyncio.create_task(worker.run())
            await until(lambda: worker.running == 10)
            await worker.close()
            await task
            await worker.close()  # idempotent
            assert sorted(started) == sorted(finished)
            assert len(finished) >= 10
            counts = await q.counts()
            assert counts["active"] == 0
            assert counts["completed"] == len(finished)
            assert counts["waiting"] == 50 - len(finished)

    run(main())


def test_locks_are_extended_while_a_long_handler_runs(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("slow")
            jid = await q.add("slow", None)

            async def handle(job: shardq.Job) -> str:
                await job.update_progress(50)
                await asyncio.sleep(2.5)  # > lock_ms: only EXTEND keeps the lock
                return "done"

            worker = client.worker("slow", handle, lock_ms=1000, wait_ms=100)
            async with running(worker):
                async def progressed() -> bool:
                    job = await q.get_job(jid)
                    return job is not None and job["progress"] == 50

                await until(progressed)
                await until(lambda: worker.completed >= 1)
            job = await q.get_job(jid)
            assert job is not None and job["state"] == "completed"
            assert job["attempts_started"] == 1 and job["stalled_count"] == 0

    run(main())


def test_a_worker_on_several_queues_serves_all_of_them(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            for name in ("a", "b", "c"):
                await client.queue(name).add_bulk([("n", i) for i in range(30)])
            seen: collections.Counter[str] = collections.Counter()

            async def handle(job: shardq.Job) -> None:
                seen[job.queue] += 1

            worker = client.worker(["a", "b", "c"], handle, concurrency=5, wait_ms=100)
            async with running(worker):
                await until(lambda: worker.completed >= 90)
            assert seen == {"a": 30, "b": 30, "c": 30}

    run(main())


def test_sync_handlers_and_unpackable_results(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("sync")
            ok = await q.add("ok", 1)
            bad = await q.add("bad", 2)

            def handle(job: shardq.Job) -> Any:
                return job.data + 1 if job.name == "ok" else object()

            worker = client.worker("sync", handle, wait_ms=100)
            async with running(worker):
                await until(lambda: worker.completed + worker.failed >= 2)
            job_ok, job_bad = await q.get_job(ok), await q.get_job(bad)
            assert job_ok is not None and job_ok["result"] == 2
            assert job_bad is not None and job_bad["state"] == "failed"
            assert "cannot be packed" in job_bad["failed_reason"]

    run(main())


def test_worker_picks_up_jobs_added_while_it_waits(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("later")
            got: list[Any] = []

            async def handle(job: shardq.Job) -> None:
                got.append(job.data)

            worker = client.worker("later", handle, concurrency=3, wait_ms=2000)
            async with running(worker):
                await asyncio.sleep(0.2)  # the worker is now long-polling
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                await q.add("n", "hello")
                await until(lambda: bool(got))
                assert loop.time() - t0 < 1.0  # woken by the add, not by wait_ms
            assert got == ["hello"]

    run(main())


def test_close_does_not_wait_for_an_idle_long_poll(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("idle")

            async def handle(job: shardq.Job) -> None:
                return None

            worker = client.worker("idle", handle, wait_ms=30_000)
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(0.3)  # parked at the broker now
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await worker.close()
            await task
            assert loop.time() - t0 < 1.0
            # the dropped long poll took nothing: a new job stays waiting
            await q.add("n", 1)
            await asyncio.sleep(0.1)
            assert (await q.counts())["waiting"] == 1

    run(main())


def test_a_job_added_while_the_worker_closes_is_never_left_locked(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            for round_ in range(8):
                q = client.queue(f"race-{round_}")
                done: list[str] = []

                async def handle(job: shardq.Job, done: list[str] = done) -> None:
                    done.append(job.id)

                worker = client.worker(q.name, handle, wait_ms=30_000)
                task = asyncio.create_task(worker.run())
                await asyncio.sleep(0.05 + round_ * 0.01)  # parked at the broker
                await asyncio.gather(worker.close(), q.add("n", round_))
                await task
                counts = await q.counts()
                assert counts["active"] == 0, counts
                assert counts["waiting"] + counts["completed"] == 1, counts
                assert counts["completed"] == len(done)

    run(main())


def test_client_aclose_closes_its_workers(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        client = await shardq.connect(broker.addr)
        done: list[str] = []

        async def handle(job: shardq.Job) -> None:
            await asyncio.sleep(0.2)
            done.append(job.id)

        await client.queue("q").add_bulk([("n", i) for i in range(5)])
        worker = client.worker("q", handle, concurrency=5)
        task = asyncio.create_task(worker.run())
        await until(lambda: worker.running == 5)
        await client.aclose()
        await task
        assert len(done) == 5

    run(main())
