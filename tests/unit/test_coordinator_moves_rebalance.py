"""Planning and running rebalances (scale out, drain, undrain, cancel) with fake brokers.

The rebalancer is driven through its methods and through the HTTP routes
(starlette's TestClient, lifespan included); brokers are the scripted
`FakeBrokers` of test_coordinator_moves_fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shardq import protocol as p
from shardq.coordinator import Conflict, Membership, NotFound, Rebalancer, Store, create_app
from shardq.errors import BadRequestError
from shardq.router import DEFAULT_MAX_SLOTS_PER_MOVE, NUM_SLOTS, BrokerState, Ring
from tests.aio import run

from .test_coordinator_moves_fakes import Call, Clock, FakeBrokers, cluster, executor


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.db"


def rebalancer(m: Membership, brokers: FakeBrokers, clock: Clock, **kw: Any) -> Rebalancer:
    return Rebalancer(m, executor(m, brokers, clock), clock=clock, sleep=clock.sleep, **kw)


def state(m: Membership, bid: str) -> BrokerState:
    return m.topology.brokers[bid].state


# -- the plan -----------------------------------------------------------------


def test_join_plans_about_a_third_of_the_slots_all_onto_the_new_broker(
        db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=2, joining=1)
    plan = rebalancer(m, FakeBrokers(), clock).plan()

    ring = Ring({"b1": 1, "b2": 1, "b3": 1}).targets()
    onto_b3 = [s for s in range(NUM_SLOTS) if ring[s] == "b3"]
    assert plan["activate"] == ["b3"]
    assert {mv["target"] for mv in plan["moves"]} == {"b3"}
    assert {mv["source"] for mv in plan["moves"]} == {"b1", "b2"}
    assert all(1 <= mv["slots"] <= DEFAULT_MAX_SLOTS_PER_MOVE for mv in plan["moves"])
    assert plan["slots"] == len(onto_b3)
    assert 0.25 < plan["slots"] / NUM_SLOTS < 0.42
    assert plan["load_before"]["b3"] == 0
    assert plan["load_after"]["b3"] == len(onto_b3)
    assert sum(plan["load_after"].values()) == NUM_SLOTS
    assert state(m, "b3") is BrokerState.JOINING  # a dry run changes nothing
    store.close()


def test_drain_plans_every_slot_of_the_broker_to_its_target_among_the_others(
        db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=3)
    owned = m.topology.slots_of("b2")
    m.drain("b2")
    moves = m.plan_moves()

    assert {mv.source for mv in moves} == {"b2"}
    assert sorted(s for mv in moves for s in mv.slots) == owned
    ring = Ring({"b1": 1, "b3": 1})
    assert all(ring.target(s) == mv.target for mv in moves for s in mv.slots)
    assert state(m, "b2") is BrokerState.DRAINING
    store.close()


def test_drain_refuses_a_dead_broker_or_the_last_active_one(db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=2)
    with pytest.raises(NotFound):
        m.drain("b9")
    m.drain("b1")
    with pytest.raises(Conflict, match="no other broker is active"):
        m.drain("b2")
    clock.now += 7200
    m.check_liveness()
    with pytest.raises(Conflict, match="dead"):
        m.drain("b2")
    store.close()


# -- running it ---------------------------------------------------------------


def test_scale_out_activates_the_joiner_and_moves_its_share_at_most_k_at_once(
        db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=2, joining=1)
    concurrent: list[int] = []

    async def hook(call: Call) -> None:
        concurrent.append(len(m.moves))

    brokers = FakeBrokers(hook=hook)
    rb = rebalancer(m, brokers, clock, concurrency=3)

    async def scenario() -> dict[str, Any]:
        rb.notice()  # what b3's first heartbeat does
        assert state(m, "b3") is BrokerState.ACTIVE
        await rb.wait_idle()
        return rb.progress()

    progress = run(scenario())

    assert m.topology.slot_owners == Ring({"b1": 1, "b2": 1, "b3": 1}).targets()
    assert progress["running"] is False
    assert progress["failed"] == 0
    assert progress["done"] == progress["total"] > 3
    assert progress["slots_moved"] == len(m.topology.slots_of("b3"))
    assert max(concurrent) == 3
    assert m.moves == {}
    assert m.plan_moves() == []
    store.close()


def test_a_broker_joining_mid_run_gets_its_share_and_progress_reads_running_until_then(
        db: Path, clock: Clock) -> None:
    # b4 joins while the moves onto b3 are in flight: slots they bring to b3
    # whose target is now b4 must move again, and GET /rebalance must not
    # read idle in between (a CLI waiting on it would stop early).
    m, store = cluster(db, clock, active=2, joining=1)
    seen_idle_with_work_left: list[int] = []

    async def hook(call: Call) -> None:
        if call.op == p.HANDOFF_COPY and "b4" not in m.topology.brokers:
            m.register("b4", "127.0.0.1:7104", 1)
            rb.notice("b4")

    brokers = FakeBrokers(hook=hook)
    rb = rebalancer(m, brokers, clock, concurrency=2)

    async def scenario() -> dict[str, Any]:
        rb.notice("b3")
        async with asyncio.timeout(30):
            while True:
                await rb.wait_idle()
                await asyncio.sleep(0)
                if not rb.progress()["running"]:
                    break
        if m.plan_moves():
            seen_idle_with_work_left.append(1)
        return rb.progress()

    progress = run(scenario())

    assert not seen_idle_with_work_left
    assert m.topology.slot_owners == Ring({"b1": 1, "b2": 1, "b3": 1, "b4": 1}).targets()
    assert progress["failed"] == 0
    store.close()


def test_drain_moves_everything_off_and_the_broker_becomes_drained_then_leaves(
        db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=3)
    rb = rebalancer(m, FakeBrokers(), clock)

    async def scenario() -> dict[str, Any]:
        answer = rb.drain("b3")
        assert answer["state"] == "draining"
        await rb.wait_idle()
        return answer

    answer = run(scenario())

    assert answer["slots"] > 0
    assert m.topology.slots_of("b3") == []
    assert state(m, "b3") is BrokerState.DRAINED
    assert m.topology.slot_owners == Ring({"b1": 1, "b2": 1}).targets()
    m.leave("b3")
    assert "b3" not in m.topology.brokers
    store.close()


def test_undrain_puts_the_broker_back_and_slots_return(db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=3)
    rb = rebalancer(m, FakeBrokers(), clock)

    async def scenario() -> None:
        rb.drain("b2")
        await rb.wait_idle()
        assert state(m, "b2") is BrokerState.DRAINED
        answer = rb.undrain("b2")
        assert answer["state"] == "active"
        assert answer["moves"] > 0
        await rb.wait_idle()

    run(scenario())
    assert m.topology.slot_owners == Ring({"b1": 1, "b2": 1, "b3": 1}).targets()
    store.close()


def test_cancel_stops_after_the_moves_in_flight(db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=2, joining=1)
    brokers = FakeBrokers()
    brokers.block(p.HANDOFF_COPY)
    rb = rebalancer(m, brokers, clock, concurrency=2)

    async def scenario() -> dict[str, Any]:
        plan = rb.start("test")
        assert len(plan["moves"]) > 4
        while brokers.parked.get(p.HANDOFF_COPY, 0) < 2:
            await asyncio.sleep(0)
        cancelled = rb.cancel()
        assert cancelled["pending"] == 0
        assert len(cancelled["moves_in_flight"]) == 2
        brokers.release(p.HANDOFF_COPY)
        await rb.wait_idle()
        return rb.progress()

    progress = run(scenario())

    assert progress == {**progress, "running": False, "cancelled": True, "total": 2, "done": 2,
                        "failed": 0, "moves_in_flight": []}
    assert len(brokers.ops()) == 2 * 6  # the two in flight ran to the end, nothing else began
    assert m.plan_moves()  # the rest is still to do
    store.close()


def test_a_failed_move_is_counted_and_the_others_go_on(db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=3)
    brokers = FakeBrokers()
    brokers.fail(p.HANDOFF_FREEZE, BadRequestError("disk full"), times=1)
    rb = rebalancer(m, brokers, clock)

    async def scenario() -> dict[str, Any]:
        rb.drain("b1")
        await rb.wait_idle()
        progress = rb.progress()
        assert state(m, "b1") is BrokerState.DRAINING  # still owns the failed move's slots
        left = m.topology.slots_of("b1")
        assert 0 < len(left) <= DEFAULT_MAX_SLOTS_PER_MOVE
        rb.drain("b1")  # draining again retries what is left
        await rb.wait_idle()
        return progress

    progress = run(scenario())

    assert progress["failed"] == 1
    assert progress["done"] == progress["total"] - 1
    assert "disk full" in progress["errors"][0]
    assert "aborts" not in progress["errors"][0]
    assert state(m, "b1") is BrokerState.DRAINED
    store.close()


def test_throttle_spaces_move_starts(db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=2, joining=1)
    rb = rebalancer(m, FakeBrokers(), clock, concurrency=4, throttle_ms=2000)

    async def scenario() -> None:
        rb.start("test")
        await rb.wait_idle()

    run(scenario())
    starts = sorted(r.created_ms for r in store.load_moves(finished=True))  # the fake clock's
    assert len(starts) > 4
    assert all(b - a >= 2000 for a, b in itertools.pairwise(starts)), starts
    store.close()


def test_recovery_at_start_finishes_moves_and_resumes_a_drain(
        db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=3)
    never = asyncio.Event()
    copies: list[str] = []
    releases: list[str] = []

    async def hook(call: Call) -> None:
        # The third move parks before its commit point (in copy); the first two after it.
        if call.op == p.HANDOFF_COPY:
            copies.append(call.args["move_id"])
            if len(copies) == 3:
                await never.wait()
        if call.op == p.HANDOFF_RELEASE:
            releases.append(call.args["move_id"])
            await never.wait()

    rb = rebalancer(m, FakeBrokers(hook=hook), clock, concurrency=3)

    async def scenario() -> None:
        rb.drain("b3")
        while len(copies) < 3 or len(releases) < 2:
            await asyncio.sleep(0)
        phases = sorted(r.phase for r in m.moves.values())
        assert phases == ["cleanup", "cleanup", "copy"], phases
        rb._runner.cancel()  # type: ignore[union-attr]  # the process dies here
        await asyncio.wait([rb._runner])  # type: ignore[list-item]

    run(scenario())
    unfinished = {r.move_id: r for r in m.moves.values()}
    store.close()

    store2 = Store(db)
    m2 = Membership(store2, expect=3, heartbeat_timeout_ms=3_600_000, clock=lambda: 0.0)
    assert set(m2.moves) == set(unfinished)
    brokers2 = FakeBrokers()
    rb2 = rebalancer(m2, brokers2, clock)

    async def restart() -> dict[str, Any]:
        await rb2.recover()
        await rb2.wait_idle()
        return rb2.progress()

    progress = run(restart())
    for move_id, rec in unfinished.items():
        ops = [op for b, op in brokers2.ops(move_id)]
        if rec.committed:
            assert ops == [p.HANDOFF_RELEASE]
        else:
            assert ops == [p.HANDOFF_ABORT, p.HANDOFF_ABORT]
    assert state(m2, "b3") is BrokerState.DRAINED  # the drain resumed after recovery
    assert progress["running"] is False
    assert m2.moves == {}
    store2.close()


def test_aclose_aborts_moves_before_their_commit_point(db: Path, clock: Clock) -> None:
    m, store = cluster(db, clock, active=2, joining=1)
    brokers = FakeBrokers()
    brokers.block(p.HANDOFF_COPY)
    rb = rebalancer(m, brokers, clock)

    async def scenario() -> None:
        rb.start("test")
        while brokers.parked.get(p.HANDOFF_COPY, 0) < 2:
            await asyncio.sleep(0)
        await rb.aclose()

    run(scenario())
    assert m.moves == {}
    assert [op for _, op in brokers.ops()].count(p.HANDOFF_ABORT) == 4
    assert m.topology.slot_counts()["b3"] == 0
    store.close()


# -- the HTTP routes ----------------------------------------------------------


async def until(cond: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    async with asyncio.timeout(timeout):
        while not (value := await cond()):
            await asyncio.sleep(0.01)
    return value


@contextlib.asynccontextmanager
async def api(db: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Membership]]:
    """The real app (lifespan included) over b1, b2; brokers faked; real clock."""
    store = Store(db)
    m = Membership(store, expect=2, heartbeat_timeout_ms=3_600_000)
    rb = Rebalancer(m, executor(m, FakeBrokers(), Clock()))
    app = create_app(m, rebalancer=rb)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://coordinator") as c:
            for i in (1, 2):
                r = await c.post("/brokers/register",
                                 json={"id": f"b{i}", "addr": f"127.0.0.1:{7100 + i}"})
                assert r.status_code == 200
            yield c, m
    finally:
        store.close()


async def _get(c: httpx.AsyncClient, path: str) -> Any:
    return (await c.get(path)).json()


def test_http_first_heartbeat_after_joining_scales_out(db: Path) -> None:
    async def scenario() -> None:
        async with api(db) as (c, _m):
            r = await c.post("/brokers/register", json={"id": "b3", "addr": "127.0.0.1:7103"})
            assert r.json()["state"] == "joining"
            assert (await _get(c, "/rebalance"))["total"] == 0  # not before it heartbeats
            r = await c.post("/brokers/heartbeat", json={"id": "b3"})
            assert r.json()["state"] == "active"

            async def finished() -> Any:
                g = await _get(c, "/rebalance")
                return not g["running"] and g

            progress = await until(finished)
            assert progress["failed"] == 0
            assert progress["done"] == progress["total"] > 0
            status = {b["id"]: b for b in (await _get(c, "/status"))["brokers"]}
            assert status["b3"]["state"] == "active"
            assert status["b3"]["slots"] == progress["slots_moved"] > 0
            assert (await _get(c, "/topology"))["moving"] == []

    run(scenario())


def test_http_drain_undrain_dry_run_and_cancel(db: Path) -> None:
    async def scenario() -> None:
        async with api(db) as (c, _m):
            dry = (await c.post("/rebalance", json={"dry_run": True})).json()
            assert dry["moves"] == [] and dry["started"] is False

            r = await c.post("/brokers/b2/drain")  # no body
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "draining" and r.json()["moves"] > 0

            async def b2(state: str) -> bool:
                return bool((await _get(c, "/status"))["brokers"][1]["state"] == state)

            await until(lambda: b2("drained"))
            assert (await _get(c, "/status"))["brokers"][0]["slots"] == NUM_SLOTS

            r = await c.post("/brokers/b2/undrain", json={})
            assert r.json()["state"] == "active"
            dry = (await c.post("/rebalance", json={"dry_run": True})).json()

            async def idle() -> bool:
                return not (await _get(c, "/rebalance"))["running"]

            await until(idle)
            assert (await _get(c, "/status"))["brokers"][1]["slots"] > 0

            cancelled = (await c.post("/rebalance/cancel")).json()
            assert cancelled["cancelled"] is True and cancelled["running"] is False
            assert (await c.post("/brokers/b9/drain", json={})).status_code == 404
            assert (await c.post("/brokers/b1/drain", json={"leaving": 1})).status_code == 400

    run(scenario())
