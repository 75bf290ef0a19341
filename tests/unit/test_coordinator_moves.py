"""The move executor's state machine (docs/design.md §6) with fake brokers and an injected clock.

No sockets and no sleeps: brokers are a scripted `SendOp`, retries wait on a
clock that only moves when the executor sleeps, and a "crash" is an
exception raised from a failpoint, after which the SQLite file is reopened
by a new Membership (a new term) exactly as a restarted coordinator would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardq import failpoints
from shardq import protocol as p
from shardq.coordinator import Membership, MoveExecutor, MoveRecord, MoveState, Store
from shardq.coordinator.links import BrokerGone
from shardq.errors import (
    BadRequestError,
    ConnectionClosedError,
    StaleTermError,
    TryAgainError,
    UnknownServerError,
)
from shardq.router import Move
from tests.aio import run

from .test_coordinator_moves_fakes import (
    FORWARD,
    POLICY,
    Call,
    Clock,
    FakeBrokers,
    cluster,
    executor,
    owners,
    persisted_phase,
    topology_epochs,
)

ABORTS = [("b3", p.HANDOFF_ABORT), ("b1", p.HANDOFF_ABORT)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.db"


@pytest.fixture
def m(db: Path, clock: Clock) -> Iterator[Membership]:
    """b1, b2 bootstrapped; b3 joined after and activated (owns nothing yet)."""
    m, store = cluster(db, clock, active=2, joining=1)
    assert m.activate_joining() == ["b3"]
    yield m
    store.close()


@pytest.fixture(autouse=True)
def no_failpoints() -> Iterator[None]:
    failpoints.configure(None)
    yield
    failpoints.configure(None)


def first_move(m: Membership) -> Move:
    """The first planned move: some of b1's slots onto b3."""
    move = next(mv for mv in m.plan_moves() if mv.source == "b1")
    assert move.target == "b3"
    return move


# -- the happy path -----------------------------------------------------------


def test_move_runs_every_phase_in_order_persisting_each_before_sending(
        m: Membership, db: Path, clock: Clock) -> None:
    move = first_move(m)
    seen: list[tuple[str, tuple[str, str] | None, list[dict[str, object]]]] = []

    async def hook(call: Call) -> None:
        # What a restarted coordinator would find on disk when this op leaves.
        seen.append((call.op, persisted_phase(db, call.args["move_id"]),
                     m.topology.to_dict()["moving"]))

    brokers = FakeBrokers(hook=hook)
    rec = run(executor(m, brokers, clock).execute(move))

    assert rec.state is MoveState.DONE
    assert brokers.ops() == [("b3", p.HANDOFF_PREPARE), ("b1", p.HANDOFF_COPY),
                             ("b1", p.HANDOFF_FREEZE), ("b1", p.HANDOFF_CATCHUP),
                             ("b3", p.HANDOFF_ACTIVATE), ("b1", p.HANDOFF_RELEASE)]
    assert [(op, ph) for op, ph, _ in seen] == [
        (p.HANDOFF_PREPARE, ("prepare", "running")), (p.HANDOFF_COPY, ("copy", "running")),
        (p.HANDOFF_FREEZE, ("freeze", "running")), (p.HANDOFF_CATCHUP, ("catch-up", "running")),
        (p.HANDOFF_ACTIVATE, ("activate", "running")),
        (p.HANDOFF_RELEASE, ("cleanup", "running")),
    ]
    # The topology shows the move in flight with its phase, at every step.
    for op, (phase, _), moving in seen:
        assert moving == [{"move_id": rec.move_id, "slots": list(move.slots), "from": "b1",
                           "to": "b3", "phase": phase}], op
    assert persisted_phase(db, rec.move_id) == ("cleanup", "done")
    reader = Store(db)
    assert reader.load_moves(finished=True) == [rec]
    reader.close()
    assert m.topology.moving == []
    assert m.moves == {}


