"""The move executor: one handoff of slots from broker A to broker B (docs/design.md §6).

The steps, as data (who gets which op, in which phase)::

    phase      op                 to   before the commit point: a failure aborts
    prepare    HANDOFF_PREPARE    B    |
    copy       HANDOFF_COPY       A    |  (minutes allowed: A streams a snapshot to B)
    freeze     HANDOFF_FREEZE     A    |
    catch-up   HANDOFF_CATCHUP    A    v
    commit     (SQLite: the slots owned by B at epoch e+1)   <- the commit point
    activate   HANDOFF_ACTIVATE   B    after it: every step rolls forward,
    cleanup    HANDOFF_RELEASE    A    retried with backoff until it succeeds

Invariants:

* Before PREPARE, the source must serve with an epoch at least that of the
  moving slots (`epoch_of`, a PING): a broker learns the map a heartbeat
  after the coordinator changed it and refuses to hand off slots it does
  not know it owns yet.
* A step's phase is persisted *before* its op is sent, so a restarted
  coordinator knows the furthest step any broker may have seen.
* The commit is one SQLite transaction (`Membership.commit_move`) that
  writes the new owner and the `commit` phase together: a move is committed
  iff its persisted phase is `commit` or later. A is durably frozen before
  it (FREEZE answered) and B serves only after it (ACTIVATE is sent only
  then), so at most one broker accepts writes for a slot (docs/design.md §9.4).
* Before the commit point, a definitive error, a broker unreachable past
  `retry_budget_s`, or `request_abort` aborts: the decision is persisted
  (`aborting`), then HANDOFF_ABORT goes to B (so it can never activate and
  answers `aborted` to a frozen A asking) and then to A (which unfreezes),
  best effort, retried for `abort_budget_s`.
* After it nothing aborts: ACTIVATE and RELEASE are retried until they succeed.
* `recover` (coordinator start): a move persisted before `commit` aborts; one
  at `commit` or later rolls forward.

Failpoints `coordinator.before_<step>` / `coordinator.after_<step>` (step
names prepare, copy, freeze, catchup, commit, activate, cleanup) surround
every attempt of every step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from shardq import failpoints, protocol
from shardq.errors import (
    BusyError,
    ConnectionClosedError,
    TryAgainError,
    UnavailableError,
    UnknownServerError,
)
from shardq.router import Move

from .errors import CoordinatorError
from .links import BrokerGone
from .membership import Membership
from .state import MoveRecord, MoveState

log = logging.getLogger("shardq.coordinator.moves")

SendOp = Callable[[str, str, dict[str, Any], float], Awaitable[Any]]
"""send(broker_id, op, args, timeout_s) -> reply body; raises on any failure."""

EpochOf = Callable[[str, float], Awaitable[int]]
"""epoch_of(broker_id, timeout_s) -> the topology epoch the broker serves with now."""


@dataclass(frozen=True, slots=True)
class MovePolicy:
    """Timeouts and retry budgets of the executor (seconds)."""

    step_timeout_s: float = 10.0
    copy_timeout_s: float = 600.0  # a snapshot of big queues streams for minutes
    retry_budget_s: float = 30.0  # before commit: a step failing this long aborts the move
    abort_budget_s: float = 60.0  # how long HANDOFF_ABORT is retried
    backoff_min_s: float = 0.1
    backoff_max_s: float = 5.0
    # Jobs per second one move's copy may stream (0: as fast as it can). The
    # copy costs CPU on both brokers; pacing it keeps their serving going.
    copy_rate: int = 0


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a handoff: its failpoint name, its phase, its op and its recipient."""

    name: str
    phase: str
    op: str
    to_source: bool


BEFORE_COMMIT = (
    Step("prepare", "prepare", protocol.HANDOFF_PREPARE, to_source=False),
    Step("copy", "copy", protocol.HANDOFF_COPY, to_source=True),
    Step("freeze", "freeze", protocol.HANDOFF_FREEZE, to_source=True),
    Step("catchup", "catch-up", protocol.HANDOFF_CATCHUP, to_source=True),
)
AFTER_COMMIT = (
    Step("activate", "activate", protocol.HANDOFF_ACTIVATE, to_source=False),
    Step("cleanup", "cleanup", protocol.HANDOFF_RELEASE, to_source=True),
)
assert (*(s.phase for s in BEFORE_COMMIT), "commit",
        *(s.phase for s in AFTER_COMMIT)) == protocol.PHASES

