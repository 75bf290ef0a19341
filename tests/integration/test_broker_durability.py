"""Durable mode: what was answered survives kill -9 (docs/design.md §9.1, §9.2)."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import pytest

import shardq
from tests.aio import run
from tests.integration.rawwire import RawConn, add_args


async def work_all(addr: str, queues: list[str], expected: int) -> collections.Counter[str]:
    """Run one worker over `queues` until `expected` jobs were handled."""
    seen: collections.Counter[str] = collections.Counter()
    enough = asyncio.Event()

    async def handle(job: Any) -> str:
        seen[f"{job.queue}/{job.id}"] += 1
        if sum(seen.values()) >= expected:
            enough.set()
        return "ok"

    async with await shardq.connect(addr) as client:
        worker = client.worker(queues, handle, concurrency=50)
        task = asyncio.create_task(worker.run())
        await enough.wait()
        await worker.close()
        await task
    return seen


def test_kill9_while_four_clients_push_keeps_every_answered_add(
        start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "b1"
    broker = start_broker("b1", data_dir=data)
    queues = [f"crash-{i}" for i in range(8)]
    answered: set[str] = set()

    async def push(client_no: int, stop: asyncio.Event) -> None:
        async with await shardq.connect(broker.addr) as client:
            i = 0
            while not stop.is_set():
                q = queues[(client_no + i) % len(queues)]
                jid = f"c{client_no}-{i}"
                i += 1
                try:
                    await client.queue(q).add("job", {"n": i}, job_id=jid)
                except shardq.ShardqError:
                    return
                answered.add(f"{q}/{jid}")

    async def phase1() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(push(n, stop)) for n in range(4)]
        while len(answered) < 3000:
            await asyncio.sleep(0.01)
        broker.kill()  # kill -9 mid-stream
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    run(phase1())
    assert len(answered) >= 3000
    restarted = start_broker("b1", data_dir=data)

    async def present() -> int:
        async with await shardq.connect(restarted.addr) as client:
            missing = []
            for key in sorted(answered):
                q, jid = key.split("/")
                if await client.queue(q).get_job(jid) is None:
                    missing.append(key)
            assert not missing, f"{len(missing)} answered adds lost, e.g. {missing[:5]}"
            return sum([(await client.queue(q).counts())["waiting"] for q in queues])

    total = run(present())
    assert total >= len(answered)
    seen = run(work_all(restarted.addr, queues, total))
    assert set(seen) >= answered
    assert max(seen.values()) == 1, "a job was worked twice"
    assert sum(seen.values()) == total


def test_an_add_killed_after_fsync_is_kept_and_its_resend_is_idempotent(
        start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "b1"
    assert start_broker("b1", data_dir=data).terminate() == 0  # bootstrap (its own commit)
    b = start_broker("b1", data_dir=data, env={"SHARDQ_FAILPOINTS": "commit.after_fsync=kill"})
    c = RawConn(b.addr)
    with pytest.raises(ConnectionError):
        c.call("ADD", add_args("fp", "only-once"))  # dies before answering
    c.close()
    b.popen.wait(timeout=10)
    b2 = start_broker("b1", data_dir=data)
    c2 = RawConn(b2.addr)
    assert c2.ok("GET_JOB", {"queue": "fp", "id": "only-once"})["state"] == "waiting"
    assert c2.ok("ADD", add_args("fp", "only-once")) == ["only-once"]  # the client's resend
    assert c2.ok("COUNTS", {"queue": "fp"})["waiting"] == 1
    c2.close()


def test_an_add_killed_before_fsync_was_never_answered_nor_kept(
        start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "b1"
    assert start_broker("b1", data_dir=data).terminate() == 0  # bootstrap (its own commit)
    b = start_broker("b1", data_dir=data, env={"SHARDQ_FAILPOINTS": "commit.before_fsync=kill"})
    c = RawConn(b.addr)
    with pytest.raises(ConnectionError):
        c.call("ADD", add_args("fp", "never"))
    c.close()
    b.popen.wait(timeout=10)
    b2 = start_broker("b1", data_dir=data)
    c2 = RawConn(b2.addr)
    assert c2.ok("GET_JOB", {"queue": "fp", "id": "never"}) is None
    c2.close()


@pytest.mark.parametrize("stop", ["kill", "term"])
def test_restart_rebuilds_every_kind_of_state(start_broker, tmp_path: Path, stop: str) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "b1"
    b = start_broker("b1", data_dir=data)
    c = RawConn(b.addr)
    c.ok("ADD", add_args("s", "w1", "w2"))
    c.ok("ADD", add_args("s", "d1", opts={"delay_ms": 60_000}))
    c.ok("ADD", add_args("s", "r1", opts={"attempts": 3, "backoff": {"type": "fixed",
                                                                      "delay_ms": 60_000}}))
    c.ok("ADD", add_args("s", "p9", opts={"priority": 9}))
    jobs = c.ok("PULL", {"queues": ["s"], "count": 3})
    by_id = {j[1]: j for j in jobs}
    assert set(by_id) == {"w1", "w2", "r1"}
    c.ok("ACK", {"items": [["s", "w1", by_id["w1"][4], b"\x01"]]})
    c.ok("FAIL", {"items": [["s", "r1", by_id["r1"][4], "boom"]]})
    c.ok("PAUSE", {"queue": "paused-q"})
    before = {q: c.ok("COUNTS", {"queue": q}) for q in ("s", "paused-q")}
    w2_token = by_id["w2"][4]
    c.close()
    if stop == "kill":
        b.kill()
    else:
        assert b.terminate() == 0
    b2 = start_broker("b1", data_dir=data)
    c2 = RawConn(b2.addr)
    after = {q: c2.ok("COUNTS", {"queue": q}) for q in ("s", "paused-q")}
    assert after == before
    r1 = c2.ok("GET_JOB", {"queue": "s", "id": "r1"})
    assert r1["state"] == "delayed" and r1["attempts_made"] == 1 and r1["failed_reason"] == "boom"
    assert c2.ok("GET_JOB", {"queue": "s", "id": "w1"})["state"] == "completed"
    # The active job's lock survived the restart: its worker can still ack.
    assert c2.ok("ACK", {"items": [["s", "w2", w2_token, None]]}) == [None]
    # Re-adding a known id changes nothing after restart either.
    assert c2.ok("ADD", add_args("s", "w1")) == ["w1"]
    assert c2.ok("GET_JOB", {"queue": "s", "id": "w1"})["state"] == "completed"
    c2.close()


def test_the_ack_journal_records_each_accepted_ack_once(start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    journal = tmp_path / "acks.tsv"
    b = start_broker("b1", env={"SHARDQ_ACK_JOURNAL": str(journal)})
    c = RawConn(b.addr)
    c.ok("ADD", add_args("jq", "a", "b", "c"))
    jobs = c.ok("PULL", {"queues": ["jq"], "count": 3})
    items = [["jq", j[1], j[4], None] for j in jobs]
    assert c.ok("ACK", {"items": items}) == [None] * 3
    assert all(r[0] == "LOCK_LOST" for r in c.ok("ACK", {"items": items}))  # refused twice
    lines = journal.read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in lines) == ["a", "b", "c"]
    c.close()


def test_an_idle_broker_checkpoints_its_log_and_a_kill9_then_loses_nothing(
        start_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """After a burst of adds and a quiet second, the log is checkpointed
    without waiting for the next write (commitlog IDLE_CHECKPOINT_AFTER_S), and
    the jobs table alone then holds every answered job."""
    data = tmp_path / "b1"
    b = start_broker("b1", data_dir=data)
    c = RawConn(b.addr)
    for batch in range(20):
        ids = [f"j{batch}-{i}" for i in range(100)]
        assert c.ok("ADD", add_args("idle", *ids)) == ids
    assert c.ok("STATS", {})["log_rows"] > 0
    deadline = time.monotonic() + 15
    while (rows := c.ok("STATS", {})["log_rows"]) > 0:
        assert time.monotonic() < deadline, f"log still holds {rows} rows while idle"
        time.sleep(0.05)
    c.close()
    b.kill()
    c2 = RawConn(start_broker("b1", data_dir=data).addr)
    assert c2.ok("COUNTS", {"queue": "idle"})["waiting"] == 2000
    assert c2.ok("STATS", {})["log_rows"] == 0  # recovered from the jobs table alone
    c2.close()
