"""The broker-side MembershipAgent against a real coordinator process."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shardq.broker.membership import MembershipAgent
from shardq.router import NUM_SLOTS, Topology

from ..conftest import Proc

WAIT_S = 15.0


def start_coordinator(procs: list[Proc], tmp_path: Path, *extra: str, port: int = 0) -> Proc:
    p = Proc(["coordinator", "--port", str(port), "--data-dir", str(tmp_path / "coordinator"),
              *extra], log_path=tmp_path / "coordinator.log")
    procs.append(p)
    return p


class Recorder:
    """on_topology for tests: keeps every topology and wakes waiters."""

    def __init__(self) -> None:
        self.topologies: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def __call__(self, topology: dict[str, Any]) -> None:
        self.topologies.append(topology)
        self.changed.set()

    async def wait_for(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            while not (self.topologies and pred(self.topologies[-1])):
                self.changed.clear()
                await self.changed.wait()
        return self.topologies[-1]


def make_agent(url: str, rec: Recorder, stats: dict[str, Any] | None = None,
               token: str | None = None, broker_id: str = "b1") -> MembershipAgent:
    return MembershipAgent(broker_id=broker_id, advertise="127.0.0.1:7101", weight=1,
                           coordinator_url=url, token=token,
                           get_stats=lambda: stats or {}, on_topology=rec, heartbeat_ms=50)


async def poll(cond: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll an HTTP state (no event to await) until true, within WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        while not await cond():
            await asyncio.sleep(0.02)


async def status_of(url: str, bid: str, token: str | None = None) -> dict[str, Any] | None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers) as http:
        for b in (await http.get(f"{url}/status")).json()["brokers"]:
            if b["id"] == bid:
                return dict(b)
    return None


def test_agent_registers_follows_the_topology_and_leaves(
        procs: list[Proc], tmp_path: Path) -> None:
    coord = start_coordinator(procs, tmp_path, "--token", "tk")
    url = f"http://{coord.addr}"
    stats = {"queues": {"q": {"waiting": 3, "active": 1, "delayed": 2, "completed": 0,
                              "failed": 0}}}

    async def main() -> None:
        rec = Recorder()
        agent = make_agent(url, rec, stats, token="tk")
        task = asyncio.create_task(agent.run())
        topo = Topology.from_dict(await rec.wait_for(lambda t: t["epoch"] >= 1))
        assert len(topo.slots_of("b1")) == NUM_SLOTS
        assert agent.term == 1

        async def stats_arrived() -> bool:
            b1 = await status_of(url, "b1", "tk")
            return b1 is not None and b1["waiting"] == 3

        await poll(stats_arrived, "stats in /status")
        await agent.leave()
        async with asyncio.timeout(WAIT_S):
            await task  # leave() ends run()
        b1 = await status_of(url, "b1", "tk")
        assert b1 is not None
        assert b1["state"] == "dead"  # it owns slots: they wait for it
        assert len(rec.topologies) == 1

    asyncio.run(main())


def test_agent_waits_for_a_coordinator_that_is_down_logging_once(
        procs: list[Proc], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = start_coordinator(procs, tmp_path)
    port = first.port
    first.kill()  # a port nothing listens on, that a coordinator can take again
    caplog.set_level(logging.INFO, logger="shardq.broker.membership")

    async def main() -> None:
        rec = Recorder()
        agent = make_agent(f"http://127.0.0.1:{port}", rec)
        task = asyncio.create_task(agent.run())

        async def logged_down() -> bool:
            return any("unreachable" in r.message for r in caplog.records)

        await poll(logged_down, "the agent to notice the coordinator is down")
        coord = await asyncio.to_thread(start_coordinator, procs, tmp_path, port=port)
        assert coord.port == port
        await rec.wait_for(lambda t: t["epoch"] >= 1)
        assert agent.term == 2
        task.cancel()  # cancel-safe: ends at once, no error
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    down = [r for r in caplog.records if "unreachable" in r.message]
    assert len(down) == 1


def test_agent_follows_a_coordinator_restart_and_new_epochs(
        procs: list[Proc], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    coord = start_coordinator(procs, tmp_path)
    port = coord.port
    url = f"http://{coord.addr}"
    caplog.set_level(logging.INFO, logger="shardq.broker.membership")

    async def main() -> None:
        rec = Recorder()
        agent = make_agent(url, rec)
        task = asyncio.create_task(agent.run())
        await rec.wait_for(lambda t: t["epoch"] == 1)

        coord.kill()
        await asyncio.to_thread(start_coordinator, procs, tmp_path, port=port)

        async def new_term() -> bool:
            return agent.term == 2

        await poll(new_term, "the agent to see term 2")
        # A second broker joining bumps the epoch: the agent fetches the new map.
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{url}/brokers/register",
                                json={"id": "b2", "addr": "127.0.0.1:7102"})
            assert r.status_code == 200
        t = await rec.wait_for(lambda t: "b2" in t["brokers"])
        assert t["brokers"]["b2"]["state"] == "joining"
        assert t["term"] == 2
        assert [x["epoch"] for x in rec.topologies] == sorted({x["epoch"] for x in rec.topologies})
        await agent.leave()
        async with asyncio.timeout(WAIT_S):
            await task

    asyncio.run(main())
    assert sum("restarted" in r.message for r in caplog.records) == 1


def test_agent_of_a_forgotten_broker_keeps_running_without_raising(
        procs: list[Proc], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    coord = start_coordinator(procs, tmp_path, "--expect", "2")
    url = f"http://{coord.addr}"
    with httpx.Client(base_url=url) as http:
        # joining (no bootstrap yet), so it owns nothing and can be forgotten while alive
        http.post("/brokers/register", json={"id": "b9", "addr": "127.0.0.1:7109"})
        assert http.post("/brokers/b9/forget", json={"accept_data_loss": True}).status_code == 200
    caplog.set_level(logging.INFO, logger="shardq.broker.membership")

    async def main() -> None:
        agent = make_agent(url, Recorder(), broker_id="b9")
        task = asyncio.create_task(agent.run())

        async def refused() -> bool:
            return any("refuses" in r.message for r in caplog.records)

        await poll(refused, "the barred broker's error")
        assert not task.done()
        await agent.leave()
        async with asyncio.timeout(WAIT_S):
            await task

    asyncio.run(main())
    assert sum("refuses" in r.message for r in caplog.records) == 1


def test_agent_beats_as_often_as_a_short_heartbeat_timeout_asks(
        procs: list[Proc], tmp_path: Path) -> None:
    # A broker's own 1 s interval against a 400 ms timeout would be marked
    # dead between any two beats; the coordinator's answer asks for 100 ms.
    coord = start_coordinator(procs, tmp_path, "--heartbeat-timeout-ms", "400")
    url = f"http://{coord.addr}"

    async def main() -> None:
        rec = Recorder()
        agent = MembershipAgent(broker_id="b1", advertise="127.0.0.1:7101", weight=1,
                                coordinator_url=url, token=None, get_stats=dict,
                                on_topology=rec, heartbeat_ms=1000)
        task = asyncio.create_task(agent.run())
        try:
            await rec.wait_for(lambda t: t["epoch"] >= 1)
            assert agent.heartbeat_interval_s == 0.1
            for _ in range(3):  # 1.2 s: a 1 s beat would leave one 400 ms gap dead
                await asyncio.sleep(0.4)  # nothing to await: checking that nothing happens
                b1 = await status_of(url, "b1")
                assert b1 is not None and b1["state"] == "active", b1
        finally:
            await agent.leave()
            async with asyncio.timeout(WAIT_S):
                await task

    asyncio.run(main())