def test_commit_happens_exactly_once_after_catchup_and_bumps_the_epoch_by_one(
        m: Membership, db: Path, clock: Clock) -> None:
    move = first_move(m)
    epoch0 = m.epoch
    epochs_at: dict[str, int] = {}

    async def hook(call: Call) -> None:
        epochs_at[call.op] = m.epoch
        if call.op in (p.HANDOFF_PREPARE, p.HANDOFF_COPY, p.HANDOFF_FREEZE, p.HANDOFF_CATCHUP):
            assert owners(m, move.slots) == {"b1"}  # not committed yet
        else:
            assert owners(m, move.slots) == {"b3"}  # committed before ACTIVATE is sent

    brokers = FakeBrokers(hook=hook)
    rec = run(executor(m, brokers, clock).execute(move))

    assert rec.epoch == epoch0 + 1
    assert m.epoch == epoch0 + 1
    assert [e for e in topology_epochs(db) if e > epoch0] == [epoch0 + 1]  # one commit
    assert epochs_at[p.HANDOFF_CATCHUP] == epoch0  # phases do not bump the epoch
    assert epochs_at[p.HANDOFF_ACTIVATE] == epoch0 + 1
    assert owners(m, move.slots) == {"b3"}
    assert {m.topology.slot_epoch(s) for s in move.slots} == {epoch0 + 1}
    others = [s for s in range(4096) if s not in move.slots]
    assert all(m.topology.slot_epoch(s) <= epoch0 for s in others)


def test_ops_carry_the_protocol_args_the_term_and_their_timeouts(
        m: Membership, clock: Clock) -> None:
    move = first_move(m)
    brokers = FakeBrokers()
    rec = run(executor(m, brokers, clock).execute(move))

    by_op = {c.op: c for c in brokers.calls}
    slots = list(move.slots)
    common = {"move_id": rec.move_id, "term": m.term}
    assert by_op[p.HANDOFF_PREPARE].args == {
        **common, "slots": slots, "source": "b1", "source_addr": "127.0.0.1:7101"}
    assert by_op[p.HANDOFF_COPY].args == {
        **common, "slots": slots, "target": "b3", "target_addr": "127.0.0.1:7103"}
    assert by_op[p.HANDOFF_FREEZE].args == {**common, "slots": slots}
    assert by_op[p.HANDOFF_CATCHUP].args == {**common, "target_addr": "127.0.0.1:7103"}
    assert by_op[p.HANDOFF_ACTIVATE].args == {**common, "epoch": rec.epoch}
    assert by_op[p.HANDOFF_RELEASE].args == {
        **common, "epoch": rec.epoch, "owner": "b3", "addr": "127.0.0.1:7103"}
    assert by_op[p.HANDOFF_COPY].timeout == POLICY.copy_timeout_s
    assert {c.timeout for c in brokers.calls if c.op != p.HANDOFF_COPY} == {
        POLICY.step_timeout_s}


def test_a_paced_copy_carries_its_rate(m: Membership, clock: Clock) -> None:
    brokers = FakeBrokers()
    policy = dataclasses.replace(POLICY, copy_rate=25_000)
    run(executor(m, brokers, clock, policy).execute(first_move(m)))
    by_op = {c.op: c for c in brokers.calls}
    assert by_op[p.HANDOFF_COPY].args["max_jobs_per_s"] == 25_000
    assert all("max_jobs_per_s" not in c.args for c in brokers.calls if c.op != p.HANDOFF_COPY)


def test_transient_errors_before_commit_are_retried_within_the_budget(
        m: Membership, clock: Clock) -> None:
    brokers = FakeBrokers()
    brokers.fail(p.HANDOFF_COPY, ConnectionRefusedError("b1 restarting"), times=3)
    brokers.fail(p.HANDOFF_FREEZE, TryAgainError(), times=2)
    brokers.fail(p.HANDOFF_CATCHUP, UnknownServerError("UNAVAILABLE", "catchup: b3 down"))
    rec = run(executor(m, brokers, clock).execute(first_move(m)))

    assert rec.state is MoveState.DONE
    assert brokers.ops().count(("b1", p.HANDOFF_COPY)) == 4
    assert brokers.ops().count(("b1", p.HANDOFF_FREEZE)) == 3
    assert p.HANDOFF_ABORT not in [op for _, op in brokers.ops()]


# -- before the commit point: abort -------------------------------------------


