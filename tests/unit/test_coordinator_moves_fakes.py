"""Fakes for the move executor and rebalancer tests: scripted brokers, a clock, a sleep.

(No tests here; the name keeps it with the test_coordinator_moves* files.)
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardq import protocol
from shardq.coordinator import Membership, MoveExecutor, MovePolicy, Store

REPLIES: dict[str, Any] = {
    protocol.HANDOFF_PREPARE: {"state": "importing"},
    protocol.HANDOFF_COPY: {"queues": 3, "jobs": 42},
    protocol.HANDOFF_FREEZE: {"frozen": True},
    protocol.HANDOFF_CATCHUP: {"ops": 7},
    protocol.HANDOFF_ACTIVATE: {"active": True},
    protocol.HANDOFF_RELEASE: {"released": True},
    protocol.HANDOFF_ABORT: {"aborted": True},
}
FORWARD = [protocol.HANDOFF_PREPARE, protocol.HANDOFF_COPY, protocol.HANDOFF_FREEZE,
           protocol.HANDOFF_CATCHUP, protocol.HANDOFF_ACTIVATE, protocol.HANDOFF_RELEASE]
POLICY = MovePolicy(step_timeout_s=10, copy_timeout_s=600, retry_budget_s=30,
                    abort_budget_s=60, backoff_min_s=0.1, backoff_max_s=5)


class Clock:
    """Monotonic seconds that only move when `sleep` is awaited."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


@dataclass
class Call:
    broker: str
    op: str
    args: dict[str, Any]
    timeout: float


@dataclass
class _Failure:
    exc: BaseException
    times: int | None  # None: always


@dataclass
class FakeBrokers:
    """A `SendOp` that records every call and answers like a well-behaved broker.

    `fail(op, exc, times=n)` makes the next n calls of `op` (to `broker`, if
    given) raise `exc`; `block(op)` parks calls of `op` until `release(op)`;
    `hook` is awaited on every call (to look at state mid-move).
    """

    calls: list[Call] = field(default_factory=list)
    hook: Callable[[Call], Awaitable[None]] | None = None
    _failures: dict[tuple[str | None, str], list[_Failure]] = field(default_factory=dict)
    _gates: dict[str, asyncio.Event] = field(default_factory=dict)
    parked: dict[str, int] = field(default_factory=dict)

    def fail(self, op: str, exc: BaseException, times: int | None = 1,
             broker: str | None = None) -> None:
        self._failures.setdefault((broker, op), []).append(_Failure(exc, times))

    def block(self, op: str) -> None:
        self._gates[op] = asyncio.Event()

    def release(self, op: str) -> None:
        self._gates.pop(op).set()

    async def send(self, broker: str, op: str, args: dict[str, Any], timeout: float) -> Any:
        call = Call(broker, op, dict(args), timeout)
        self.calls.append(call)
        if self.hook is not None:
            await self.hook(call)
        gate = self._gates.get(op)
        if gate is not None:
            self.parked[op] = self.parked.get(op, 0) + 1
            try:
                await gate.wait()
            finally:
                self.parked[op] -= 1
        for key in ((broker, op), (None, op)):
            queue = self._failures.get(key)
            if queue:
                f = queue[0]
                if f.times is not None:
                    f.times -= 1
                    if f.times <= 0:
                        queue.pop(0)
                raise f.exc
        return REPLIES.get(op)

    def ops(self, move_id: str | None = None) -> list[tuple[str, str]]:
        return [(c.broker, c.op) for c in self.calls
                if move_id is None or c.args.get("move_id") == move_id]


def open_membership(db: Path, clock: Clock, expect: int = 2) -> tuple[Membership, Store]:
    store = Store(db)
    m = Membership(store, expect=expect, heartbeat_timeout_ms=3_600_000,
                   clock=lambda: clock.now * 1000.0, wall=lambda: int(clock.now * 1000))
    return m, store


def cluster(db: Path, clock: Clock, active: int = 2, joining: int = 0
            ) -> tuple[Membership, Store]:
    """b1..b<active> bootstrapped, then b<active+1>... registered after (joining)."""
    m, store = open_membership(db, clock, expect=active)
    for i in range(1, active + joining + 1):
        m.register(f"b{i}", f"127.0.0.1:{7100 + i}", 1)
    return m, store


def executor(m: Membership, brokers: FakeBrokers, clock: Clock,
             policy: MovePolicy = POLICY) -> MoveExecutor:
    return MoveExecutor(m, brokers.send, policy, clock=clock, sleep=clock.sleep)


def persisted_phase(db: Path, move_id: str) -> tuple[str, str] | None:
    """(phase, state) of a move as another process would read it from the file."""
    with sqlite3.connect(db) as c:
        row = c.execute("SELECT phase, state FROM moves WHERE move_id = ?", (move_id,)).fetchone()
    return None if row is None else (row[0], row[1])


def topology_epochs(db: Path) -> list[int]:
    with sqlite3.connect(db) as c:
        return [r[0] for r in c.execute("SELECT epoch FROM topology ORDER BY epoch")]



def owners(m: Membership, slots: Iterator[int] | tuple[int, ...]) -> set[str | None]:
    return {m.topology.owner_of_slot(s) for s in slots}
