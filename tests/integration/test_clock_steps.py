"""A step of the wall clock seen by one broker process moves no deadline
(broker/clock.py). The step is injected into that process only, through
SHARDQ_TEST_WALL_OFFSET_FILE; the host's clock is untouched."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import shardq
from tests.aio import run, running, until
from tests.integration.rawwire import RawConn
from tests.integration.scrape import metric


def _drift(addr: str) -> int:
    c = RawConn(addr)
    try:
        return int(c.ok("STATS", {})["clock_drift_ms"])
    finally:
        c.close()


def test_a_forward_step_does_not_expire_renewed_locks(start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    offset = tmp_path / "offset"
    offset.write_text("0")
    b = start_broker("b1", "--metrics-port", "0",
                     env={"SHARDQ_TEST_WALL_OFFSET_FILE": str(offset)})

    async def main() -> None:
        async with await shardq.connect(b.addr) as client:
            q = client.queue("locks")
            for i in range(10):
                await q.add("n", {}, job_id=f"j{i}")
            runs: collections.Counter[str] = collections.Counter()
            release = asyncio.Event()

            async def handle(job: shardq.Job) -> None:
                runs[job.id] += 1
                async with asyncio.timeout(30):
                    await release.wait()

            worker = client.worker("locks", handle, concurrency=10, lock_ms=2000)
            async with running(worker):
                await until(lambda: len(runs) == 10, "all ten jobs running")
                offset.write_text("60000")  # NTP steps this broker's wall clock by +60 s
                await until(lambda: _drift(b.addr) >= 59_000, "the broker seeing the step")
                assert metric(b, "shardq_broker_clock_drift_seconds") >= 59
                # Longer than a lock: with deadlines on the wall clock every
                # lock would have expired at once and each job run twice.
                await asyncio.sleep(3)
                release.set()
                await until(lambda: worker.completed == 10, "the jobs completing")
            assert set(runs.values()) == {1}
            for i in range(10):
                job = await q.get_job(f"j{i}")
                assert job is not None and job["state"] == "completed"
                assert job["stalled_count"] == 0 and job["attempts_started"] == 1

    run(main())


def test_a_backward_step_does_not_stretch_a_delay(start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    offset = tmp_path / "offset"
    offset.write_text("0")
    b = start_broker("b1", env={"SHARDQ_TEST_WALL_OFFSET_FILE": str(offset)})

    async def main() -> None:
        async with await shardq.connect(b.addr) as client:
            q = client.queue("later")
            await q.add("n", {}, job_id="d1", delay_ms=1500)
            offset.write_text("-60000")
            await until(lambda: _drift(b.addr) <= -59_000, "the broker seeing the step")
            # Due 1.5 s after the add, not ~61.5 s.
            await until(lambda: _waiting(q), "the delayed job coming due", timeout=8)

    async def _waiting(q: shardq.Queue) -> bool:
        return (await q.counts())["waiting"] == 1

    run(main())