@pytest.mark.parametrize("op", FORWARD[:4])
def test_a_failure_before_commit_aborts_both_sides_and_leaves_ownership_alone(
        m: Membership, db: Path, clock: Clock, op: str) -> None:
    move = first_move(m)
    before = m.topology.to_dict()
    brokers = FakeBrokers()
    brokers.fail(op, BadRequestError("no such slot"))

    rec = run(executor(m, brokers, clock).execute(move))

    assert rec.state is MoveState.ABORTED
    assert "no such slot" in (rec.error or "")
    sent = brokers.ops()
    assert sent == [(b, o) for b, o in [("b3", p.HANDOFF_PREPARE), ("b1", p.HANDOFF_COPY),
                                        ("b1", p.HANDOFF_FREEZE), ("b1", p.HANDOFF_CATCHUP)]
                    ][:FORWARD.index(op) + 1] + ABORTS  # target first, then source
    after = m.topology.to_dict()
    assert after["slots"] == before["slots"]
    assert after["epoch"] == before["epoch"]
    assert after["moving"] == []
    assert persisted_phase(db, rec.move_id) == (rec.phase, "aborted")


def test_a_broker_unreachable_past_the_retry_budget_aborts(m: Membership, clock: Clock) -> None:
    brokers = FakeBrokers()
    brokers.fail(p.HANDOFF_FREEZE, ConnectionRefusedError("b1 is down"), times=None)
    t0 = clock.now

    rec = run(executor(m, brokers, clock).execute(first_move(m)))

    assert rec.state is MoveState.ABORTED
    assert clock.now - t0 >= POLICY.retry_budget_s
    assert "kept failing" in (rec.error or "")
    assert brokers.ops()[-2:] == ABORTS
    assert brokers.ops().count(("b1", p.HANDOFF_FREEZE)) > 3


def test_a_failpoint_error_before_commit_aborts(m: Membership, clock: Clock) -> None:
    failpoints.configure("coordinator.before_copy=error")
    brokers = FakeBrokers()

    rec = run(executor(m, brokers, clock).execute(first_move(m)))

    assert rec.state is MoveState.ABORTED
    assert brokers.ops() == [("b3", p.HANDOFF_PREPARE), *ABORTS]


def test_abort_is_retried_and_a_missing_ack_is_recorded(m: Membership, clock: Clock) -> None:
    brokers = FakeBrokers()
    brokers.fail(p.HANDOFF_COPY, BadRequestError("bad"))
    brokers.fail(p.HANDOFF_ABORT, OSError("b3 restarting"), times=2, broker="b3")
    brokers.fail(p.HANDOFF_ABORT, OSError("b1 gone for good"), times=None, broker="b1")

    rec = run(executor(m, brokers, clock).execute(first_move(m)))

    assert rec.state is MoveState.ABORTED
    assert brokers.ops().count(("b3", p.HANDOFF_ABORT)) == 3
    assert brokers.ops().count(("b1", p.HANDOFF_ABORT)) > 3
    assert "not acknowledged by b1" in (rec.error or "")


def test_commit_is_refused_when_the_target_was_drained_meanwhile(
        m: Membership, clock: Clock) -> None:
    move = first_move(m)
    epoch_before: list[int] = []

    async def hook(call: Call) -> None:
        if call.op == p.HANDOFF_CATCHUP:
            m.drain("b3")  # b3 owns nothing: drained at once
            epoch_before.append(m.epoch)

    brokers = FakeBrokers(hook=hook)
    rec = run(executor(m, brokers, clock).execute(move))

    assert rec.state is MoveState.ABORTED
    assert "not committing" in (rec.error or "")
    assert owners(m, move.slots) == {"b1"}
    assert m.epoch == epoch_before[0]
    assert brokers.ops()[-2:] == ABORTS


def test_request_abort_cancels_a_long_copy(m: Membership, clock: Clock) -> None:
    brokers = FakeBrokers()
    brokers.block(p.HANDOFF_COPY)
    x = executor(m, brokers, clock)

    async def scenario() -> MoveRecord:
        import asyncio

        task = asyncio.create_task(x.execute(first_move(m)))
        while not brokers.parked.get(p.HANDOFF_COPY):
            await asyncio.sleep(0)
        (move_id,) = m.moves
        assert x.request_abort(move_id)
        return await task

    rec = run(scenario())

    assert rec.state is MoveState.ABORTED
    assert "cancelled during copy" in (rec.error or "")
    assert brokers.ops() == [("b3", p.HANDOFF_PREPARE), ("b1", p.HANDOFF_COPY), *ABORTS]


