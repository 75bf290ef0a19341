"""The rebalancer: plans moves and runs them with bounded concurrency (docs/design.md §6).

A *run* executes the current plan (`Membership.plan_moves`: every slot
whose owner differs from its ring target, in moves of at most 64 slots),
at most `concurrency` moves at once, starting moves at least `throttle_ms`
apart. What starts one:

* scale out: a broker that registered after bootstrap (`joining`) sends
  its first heartbeat; the run first makes every joining broker `active`
  (on the ring), so about 1/(n+1) of the slots are planned onto it;
* drain / undrain / `POST /rebalance`, and a coordinator start that finds
  a draining broker still owning slots (or joining brokers).

While a run is going, a new trigger replaces the moves not yet started by
a fresh plan (moves in flight are left alone: the planner skips slots in
`moving`). `cancel` drops the moves not started; those in flight finish
("stop after the moves in flight"). Progress counts moves done and failed
(aborted) and slots moved in the current (or last) run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shardq.router import DEFAULT_MAX_SLOTS_PER_MOVE, BrokerState, Move

from .errors import CoordinatorError
from .membership import Membership
from .moves import MoveExecutor
from .state import MoveRecord, MoveState

log = logging.getLogger("shardq.coordinator.rebalance")

SHUTDOWN_GRACE_S = 3.0
MAX_ERRORS_KEPT = 20


@dataclass(slots=True)
class Progress:
    """The current (or last) run, as `GET /rebalance` shows it."""

    cancelled: bool = False
    reason: str = ""
    done: int = 0
    failed: int = 0
    skipped: int = 0  # planned moves that no longer fitted the topology when their turn came
    slots_moved: int = 0
    started_ms: int = 0
    finished_ms: int = 0
    errors: list[str] = field(default_factory=list)


MAX_DRAIN_RETRIES = 20


class Rebalancer:
    """Plans and runs moves; owns the tasks that run them.

    Args:
        membership: the cluster state (and the only writer of it).
        executor: runs one move.
        concurrency: moves in flight at most (K).
        throttle_ms: minimum time between two move starts.
        max_slots_per_move: planner chunk size.
        auto: scale out by itself when a broker joins after bootstrap.
        clock: monotonic seconds (throttle); sleep: awaited for the throttle.
        wall: wall-clock ms, shown in progress.
    """

    def __init__(self, membership: Membership, executor: MoveExecutor, *, concurrency: int = 2,
                 throttle_ms: int = 0, max_slots_per_move: int = DEFAULT_MAX_SLOTS_PER_MOVE,
                 auto: bool = True, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 wall: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._m = membership
        self._x = executor
        self.concurrency = concurrency
        self.throttle_s = max(0, throttle_ms) / 1000.0
        self.max_slots_per_move = max_slots_per_move
        self.auto = auto
        self._clock = clock
        self._sleep = sleep
        self._wall = wall
        self._pending: deque[Move] = deque()
        self._in_flight: set[str] = set()
        self._recovered: list[MoveRecord] = []
        self._recovering = 0  # recovered moves not finished yet
        self._retries = 0  # automatic re-plans of an unfinished drain
        self._progress = Progress()
        self._runner: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_start = float("-inf")
        self._closing = False
        # A finished run may be followed by a re-plan (slots still off their
        # targets): until that is decided, progress still reads `running`.
        self._replan_due = False

    # -- reads ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._runner is not None and not self._runner.done()

    def plan(self) -> dict[str, Any]:
        """The plan a rebalance would run now (`--dry-run`), with per-broker load before/after."""
        return self._summary(self._m.plan_moves(self.max_slots_per_move))

    def _summary(self, moves: list[Move]) -> dict[str, Any]:
        topo = self._m.topology
        before = topo.slot_counts()
        after = dict(before)
        for mv in moves:
            after[mv.source] -= len(mv.slots)
            after[mv.target] = after.get(mv.target, 0) + len(mv.slots)
        joining = sorted(b.id for b in topo.brokers.values() if b.state is BrokerState.JOINING)
        return {
            "epoch": topo.epoch,
            "activate": joining if self._m.bootstrapped else [],
            "moves": [{"source": mv.source, "target": mv.target, "slots": len(mv.slots),
                       "first": mv.slots[0], "last": mv.slots[-1]} for mv in moves],
            "slots": sum(len(mv.slots) for mv in moves),
            "load_before": before,
            "load_after": after,
        }

    def progress(self) -> dict[str, Any]:
        """`GET /rebalance`: {running, total, done, failed, slots_moved, moves_in_flight, ...}."""
        p = self._progress
        in_flight = [r.moving_entry() | {"state": r.state.value}
                     for r in self._m.moves.values()]
        return {
            "running": self.running or self._replan_due,
            "cancelled": p.cancelled,
            "reason": p.reason,
            "total": p.done + p.failed + len(self._in_flight) + len(self._pending),
            "done": p.done,
            "failed": p.failed,
            "skipped": p.skipped,
            "pending": len(self._pending),
            "slots_moved": p.slots_moved,
            "moves_in_flight": in_flight,
            "concurrency": self.concurrency,
            "started_ms": p.started_ms,
            "finished_ms": p.finished_ms,
            "errors": list(p.errors),
        }

    # -- control -------------------------------------------------------------

    def start(self, reason: str) -> dict[str, Any]:
        """Activate joining brokers, plan, and run (or re-plan a run in progress).

        Returns:
            The plan being run (the `plan()` shape) plus `started`.
        """
        if self._closing:
            raise CoordinatorError("the coordinator is shutting down")
        activated = self._m.activate_joining()
        if activated:
            log.info("activated %s (epoch %d)", ", ".join(activated), self._m.epoch)
        moves = self._m.plan_moves(self.max_slots_per_move)
        plan = self._summary(moves)
        if not self.running:
            self._progress = Progress(reason=reason, started_ms=self._wall())
        else:
            self._progress.reason = reason
        self._progress.cancelled = False
        self._pending = deque(moves)
        if moves or self._recovered:
            log.info("rebalance (%s): %d moves, %d slots, %d at a time", reason, len(moves),
                     plan["slots"], self.concurrency)
            self._ensure_runner()
        self._wake.set()
        return {**plan, "activate": activated, "started": bool(moves)}

    def cancel(self) -> dict[str, Any]:
        """Drop the moves not started yet; the ones in flight finish."""
        if self._pending:
            log.info("rebalance cancelled: %d moves dropped, %d in flight finish",
                     len(self._pending), len(self._in_flight))
        self._pending.clear()
        self._progress.cancelled = True
        self._wake.set()
        return self.progress()

    def notice(self, broker_id: str | None = None) -> bool:
        """Called after each heartbeat: a joining broker that heartbeats is scaled out onto.

        With no `broker_id` (coordinator start), every joining broker counts.

        Returns:
            True if a scale out started (the broker is now active).
        """
        if not self.auto or self._closing or not self._m.bootstrapped:
            return False
        joining = sorted(b.id for b in self._m.topology.brokers.values()
                         if b.state is BrokerState.JOINING
                         and (broker_id is None or b.id == broker_id))
        if not joining:
            return False
        # The heartbeat that got us here is already durable: a failure here must
        # not fail it (the next heartbeat tries again).
        try:
            self._m.activate_joining(joining)
            self.start(f"scale out: {', '.join(joining)} joined")
        except Exception:
            log.exception("could not start the scale-out rebalance")
            return False
        return True

    def drain(self, broker_id: str, leaving: bool = False) -> dict[str, Any]:
        """Drain a broker: off the ring, then its slots move to their targets among the others.

        Pre-commit moves *onto* it are aborted (they would only move back).
        """
        answer = self._m.drain(broker_id, leaving)
        for rec in self._m.moves.values():
            if rec.target == broker_id and not rec.committed:
                self._x.request_abort(rec.move_id)
        plan = self.start(f"drain {broker_id}") if answer["slots"] else None
        return {**answer, "moves": len(plan["moves"]) if plan else 0}

    def move_queue(self, queue: str, broker_id: str) -> dict[str, Any]:
        """`shardq move`: pin the queue's slot to `broker_id` and move it there."""
        answer = self._m.pin(queue, broker_id)
        started = False
        if answer["from"] != broker_id:
            started = bool(self.start(f"move {queue} to {broker_id}")["started"])
        return {**answer, "started": started}

    def undrain(self, broker_id: str) -> dict[str, Any]:
        """Put a broker back on the ring and rebalance onto it."""
        answer = self._m.undrain(broker_id)
        plan = self.start(f"undrain {broker_id}")
        return {**answer, "moves": len(plan["moves"])}

    async def recover(self) -> None:
        """At start: finish moves left unfinished, then resume drains and scale outs.

        The resume waits for the recovered moves, so that the slots of those
        that aborted are planned again.
        """
        self._recovered = list(self._m.moves.values())
        self._recovering = len(self._recovered)
        if self._recovered:
            log.info("recovering %d unfinished moves", len(self._recovered))
            self._progress = Progress(reason="recovery", started_ms=self._wall())
            self._ensure_runner()
        else:
            self._resume()

    def _resume(self) -> None:
        topo = self._m.topology
        draining = [b.id for b in topo.brokers.values()
                    if b.state in (BrokerState.DRAINING, BrokerState.LEAVING)
                    and topo.slots_of(b.id)]
        if draining and not self._closing:
            self.start(f"resume drain of {', '.join(draining)}")
        else:
            self.notice()

    async def wait_idle(self) -> None:
        """Until no run is going (tests, `aclose`)."""
        while self._runner is not None and not self._runner.done():
            await asyncio.wait([self._runner])

    async def aclose(self) -> None:
        """Stop: no new moves; moves before their commit point abort (bounded by
        SHUTDOWN_GRACE_S); committed ones are cancelled and roll forward at the next start."""
        self._closing = True
        self.cancel()
        for move_id in list(self._m.moves):
            self._x.request_abort(move_id)
        runner = self._runner
        if runner is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE_S):
                    await asyncio.wait([runner])
            runner.cancel()
            await asyncio.wait([runner])
        await self._x.aclose()

    # -- the run -------------------------------------------------------------

    def _ensure_runner(self) -> None:
        if not self.running:
            self._runner = asyncio.create_task(self._run(), name="shardq-rebalance")

    async def _run(self) -> None:
        completed = False
        try:
            async with asyncio.TaskGroup() as tg:
                recovered, self._recovered = self._recovered, []
                for rec in recovered:
                    self._spawn(tg, rec, recovered=True)
                while True:
                    self._wake.clear()
                    while (self._pending and len(self._in_flight) < self.concurrency
                           and not self._closing):
                        if await self._throttle():
                            continue  # state may have changed while we waited
                        self._start_next(tg)
                    if not self._in_flight and (not self._pending or self._closing):
                        break
                    await self._wake.wait()
            completed = True
        finally:
            self._progress.finished_ms = self._wall()
            p = self._progress
            log.info("rebalance finished: %d done, %d failed, %d slots moved%s", p.done,
                     p.failed, p.slots_moved, " (cancelled)" if p.cancelled else "")
            if completed:
                # A `start` that came while the TaskGroup was closing left moves pending.
                self._replan_due = True
                asyncio.get_running_loop().call_soon(self._restart_if_pending)

    def _restart_if_pending(self) -> None:
        self._replan_due = False
        if self._closing or self.running:
            return
        if self._pending:
            self._runner = asyncio.create_task(self._run(), name="shardq-rebalance")
            return
        # Moves that aborted (a second drain re-targeted them, a broker restarted
        # mid-copy) leave draining brokers with slots: plan those again, with a
        # growing pause, so a drain always ends unless it keeps failing.
        topo = self._m.topology
        draining = sorted(b.id for b in topo.brokers.values()
                          if b.state in (BrokerState.DRAINING, BrokerState.LEAVING)
                          and topo.slots_of(b.id))
        if self._progress.failed == 0 or self._progress.cancelled:
            self._retries = 0
        # A broker that joined while the run was planned (brokers joining in
        # quick succession) also leaves slots off their targets.
        left = self._m.plan_moves(self.max_slots_per_move)
        if (not left or self._progress.cancelled or self._retries >= MAX_DRAIN_RETRIES
                or not (draining or self.auto)):
            return
        self._retries += 1
        # At once after a clean run (a broker joined while it was planned);
        # with a growing pause after failures.
        delay = min(5.0, 0.5 * self._retries) if self._progress.failed else 0.0
        log.info("%d slots still off their targets%s: planning again in %.1fs (retry %d)",
                 sum(len(m.slots) for m in left),
                 f" (draining {', '.join(draining)})" if draining else "", delay, self._retries)

        def again() -> None:
            self._replan_due = False
            if not self._closing and not self.running:
                self.start("re-plan: slots still off their targets")

        self._replan_due = True
        asyncio.get_running_loop().call_later(delay, again)

    async def _throttle(self) -> bool:
        """Wait out the throttle; True if it waited."""
        wait = self._last_start + self.throttle_s - self._clock()
        if wait <= 0:
            return False
        await self._sleep(wait)
        return True

    def _start_next(self, tg: asyncio.TaskGroup) -> None:
        move = self._pending.popleft()
        try:
            rec = self._x.begin(move)
        except CoordinatorError as e:
            # The topology changed since the plan (another move, a drain...).
            self._progress.skipped += 1
            log.info("skipping planned move %s -> %s (%d slots): %s", move.source, move.target,
                     len(move.slots), e)
            return
        self._last_start = self._clock()
        self._spawn(tg, rec, recovered=False)

    def _spawn(self, tg: asyncio.TaskGroup, rec: MoveRecord, recovered: bool) -> None:
        self._in_flight.add(rec.move_id)
        tg.create_task(self._one(rec, recovered), name=f"shardq-move-{rec.move_id}")

    async def _one(self, rec: MoveRecord, recovered: bool) -> None:
        """Run one move; never raises (a failure is counted), so the TaskGroup keeps going."""
        try:
            final = await (self._x.recover(rec) if recovered else self._x.forward(rec))
        except Exception as e:
            log.exception("move %s failed", rec.move_id)
            self._count_failure(f"{rec.move_id}: {e!r}")
        else:
            if final.state is MoveState.DONE:
                self._progress.done += 1
                self._progress.slots_moved += len(final.slots)
            else:
                self._count_failure(f"{final.move_id} ({final.source} -> {final.target}): "
                                    f"{final.error}")
        finally:
            self._in_flight.discard(rec.move_id)
            self._wake.set()
        if recovered:
            self._recovering -= 1
            if self._recovering == 0:
                try:
                    self._resume()
                except Exception:
                    log.exception("could not resume the rebalance after recovery")

    def _count_failure(self, error: str) -> None:
        self._progress.failed += 1
        self._progress.errors.append(error)
        del self._progress.errors[:-MAX_ERRORS_KEPT]
