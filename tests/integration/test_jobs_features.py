"""Job features against real broker processes (docs/design.md §11, docs/features-jobs.md):
dead-letter queue, job logs, attempt timeouts, TTL, events, process-pool workers;
logs, DLQ entries and TTL deadlines survive kill -9 and a restart."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

import shardq
from shardq import protocol
from tests.aio import run, running
from tests.integration import jobfns
from tests.integration.rawwire import RawConn


@pytest.fixture
def broker(start_broker):  # type: ignore[no-untyped-def]
    return start_broker("b1")



async def next_event(sub: Any, kind: str, job_id: str | None = None) -> Any:
    async for ev in sub:
        if ev.type == kind and (job_id is None or ev.job_id == job_id):
            return ev
    raise AssertionError("subscription ended")


async def fail_for_good(client: shardq.Client, queue: str, ids: list[str]) -> None:
    """Run ids through a worker that always raises, until each is final-failed."""
    async def handle(job: shardq.Job) -> None:
        raise RuntimeError(f"boom {job.id}")

    sub = await client.events(queue)
    left = set(ids)
    async with running(client.worker(queue, handle, concurrency=4)):
        async for ev in sub:
            if ev.type == "failed" and ev.data["final"]:
                left.discard(ev.job_id)
                if not left:
                    break
    await sub.aclose()


# ---------------------------------------------------------------- DLQ
def test_dlq_lists_retries_and_purges_final_failures(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("dlq")
            ids = [f"d{i}" for i in range(5)]
            for jid in ids:
                await q.add("n", {"i": jid}, job_id=jid, attempts=2)
            await q.add("n", {}, job_id="keep", attempts=1, remove_on_fail=True)
            await fail_for_good(client, "dlq", [*ids, "keep"])

            listed = await q.dlq_list()
            assert [j["id"] for j in listed] == sorted(ids, key=[j["id"] for j in listed].index)
            assert {j["id"] for j in listed} == set(ids)  # remove_on_fail: not kept anywhere
            for j in listed:
                assert (j["state"], j["dlq"], j["dlq_reason"]) == ("failed", True,
                                                                    "attempts exhausted")
                assert j["attempts_made"] == 2 and j["failed_reason"].startswith("boom")
            job = await q.get_job("d0")
            assert job is not None and job["dlq"] is True
            assert (await q.counts())["failed"] == 5

            assert await q.dlq_retry(["d0", "d1", "nope"]) == 2
            for jid in ("d0", "d1"):
                job = await q.get_job(jid)
                assert job is not None
                assert (job["state"], job["attempts_made"], job["dlq"]) == ("waiting", 0, False)
            assert {j["id"] for j in await q.dlq_list()} == {"d2", "d3", "d4"}

            done: list[str] = []

            async def ok(job: shardq.Job) -> str:
                done.append(job.id)
                return "fine"

            sub = await client.events("dlq")
            async with running(client.worker("dlq", ok)):
                await next_event(sub, "completed", "d1")
                if "d0" not in done:
                    await next_event(sub, "completed", "d0")
            await sub.aclose()
            assert sorted(done) == ["d0", "d1"]

            assert await q.dlq_purge() == 3
            assert await q.dlq_list() == []
            assert await q.get_job("d2") is None
            assert await q.dlq_retry() == 0
            # A purged id stays a tombstone: adding it again changes nothing.
            assert await q.add("n", {}, job_id="d2") == "d2"
            assert await q.get_job("d2") is None

    run(main())


def test_dlq_and_logs_refuse_bad_input(broker) -> None:  # type: ignore[no-untyped-def]
    conn = RawConn(broker.addr)
    try:
        assert conn.call("DLQ_RETRY", {"queue": "bad", "ids": [1, 2]})[1] == "BAD_REQUEST"
        assert conn.call("DLQ_LIST", {"queue": "bad", "limit": -1})[1] == "BAD_REQUEST"
        assert conn.call("LOG", {"queue": "bad", "id": "x", "token": 1})[1] == "BAD_REQUEST"
        assert conn.call("LOG", {"queue": "bad", "id": "x", "token": 1, "line": "l"})[1] \
            == "NOT_FOUND"
        reply = conn.call("ADD", {"queue": "bad", "jobs": [["j", "n", b"\xc0",
                                                             {"ttl_ms": 0}]]})
        assert reply[1] == "ok" and reply[2][0][0] == "BAD_REQUEST"
        reply = conn.call("ADD", {"queue": "bad", "jobs": [["j", "n", b"\xc0",
                                                             {"timeout_ms": "soon"}]]})
        assert reply[2][0][0] == "BAD_REQUEST"
        assert conn.call("SUBSCRIBE", {"queue": "bad", "after_seq": -3})[1] == "BAD_REQUEST"
        assert conn.ok("GET_LOGS", {"queue": "bad", "id": "x"}) == []
        assert conn.ok("PING", {}) == "pong"
    finally:
        conn.close()


# ---------------------------------------------------------------- logs, timeouts, TTL
def test_job_logs_are_kept_in_order_and_refused_without_the_lock(  # type: ignore[no-untyped-def]
        broker) -> None:
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("logs")
            await q.add("n", {}, job_id="j", attempts=2)
            held: list[shardq.Job] = []

            async def handle(job: shardq.Job) -> str:
                for i in range(3):
                    await job.log(f"attempt {job.attempts_made} line {i}")
                if job.attempts_made == 0:
                    held.append(job)
                    raise RuntimeError("again")
                return "ok"

            sub = await client.events("logs")
            async with running(client.worker("logs", handle)):
                await next_event(sub, "completed", "j")
            await sub.aclose()
            assert await q.get_logs("j") == [f"attempt {a} line {i}" for a in (0, 1)
                                             for i in range(3)]
            assert await q.get_logs("unknown") == []
            with pytest.raises(shardq.LockLostError):
                await held[0].log("too late")

    run(main())


def test_timeout_cancels_the_handler_fails_the_attempt_and_retries(  # type: ignore[no-untyped-def]
        broker) -> None:
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("slow")
            await q.add("n", {}, job_id="retried", attempts=2, timeout_ms=200)
            await q.add("n", {}, job_id="dead", attempts=1, timeout_ms=200)
            cancelled: list[str] = []

            async def handle(job: shardq.Job) -> str:
                if job.id == "retried" and job.attempts_made == 1:
                    return "second try"
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancelled.append(job.id)
                    raise
                return "never"

            sub = await client.events("slow")
            t0 = time.monotonic()
            async with running(client.worker("slow", handle, concurrency=2)):
                failed = await next_event(sub, "failed", "retried")
                assert failed.data["final"] is False and "timed out" in failed.data["reason"]
                await next_event(sub, "completed", "retried")
            await sub.aclose()
            assert time.monotonic() - t0 < 10  # not the handler's 30 s
            assert sorted(cancelled) == ["dead", "retried"]
            job = await q.get_job("retried")
            assert job is not None
            assert (job["state"], job["attempts_made"], job["result"]) == ("completed", 2,
                                                                            "second try")
            dead = await q.get_job("dead")
            assert dead is not None and dead["state"] == "failed" and dead["dlq"] is True
            assert "timed out" in dead["failed_reason"]

    run(main())


def test_ttl_expired_job_is_never_handed_out_and_goes_to_the_dlq(  # type: ignore[no-untyped-def]
        broker) -> None:
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("ttl")
            await q.pause()  # paused time counts against the TTL
            await q.add("n", {}, job_id="late", ttl_ms=300)
            await q.add("n", {}, job_id="fresh", ttl_ms=60_000)
            sub = await client.events("ttl")
            ev = await next_event(sub, "failed", "late")  # the broker timer discarded it
            assert ev.data == {"reason": "ttl expired before the job started", "final": True}
            await sub.aclose()
            await q.resume()
            conn = RawConn(broker.addr)
            try:
                got = conn.ok("PULL", {"queues": ["ttl"], "count": 10, "lock_ms": 5000})
            finally:
                conn.close()
            assert [w[protocol.J_ID] for w in got] == ["fresh"]
            [late] = await q.dlq_list()
            assert (late["id"], late["dlq_reason"], late["attempts_made"]) == ("late",
                                                                                "ttl expired", 0)

    run(main())


def test_logs_dlq_and_ttl_survive_kill_9(start_broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data_dir = tmp_path / "b1-data"
    b1 = start_broker("b1", data_dir=data_dir)
    conn = RawConn(b1.addr)
    try:
        add = [["logged", "n", b"\xc0", {"attempts": 1}], ["dead", "n", b"\xc0", None]]
        assert conn.ok("ADD", {"queue": "dur", "jobs": add}) == ["logged", "dead"]
        got = conn.ok("PULL", {"queues": ["dur"], "count": 2, "lock_ms": 60_000})
        tokens = {w[protocol.J_ID]: w[protocol.J_TOKEN] for w in got}
        for i in range(5):
            conn.ok("LOG", {"queue": "dur", "id": "logged", "token": tokens["logged"],
                            "line": f"line {i}"})
        conn.ok("FAIL", {"items": [["dur", "dead", tokens["dead"], "broken"]]})
        # Paused: the TTL runs while the broker is down and after it restarts.
        conn.ok("PAUSE", {"queue": "dur"})
        conn.ok("ADD", {"queue": "dur", "jobs": [["ttl", "n", b"\xc0", {"ttl_ms": 1500}]]})
        added = time.monotonic()
    finally:
        conn.close()
    b1.kill()
    b1 = start_broker("b1", data_dir=data_dir)
    conn = RawConn(b1.addr)
    try:
        assert conn.ok("GET_LOGS", {"queue": "dur", "id": "logged"}) == [
            f"line {i}" for i in range(5)]
        dlq = conn.ok("DLQ_LIST", {"queue": "dur"})
        assert [(j["id"], j["dlq_reason"], j["failed_reason"]) for j in dlq] == [
            ("dead", "attempts exhausted", "broken")]
        assert conn.ok("GET_JOB", {"queue": "dur", "id": "ttl"})["state"] == "waiting"
        deadline = added + 15
        while conn.ok("GET_JOB", {"queue": "dur", "id": "ttl"})["state"] != "failed":
            assert time.monotonic() < deadline, "the restored TTL never fired"
            time.sleep(0.05)
        assert time.monotonic() - added >= 1.4
        dlq = conn.ok("DLQ_LIST", {"queue": "dur"})
        assert [(j["id"], j["dlq_reason"]) for j in dlq] == [
            ("dead", "attempts exhausted"), ("ttl", "ttl expired")]
        conn.ok("RESUME", {"queue": "dur"})
        assert conn.ok("PULL", {"queues": ["dur"], "count": 10, "lock_ms": 1000}) == []
    finally:
        conn.close()


# ---------------------------------------------------------------- events
def test_events_report_a_jobs_life(broker) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("ev")
            sub = await client.events("ev")
            await q.add("n", {}, job_id="a", attempts=2)

            async def handle(job: shardq.Job) -> dict[str, int]:
                await job.update_progress(50)
                if job.attempts_made == 0:
                    raise RuntimeError("first")
                return {"x": 1}

            seen: list[tuple[str, Any]] = []
            async with running(client.worker("ev", handle)):
                async for ev in sub:
                    assert (ev.queue, ev.job_id, ev.partition) == ("ev", "a", "ev")
                    seen.append((ev.type, ev.data))
                    if ev.type == "completed":
                        break
            await sub.aclose()
            assert seen == [("added", {"name": "n"}), ("active", {"attempts_started": 1}),
                            ("progress", 50), ("failed", {"reason": "first", "final": False}),
                            ("active", {"attempts_started": 2}), ("progress", 50),
                            ("completed", {"x": 1})]
            assert [ev async for ev in sub] == []  # closed: iteration ends

    run(main())


# ---------------------------------------------------------------- process pool
def test_process_pool_worker_runs_cpu_bound_handlers_without_blocking_the_loop(  # type: ignore[no-untyped-def]
        broker) -> None:
    n_jobs = 8

    async def main() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("cpu")
            ids = await q.add_bulk([("burn", {"n": 400_000}) for _ in range(n_jobs)])
            await q.add("explode", {"n": 7}, job_id="bad")
            with pytest.raises(ValueError, match="sync"):
                client.worker("cpu", _async_handler, processes=2)
            gaps: list[float] = []
            stop = asyncio.Event()

            async def ticker() -> None:
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            sub = await client.events("cpu")
            tick = asyncio.create_task(ticker())
            done = 0
            async with running(client.worker("cpu", jobfns.dispatch, concurrency=4,
                                             processes=2)):
                async for ev in sub:
                    if ev.type == "completed" or (ev.type == "failed" and ev.data["final"]):
                        done += 1
                        if done == n_jobs + 1:
                            break
            stop.set()
            await tick
            await sub.aclose()
            counts = await q.counts()
            assert (counts["completed"], counts["failed"]) == (n_jobs, 1)
            bad = await q.get_job("bad")
            assert bad is not None and "bad input 7" in bad["failed_reason"]
            results = [await q.get_job(i) for i in ids]
            pids = {r["result"]["pid"] for r in results if r is not None}
            assert len(pids) == 2 and os.getpid() not in pids  # ran in the pool's processes
            # The loop kept ticking while the CPU-bound handlers ran.
            assert len(gaps) > 20 and max(gaps) < 0.25, max(gaps)

    run(main(), timeout=90)


async def _async_handler(job: Any) -> None:
    return None