# -- after the commit point: roll forward -------------------------------------


def test_failures_after_commit_are_retried_until_they_succeed(
        m: Membership, clock: Clock) -> None:
    move = first_move(m)
    brokers = FakeBrokers()
    brokers.fail(p.HANDOFF_ACTIVATE, ConnectionClosedError("b3 restarting"), times=25)
    brokers.fail(p.HANDOFF_ACTIVATE, StaleTermError("odd"), times=2)
    brokers.fail(p.HANDOFF_RELEASE, TimeoutError("slow"), times=5)
    t0 = clock.now

    rec = run(executor(m, brokers, clock).execute(move))

    assert rec.state is MoveState.DONE
    assert clock.now - t0 > POLICY.retry_budget_s  # no budget after the commit point
    assert brokers.ops().count(("b3", p.HANDOFF_ACTIVATE)) == 28
    assert brokers.ops().count(("b1", p.HANDOFF_RELEASE)) == 6
    assert p.HANDOFF_ABORT not in [op for _, op in brokers.ops()]
    assert owners(m, move.slots) == {"b3"}


def test_a_failpoint_error_after_commit_still_rolls_forward(
        m: Membership, clock: Clock) -> None:
    failpoints.configure("coordinator.after_commit=error")
    brokers = FakeBrokers()
    rec = run(executor(m, brokers, clock).execute(first_move(m)))
    assert rec.state is MoveState.DONE
    assert brokers.ops()[-2:] == [("b3", p.HANDOFF_ACTIVATE), ("b1", p.HANDOFF_RELEASE)]


def test_a_forgotten_source_is_not_waited_for_at_cleanup(m: Membership, clock: Clock) -> None:
    brokers = FakeBrokers()
    brokers.fail(p.HANDOFF_RELEASE, BrokerGone("b1 is not in the topology"), times=None)
    rec = run(executor(m, brokers, clock).execute(first_move(m)))
    assert rec.state is MoveState.DONE
    assert "cleanup skipped" in (rec.error or "")


# -- restart recovery -----------------------------------------------------------


class Crash(BaseException):
    """The coordinator dies here (a BaseException: nothing in the executor catches it)."""


