"""A failing handler's traceback reaches `get_job` as `stacktrace` (BullMQ's
`job.stacktrace`): one entry per failed attempt, oldest first, kept across a
broker kill -9 and restart (client/worker.py, broker/jobadmin.py)."""

from __future__ import annotations

from pathlib import Path

import shardq
from tests.aio import run, running, until


def parse_invoice(n: int) -> None:
    raise ValueError(f"bad invoice {n}")


def test_each_failed_attempts_traceback_is_on_the_job_after_a_restart(
        start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "b1"
    broker = start_broker("b1", data_dir=data)

    async def fail_it() -> None:
        async with await shardq.connect(broker.addr) as client:
            q = client.queue("invoices")
            jid = await q.add("parse", {"n": 1}, job_id="inv-1", attempts=2,
                              backoff={"type": "fixed", "delay_ms": 10})

            async def handle(job: shardq.Job) -> None:
                parse_invoice(job.attempts_made)

            worker = client.worker("invoices", handle, wait_ms=100)
            async with running(worker):
                async def failed() -> bool:
                    job = await q.get_job(jid)
                    return job is not None and job["state"] == "failed"
                await until(failed)

    run(fail_it())
    broker.kill()
    broker = start_broker("b1", data_dir=data)

    async def read() -> None:
        async with await shardq.connect(broker.addr) as client:
            job = await client.queue("invoices").get_job("inv-1")
            assert job is not None
            traces = job["stacktrace"]
            assert len(traces) == 2  # both attempts: within STACKTRACE_LIMIT
            for attempt, text in enumerate(traces):
                assert text.startswith("Traceback (most recent call last):")
                assert "in parse_invoice" in text and "in handle" in text
                assert text.endswith(f"ValueError: bad invoice {attempt}\n")
            assert job["failed_reason"] == "bad invoice 1"

    run(read())
