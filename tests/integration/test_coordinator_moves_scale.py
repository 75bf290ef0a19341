"""`shardq scale out|in`, `rebalance`, `drain` against a real `cluster up` (real brokers).

The CLI runs as a subprocess, as an operator would run it; jobs pushed
before the moves must all be there, with the same counts, after them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import shardq
from shardq.router import NUM_SLOTS, Ring, Topology

from ..conftest import Proc

pytestmark = pytest.mark.slow

QUEUES = [f"scale-{i}" for i in range(12)]
PER_QUEUE = 40


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "shardq", *args], capture_output=True, text=True,
                       timeout=120, check=False)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def cli_json(*args: str) -> Any:
    return json.loads(cli(*args, "--json").stdout)


def topology(url: str) -> Topology:
    return Topology.from_dict(httpx.get(f"{url}/topology", timeout=5).json())


def wait_until(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


async def _push(url: str) -> None:
    async with await shardq.connect(url) as client:
        await asyncio.gather(*(
            client.queue(q).add_bulk([("job", {"n": n}) for n in range(PER_QUEUE)])
            for q in QUEUES))


async def _counts(url: str) -> dict[str, int]:
    async with await shardq.connect(url) as client:
        return {q: (await client.queue(q).counts())["waiting"] for q in QUEUES}


def test_scale_out_then_in_keeps_every_job(procs: list[Proc], tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = Proc(["cluster", "up", "-n", "2", "--data-dir", str(data), "--coordinator-port", "0",
               "--base-port", "0"], log_path=tmp_path / "supervisor.log")
    procs.append(up)
    url = up.addr
    asyncio.run(asyncio.wait_for(_push(url), 60))
    assert json.loads((data / "cluster.json").read_text())["brokers"] == ["b1", "b2"]

    out = cli_json("scale", "out", "-n", "1", "--data-dir", str(data))

    assert [b["id"] for b in out["brokers"]] == ["b3"]
    assert out["rebalance"]["failed"] == 0 and out["rebalance"]["running"] is False
    topo = topology(url)
    assert topo.slot_owners == Ring({"b1": 1, "b2": 1, "b3": 1}).targets()
    assert topo.brokers["b3"].state.value == "active"
    assert out["rebalance"]["slots_moved"] == len(topo.slots_of("b3"))
    assert json.loads((data / "cluster.json").read_text())["brokers"] == ["b1", "b2", "b3"]
    assert asyncio.run(_counts(url)) == dict.fromkeys(QUEUES, PER_QUEUE)

    plan = cli_json("rebalance", "--dry-run", "--coordinator", url)
    assert plan["moves"] == [] and plan["started"] is False

    gone = cli_json("scale", "in", "--broker", "b1", "--data-dir", str(data))

    assert gone["id"] == "b1"
    topo = topology(url)
    assert "b1" not in topo.brokers
    assert topo.slot_owners == Ring({"b2": 1, "b3": 1}).targets()
    assert sum(topo.slot_counts().values()) == NUM_SLOTS
    saved = json.loads((data / "cluster.json").read_text())
    assert saved["brokers"] == ["b2", "b3"] and saved["removed"] == ["b1"]
    assert asyncio.run(_counts(url)) == dict.fromkeys(QUEUES, PER_QUEUE)


def test_drain_undrain_and_rebalance_cli(procs: list[Proc], tmp_path: Path) -> None:
    up = Proc(["cluster", "up", "-n", "3", "--data-dir", str(tmp_path / "data"),
               "--coordinator-port", "0", "--base-port", "0"],
              log_path=tmp_path / "supervisor.log")
    procs.append(up)
    url = up.addr
    base = ["--coordinator", url]
    b2_slots = len(topology(url).slots_of("b2"))

    drained = cli_json("drain", "b2", *base)
    assert drained == {**drained, "id": "b2", "state": "drained", "slots_moved": b2_slots}

    plan = cli_json("rebalance", "--dry-run", *base)
    assert plan["moves"] == []
    text = cli("undrain", "b2", *base).stderr
    assert "b2 is active" in text
    plan_text = cli("rebalance", "--dry-run", *base).stdout
    assert "slots per broker" in plan_text or "nothing to move" in plan_text

    progress = cli_json("rebalance", *base)
    assert progress["running"] is False and progress["failed"] == 0
    assert topology(url).slot_owners == Ring({"b1": 1, "b2": 1, "b3": 1}).targets()

    cancelled = cli_json("rebalance", "--cancel", *base)
    assert cancelled["cancelled"] is True
    r = cli("rebalance", "--dry-run", "--cancel", *base, ok=False)
    assert r.returncode == 2
    r = cli("drain", "b9", *base, ok=False)
    assert r.returncode == 1 and "unknown broker" in r.stderr
    r = cli("scale", "out", "--data-dir", str(tmp_path / "nowhere"), ok=False)
    assert r.returncode == 1 and "no local cluster" in r.stderr