CRASH_POINTS = {
    # failpoint -> (phase persisted when it fires, rolls forward?)
    "coordinator.before_prepare": ("prepare", False),
    "coordinator.after_prepare": ("prepare", False),
    "coordinator.before_copy": ("copy", False),
    "coordinator.after_copy": ("copy", False),
    "coordinator.before_freeze": ("freeze", False),
    "coordinator.after_freeze": ("freeze", False),
    "coordinator.before_catchup": ("catch-up", False),
    "coordinator.after_catchup": ("catch-up", False),
    "coordinator.before_commit": ("catch-up", False),
    "coordinator.after_commit": ("commit", True),
    "coordinator.before_activate": ("activate", True),
    "coordinator.after_activate": ("activate", True),
    "coordinator.before_cleanup": ("cleanup", True),
    "coordinator.after_cleanup": ("cleanup", True),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_restart_recovery_aborts_before_commit_and_rolls_forward_after(
        m: Membership, db: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch,
        point: str) -> None:
    move = first_move(m)
    epoch0, term0 = m.epoch, m.term
    phase, forward = CRASH_POINTS[point]

    def hit(name: str) -> None:
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(failpoints, "ACTIVE", {point: "crash"})
    monkeypatch.setattr(failpoints, "hit", hit)
    with pytest.raises(Crash):
        run(executor(m, FakeBrokers(), clock).execute(move))
    monkeypatch.undo()

    # A new coordinator process on the same file.
    store2 = Store(db)
    m2 = Membership(store2, expect=2, heartbeat_timeout_ms=3_600_000, clock=lambda: 0.0)
    try:
        assert m2.term == term0 + 1
        (rec,) = m2.moves.values()
        assert (rec.phase, rec.state) == (phase, MoveState.RUNNING)
        assert m2.topology.to_dict()["moving"] == [rec.moving_entry()]
        assert owners(m2, move.slots) == ({"b3"} if forward else {"b1"})

        brokers = FakeBrokers()
        final = run(executor(m2, brokers, clock).recover(rec))

        assert {c.args["term"] for c in brokers.calls} == {m2.term}
        if forward:
            assert final.state is MoveState.DONE
            expected = [("b3", p.HANDOFF_ACTIVATE)] if phase != "cleanup" else []
            assert brokers.ops() == [*expected, ("b1", p.HANDOFF_RELEASE)]
            assert owners(m2, move.slots) == {"b3"}
            assert m2.epoch == epoch0 + 1
        else:
            assert final.state is MoveState.ABORTED
            assert brokers.ops() == ABORTS
            assert owners(m2, move.slots) == {"b1"}
            assert m2.epoch == epoch0
        assert m2.moves == {}
        assert m2.topology.moving == []
    finally:
        store2.close()


def test_restart_during_an_abort_sends_the_aborts_again(
        m: Membership, db: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    brokers = FakeBrokers()
    brokers.fail(p.HANDOFF_FREEZE, BadRequestError("refused"))

    async def crash_on_abort(call: Call) -> None:
        if call.op == p.HANDOFF_ABORT:
            raise Crash("died while aborting")

    brokers.hook = crash_on_abort
    with pytest.raises(Crash):
        run(executor(m, brokers, clock).execute(first_move(m)))

    store2 = Store(db)
    m2 = Membership(store2, expect=2, heartbeat_timeout_ms=3_600_000, clock=lambda: 0.0)
    try:
        (rec,) = m2.moves.values()
        assert rec.state is MoveState.ABORTING
        brokers2 = FakeBrokers()
        final = run(executor(m2, brokers2, clock).recover(rec))
        assert final.state is MoveState.ABORTED
        assert "refused" in (final.error or "")
        assert brokers2.ops() == ABORTS
    finally:
        store2.close()


def test_a_committed_move_cannot_be_aborted(m: Membership, clock: Clock) -> None:
    brokers = FakeBrokers()
    brokers.block(p.HANDOFF_ACTIVATE)
    x = executor(m, brokers, clock)

    async def scenario() -> MoveRecord:
        import asyncio

        task = asyncio.create_task(x.execute(first_move(m)))
        while not brokers.parked.get(p.HANDOFF_ACTIVATE):
            await asyncio.sleep(0)
        (move_id,) = m.moves
        assert not x.request_abort(move_id)
        brokers.release(p.HANDOFF_ACTIVATE)
        return await task

    assert run(scenario()).state is MoveState.DONE
    assert p.HANDOFF_ABORT not in [op for _, op in brokers.ops()]


def test_a_move_waits_until_its_source_serves_the_epoch_of_its_slots(
        m: Membership, clock: Clock) -> None:
    move = first_move(m)
    needed = max(m.topology.slot_epoch(s) for s in move.slots)
    asked: list[str] = []

    async def epoch_of(broker: str, timeout: float) -> int:
        asked.append(broker)
        return needed if len(asked) >= 4 else needed - 1  # learns the map a bit late

    brokers = FakeBrokers()
    x = MoveExecutor(m, brokers.send, POLICY, clock=clock, sleep=clock.sleep, epoch_of=epoch_of)
    rec = run(x.execute(move))

    assert rec.state is MoveState.DONE
    assert asked == ["b1"] * 4
    assert brokers.ops()[0] == ("b3", p.HANDOFF_PREPARE)


def test_a_source_that_never_catches_up_aborts_the_move(m: Membership, clock: Clock) -> None:
    async def epoch_of(broker: str, timeout: float) -> int:
        return 0

    brokers = FakeBrokers()
    x = MoveExecutor(m, brokers.send, POLICY, clock=clock, sleep=clock.sleep, epoch_of=epoch_of)
    rec = run(x.execute(first_move(m)))

    assert rec.state is MoveState.ABORTED
    assert "serves epoch 0" in (rec.error or "")
    assert brokers.ops() == ABORTS