# Errors worth retrying: the broker may be restarting, or briefly busy.
_TRANSIENT = (OSError, TimeoutError, ConnectionClosedError, TryAgainError, BusyError,
              UnavailableError)


def _transient(e: Exception) -> bool:
    # A broker answers UNAVAILABLE when *it* could not reach its peer (A -> B copy).
    return isinstance(e, _TRANSIENT) or (
        isinstance(e, UnknownServerError) and e.code_name == "UNAVAILABLE")


class StepFailed(Exception):
    """A step before the commit point failed for good: the move aborts."""


class _AbortRequested(Exception):
    pass


def _hit(name: str) -> None:
    if failpoints.ACTIVE:
        failpoints.hit(name)


class MoveExecutor:
    """Runs handoffs through their phases; every phase change is durable first.

    Args:
        membership: persists moves and ownership (the commit point).
        send: how ops reach brokers (`BrokerLinks.send`, or a fake in tests).
        policy: timeouts and budgets.
        clock: monotonic seconds, for retry budgets (tests inject one).
        sleep: awaited between retries (tests inject one that advances `clock`).
        on_close: awaited by `aclose` (e.g. `BrokerLinks.aclose`).
        epoch_of: when given, a move waits (within the retry budget) until its
            source serves with an epoch at least that of the moving slots: a
            broker learns the map a heartbeat after the coordinator changed it,
            and cannot hand off slots it does not know it owns yet.
    """

    def __init__(self, membership: Membership, send: SendOp, policy: MovePolicy | None = None,
                 *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_close: Callable[[], Awaitable[None]] | None = None,
                 epoch_of: EpochOf | None = None) -> None:
        self._m = membership
        self._send = send
        self._on_close = on_close
        self._epoch_of = epoch_of
        self.policy = policy or MovePolicy()
        self._clock = clock
        self._sleep = sleep
        self._abort_requests: dict[str, asyncio.Event] = {}

    # -- entry points --------------------------------------------------------

    def begin(self, move: Move, move_id: str | None = None) -> MoveRecord:
        """Persist a new move in phase `prepare`; `forward` then runs it.

        Raises:
            Conflict: the move no longer fits the topology (see Membership.begin_move).
        """
        return self._m.begin_move(move, move_id)

    async def execute(self, move: Move, move_id: str | None = None) -> MoveRecord:
        """`begin` + `forward`: run a new move to its end; returns the final record."""
        return await self.forward(self.begin(move, move_id))

    async def forward(self, rec: MoveRecord) -> MoveRecord:
        """Run a begun move to its end: `done`, or `aborted` before the commit point.

        Raises only what the store raises (and CancelledError); a move left
        unfinished that way is resumed by `recover` at the next start.
        """
        if rec.committed or rec.state is not MoveState.RUNNING:
            return await self.recover(rec)
        abort = self._abort_requests.setdefault(rec.move_id, asyncio.Event())
        try:
            rec = await self._to_commit(rec, abort)
        except StepFailed as e:
            return await self._abort(rec, str(e))
        finally:
            self._abort_requests.pop(rec.move_id, None)
        return await self._roll_forward(rec)

    async def recover(self, rec: MoveRecord) -> MoveRecord:
        """Finish a move found unfinished at start: abort before commit, roll forward after."""
        if rec.finished:
            return rec
        if not rec.committed:
            return await self._abort(
                rec, rec.error or f"coordinator restarted during {rec.phase}")
        return await self._roll_forward(rec)

    def request_abort(self, move_id: str) -> bool:
        """Abort a running move at once if it has not reached the commit point.

        Returns:
            True if the move was running before the commit point (it will abort).
        """
        event = self._abort_requests.get(move_id)
        rec = self._m.moves.get(move_id)
        if event is None or rec is None or rec.committed:
            return False
        event.set()
        return True

    async def aclose(self) -> None:
        """Release the transport (after the moves stopped); idempotent."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            await on_close()

    # -- before the commit point ---------------------------------------------

    async def _to_commit(self, rec: MoveRecord, abort: asyncio.Event) -> MoveRecord:
        await self._source_caught_up(rec, abort)
        for step in BEFORE_COMMIT:
            if abort.is_set():
                raise StepFailed(f"cancelled before {step.phase}")
            rec = self._m.set_move_phase(rec.move_id, step.phase)
            await self._step_with_budget(step, rec, abort)
        if abort.is_set():
            raise StepFailed("cancelled before commit")
        try:
            _hit("coordinator.before_commit")
            rec = self._m.commit_move(rec.move_id)
        except (CoordinatorError, failpoints.FailpointError) as e:
            raise StepFailed(f"commit refused: {e}") from e
        log.info("move %s committed: %d slots %s -> %s at epoch %d", rec.move_id,
                 len(rec.slots), rec.source, rec.target, rec.epoch)
        # From here on the move rolls forward whatever happens (even a failpoint error).
        try:
            _hit("coordinator.after_commit")
        except failpoints.FailpointError as e:
            log.warning("move %s: %s after the commit point; rolling forward", rec.move_id, e)
        return rec

    async def _source_caught_up(self, rec: MoveRecord, abort: asyncio.Event) -> None:
        if self._epoch_of is None:
            return
        epoch_of = self._epoch_of
        topo = self._m.topology
        needed = max(topo.slot_epoch(s) for s in rec.slots)

        async def check() -> None:
            epoch = await epoch_of(rec.source, self.policy.step_timeout_s)
            if epoch < needed:
                raise TryAgainError(f"{rec.source} serves epoch {epoch} < {needed}")

        await self._with_budget("epoch check", rec.source, rec, check, abort)

    async def _step_with_budget(self, step: Step, rec: MoveRecord, abort: asyncio.Event) -> None:
        await self._with_budget(step.op, self._recipient(step, rec), rec,
                                lambda: self._attempt(step, rec), abort)

    async def _with_budget(self, what: str, broker: str, rec: MoveRecord,
                           attempt: Callable[[], Awaitable[Any]], abort: asyncio.Event) -> None:
        """Retry transient failures of `attempt` until the budget is spent; then StepFailed."""
        first_failure: float | None = None
        backoff = self.policy.backoff_min_s
        while True:
            try:
                await self._until_abort(attempt(), abort)
                return
            except _AbortRequested:
                raise StepFailed(f"cancelled during {rec.phase}") from None
            except Exception as e:
                if not _transient(e):
                    raise StepFailed(f"{what} to {broker} failed: {e!r}") from e
                now = self._clock()
                first_failure = now if first_failure is None else first_failure
                if now - first_failure >= self.policy.retry_budget_s:
                    raise StepFailed(f"{what} to {broker} kept failing for "
                                     f"{self.policy.retry_budget_s:g}s: {e!r}") from e
                log.info("move %s: %s to %s failed (%r); retrying", rec.move_id, what, broker, e)
            try:
                await self._until_abort(self._sleep(backoff), abort)
            except _AbortRequested:
                raise StepFailed(f"cancelled during {rec.phase}") from None
            backoff = min(backoff * 2, self.policy.backoff_max_s)

    async def _until_abort(self, work: Awaitable[Any], abort: asyncio.Event) -> Any:
        """`await work`, unless `abort` is set first (then `work` is cancelled)."""
        task = asyncio.ensure_future(work)
        if abort.is_set():
            task.cancel()
        waiter = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        if task.cancelled():
            raise _AbortRequested
        return task.result()

    # -- after the commit point ----------------------------------------------

    async def _roll_forward(self, rec: MoveRecord) -> MoveRecord:
        errors: list[str] = []
        start = 0 if rec.phase == "commit" else [s.phase for s in AFTER_COMMIT].index(rec.phase)
        for step in AFTER_COMMIT[start:]:
            rec = self._m.set_move_phase(rec.move_id, step.phase)
            error = await self._step_until_done(step, rec)
            if error:
                errors.append(error)
        rec = self._m.finish_move(rec.move_id, "; ".join(errors) or None)
        log.info("move %s done: %d slots %s -> %s", rec.move_id, len(rec.slots), rec.source,
                 rec.target)
        return rec

    async def _step_until_done(self, step: Step, rec: MoveRecord) -> str | None:
        """Retry with backoff until it succeeds; returns why it was skipped, if it was."""
        backoff = self.policy.backoff_min_s
        failures = 0
        while True:
            try:
                await self._attempt(step, rec)
                if failures:
                    log.info("move %s: %s to %s succeeded after %d failures", rec.move_id,
                             step.op, self._recipient(step, rec), failures)
                return None
            except BrokerGone as e:
                # Forgotten (`shardq forget`): there is nothing left to activate or release.
                log.error("move %s: skipping %s: %s", rec.move_id, step.op, e)
                return f"{step.phase} skipped: {e}"
            except Exception as e:
                failures += 1
                # One line at the first failure and then every 10th: brokers may be restarting.
                if failures == 1 or failures % 10 == 0:
                    log.warning("move %s is committed; %s to %s failed %d times (%r); retrying",
                                rec.move_id, step.op, self._recipient(step, rec), failures, e)
            await self._sleep(backoff)
            backoff = min(backoff * 2, self.policy.backoff_max_s)

    # -- abort ---------------------------------------------------------------

    async def _abort(self, rec: MoveRecord, reason: str) -> MoveRecord:
        """Persist the abort, tell B then A (best effort, retried), close the move."""
        rec = self._m.moves.get(rec.move_id, rec)  # the caller's copy may be a phase behind
        log.warning("move %s (%d slots %s -> %s) aborts in %s: %s", rec.move_id, len(rec.slots),
                    rec.source, rec.target, rec.phase, reason)
        rec = self._m.mark_move_aborting(rec.move_id, reason)
        # B first: once it has recorded the abort it can never activate the move,
        # and it answers `aborted` to a frozen A that asks (HANDOFF_STATUS).
        pending = list(dict.fromkeys([rec.target, rec.source]))
        errors: dict[str, str] = {}
        deadline = self._clock() + self.policy.abort_budget_s
        backoff = self.policy.backoff_min_s
        while pending:
            for broker in list(pending):
                try:
                    await self._send(broker, protocol.HANDOFF_ABORT,
                                     {"move_id": rec.move_id, "term": self._m.term},
                                     self.policy.step_timeout_s)
                except BrokerGone:
                    pending.remove(broker)
                except Exception as e:
                    errors[broker] = repr(e)
                else:
                    pending.remove(broker)
            if not pending or self._clock() >= deadline:
                break
            await self._sleep(backoff)
            backoff = min(backoff * 2, self.policy.backoff_max_s)
        if pending:
            unacked = ", ".join(f"{b} ({errors.get(b)})" for b in pending)
            log.error("move %s: HANDOFF_ABORT not acknowledged by %s; a frozen source "
                      "learns the outcome from the target (HANDOFF_STATUS)", rec.move_id, unacked)
            reason = f"{reason}; abort not acknowledged by {unacked}"
        return self._m.finish_move(rec.move_id, reason)

    # -- one attempt ---------------------------------------------------------

    async def _attempt(self, step: Step, rec: MoveRecord) -> Any:
        _hit(f"coordinator.before_{step.name}")
        timeout = self.policy.copy_timeout_s if step.name == "copy" else self.policy.step_timeout_s
        t0 = time.perf_counter()
        reply = await self._send(self._recipient(step, rec), step.op, self._args(step, rec),
                                 timeout)
        log.info("move %s: %s took %.1f ms", rec.move_id, step.name,
                 (time.perf_counter() - t0) * 1e3)
        _hit(f"coordinator.after_{step.name}")
        return reply

    @staticmethod
    def _recipient(step: Step, rec: MoveRecord) -> str:
        return rec.source if step.to_source else rec.target

    def _args(self, step: Step, rec: MoveRecord) -> dict[str, Any]:
        """The op's args as shardq.protocol specifies them."""
        topo = self._m.topology
        args: dict[str, Any] = {"move_id": rec.move_id, "term": self._m.term}
        if step.name == "prepare":
            args.update(slots=list(rec.slots), source=rec.source,
                        source_addr=topo.addr_of(rec.source))
        elif step.name == "copy":
            args.update(slots=list(rec.slots), target=rec.target,
                        target_addr=topo.addr_of(rec.target))
            if self.policy.copy_rate:
                args.update(max_jobs_per_s=self.policy.copy_rate)
        elif step.name == "freeze":
            args.update(slots=list(rec.slots))
        elif step.name == "catchup":
            # The target may have restarted on a new address since the copy.
            args.update(target_addr=topo.addr_of(rec.target))
        elif step.name == "activate":
            args.update(epoch=rec.epoch)
        elif step.name == "cleanup":
            args.update(epoch=rec.epoch, owner=rec.target, addr=topo.addr_of(rec.target))
        return args
