"""Live rebalancing with real processes: a coordinator and two brokers; drain moves everything.

`shardq drain b2` (the real CLI) moves all of b2's slots to b1 through the
coordinator's handoffs (docs/design.md §6); every job is then on b1, counts intact,
also when the coordinator is killed just before or just after a commit
point and restarted (its recovery aborts or rolls forward, then the drain
resumes).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import shardq
from shardq.router import NUM_SLOTS, Topology
from tests.integration.rawwire import RawConn

from ..conftest import Proc
from .conftest import http_get, poll

pytestmark = pytest.mark.slow

QUEUES = [f"handoff-{i}" for i in range(20)]
PER_QUEUE = 50


def shardq_cli(*args: str, timeout: float = 120.0) -> Any:
    r = subprocess.run([sys.executable, "-m", "shardq", *args], capture_output=True, text=True,
                       timeout=timeout, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


async def push(url: str) -> None:
    async with await shardq.connect(url) as client:
        await asyncio.gather(*(
            client.queue(q).add_bulk([("job", {"q": q, "n": n}) for n in range(PER_QUEUE)])
            for q in QUEUES))
        for q in QUEUES:
            assert (await client.queue(q).counts())["waiting"] == PER_QUEUE


def start_pair(procs: list[Proc], start_broker: Callable[..., Proc], tmp_path: Path,
               env: dict[str, str] | None = None) -> tuple[Proc, str, Proc, Topology]:
    coord = Proc(["coordinator", "--port", "0", "--data-dir", str(tmp_path / "coord"),
                  "--expect", "2"], env=env, log_path=tmp_path / "coord.log")
    procs.append(coord)
    url = f"http://{coord.addr}"
    b1 = start_broker("b1", "--coordinator", url)
    start_broker("b2", "--coordinator", url)

    def both_serving() -> Topology | None:
        t = Topology.from_dict(httpx.get(f"{url}/topology").json())
        counts = t.slot_counts()
        ok = t.epoch >= 1 and counts.get("b1", 0) > 0 and counts.get("b2", 0) > 0
        return t if ok else None

    before = poll(both_serving, "bootstrap")
    assert {before.owner_of(q) for q in QUEUES} == {"b1", "b2"}  # both hold some
    asyncio.run(asyncio.wait_for(push(url), 60))
    return coord, url, b1, before


def assert_all_on_b1(url: str, b1: Proc) -> None:
    after = Topology.from_dict(httpx.get(f"{url}/topology").json())
    assert after.slot_counts() == {"b1": NUM_SLOTS, "b2": 0}
    assert after.brokers["b2"].state.value == "drained"
    assert after.moving == []
    conn = RawConn(b1.addr)
    try:
        for q in QUEUES:
            counts = conn.ok("COUNTS", {"queue": q})
            assert counts["waiting"] == PER_QUEUE, (q, counts)
    finally:
        conn.close()


def test_drain_moves_every_job_to_the_other_broker(
        procs: list[Proc], start_broker: Callable[..., Proc], tmp_path: Path) -> None:
    _, url, b1, before = start_pair(procs, start_broker, tmp_path)

    drained = shardq_cli("drain", "b2", "--json", "--coordinator", url)

    assert drained["state"] == "drained"
    progress = httpx.get(f"{url}/rebalance").json()
    assert progress["failed"] == 0 and progress["running"] is False
    assert progress["slots_moved"] == before.slot_counts()["b2"]
    assert_all_on_b1(url, b1)


@pytest.mark.parametrize("point", ["coordinator.before_commit", "coordinator.after_commit"])
def test_coordinator_killed_at_a_commit_point_recovers_and_the_drain_completes(
        procs: list[Proc], start_broker: Callable[..., Proc], tmp_path: Path,
        point: str) -> None:
    coord, url, b1, _ = start_pair(procs, start_broker, tmp_path,
                                   env={"SHARDQ_FAILPOINTS": f"{point}=kill"})

    r = httpx.post(f"{url}/brokers/b2/drain", json={}, timeout=10)
    assert r.status_code == 200, r.text
    coord.popen.wait(timeout=60)  # the failpoint SIGKILLs it at the first commit point
    restarted = Proc(["coordinator", "--port", str(coord.port), "--data-dir",
                      str(tmp_path / "coord"), "--expect", "2"],
                     log_path=tmp_path / "coord.log")
    procs.append(restarted)

    def drained() -> bool:
        body = http_get(url, "/status")
        return bool(body) and any(b["id"] == "b2" and b["state"] == "drained"
                                  for b in body["brokers"])

    poll(drained, "the resumed drain to finish", timeout=60)
    assert_all_on_b1(url, b1)
    log = (tmp_path / "coord.log").read_text()
    assert f"failpoint {point}: kill" in log
    assert "recovering 1 unfinished moves" in log or "recovering 2 unfinished moves" in log
