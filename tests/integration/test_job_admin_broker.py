"""Job management on one broker process through kill -9: every action's
effect survives both ways back - replayed from the redo log (killed right
after the answers) and read from the checkpointed jobs table alone (killed
once the idle broker emptied its log)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import shardq
from tests.aio import run, running, until
from tests.integration.rawwire import RawConn

HOUR = 3_600_000


async def act(addr: str, checkpointed: bool) -> dict[str, Any]:
    """Jobs in every state, then every action once; returns what the getters say.
    `checkpointed`: the jobs' rows are checkpointed before the actions, so
    only the actions' ops make them dirty again."""
    async with await shardq.connect(addr) as client:
        q = client.queue("adm")
        await q.add("n", {}, job_id="c0")
        await q.add("n", {}, job_id="f0")
        await q.add("n", {}, job_id="f1")
        ended: set[str] = set()

        async def handle(job: shardq.Job) -> None:
            ended.add(job.id)
            if job.id.startswith("f"):
                raise RuntimeError("boom")

        async with running(client.worker("adm", handle)):
            await until(lambda: len(ended) == 3, "3 jobs to end")
        for i in range(5):
            await q.add("n", {"i": i}, job_id=f"w{i}", attempts=4)
        await q.add("n", {}, job_id="d0", delay_ms=HOUR)
        await q.add("n", {}, job_id="d1", delay_ms=HOUR)
        if checkpointed:
            await asyncio.to_thread(wait_checkpointed, addr)
        await q.retry_job("f0")
        await q.remove_job("w0")
        await q.promote_job("d0")
        await q.update_job_data("w1", [1, 2])
        await q.change_job_priority("w2", 9)
        await q.change_job_delay("w3", HOUR)
        await q.discard_job("w4")
        await q.set_retention(keep_completed=0)
        return await getters(q)


async def getters(q: shardq.Queue) -> dict[str, Any]:
    return {"counts": await q.get_job_counts(),
            "jobs": [(j["id"], j["state"], j["priority"], j["attempts"], j["data"],
                      j["attempts_made"]) for j in await q.get_jobs(asc=True)]}


async def read(addr: str) -> dict[str, Any]:
    async with await shardq.connect(addr) as client:
        return await getters(client.queue("adm"))


def wait_checkpointed(addr: str) -> None:
    c = RawConn(addr)
    deadline = time.monotonic() + 15
    while (rows := c.ok("STATS", {})["log_rows"]) > 0:
        assert time.monotonic() < deadline, f"log still holds {rows} rows while idle"
        time.sleep(0.05)
    c.close()


@pytest.mark.parametrize("checkpointed", [False, True], ids=["from-log", "from-checkpoint"])
def test_every_action_survives_kill_9(start_broker, tmp_path: Path,  # type: ignore[no-untyped-def]
                                      checkpointed: bool) -> None:
    data = tmp_path / "b1"
    b = start_broker("b1", data_dir=data)
    want = run(act(b.addr, checkpointed))
    jobs = {j[0]: j for j in want["jobs"]}
    assert "w0" not in jobs and "c0" not in jobs  # removed; retention 0
    assert jobs["f0"][1] == "waiting" and jobs["f0"][5] == 0
    assert jobs["w1"][4] == [1, 2] and jobs["w2"][2] == 9 and jobs["w4"][3] == 1
    assert jobs["w3"][1] == "delayed" and jobs["d0"][1] == "waiting"
    assert want["counts"]["completed_total"] == 1 and want["counts"]["failed_total"] == 2
    if checkpointed:
        wait_checkpointed(b.addr)
    b.kill()
    b2 = start_broker("b1", data_dir=data)
    assert run(read(b2.addr)) == want
    if checkpointed:
        assert RawConn(b2.addr).ok("STATS", {})["log_rows"] == 0  # the jobs table alone
