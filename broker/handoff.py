"""The broker's half of a slot handoff A -> B (docs/design.md §6, ops in shardq.protocol).

A move's state on this broker is a `Side`; `TRANSITIONS` lists the legal
changes and `Handoffs._transition` checks each one; the step persists it (in
the same redo log as the data) before it is answered:

    step                 source A                     target B
    COPY                 -, tapping -> tapping
    PREPARE                                           - -> importing
    IMPORT_*                                          importing -> importing
    FREEZE               tapping, frozen -> frozen
    CATCHUP              frozen -> frozen
    ACTIVATE                                          importing -> committed (serves)
    RELEASE / newer map  frozen -> committed (MOVED)
    ABORT                tapping, frozen -> aborted   importing -> aborted
    STATUS of a move                                  - -> aborted (never activates)
      never heard of
    B answers STATUS     frozen -> committed | aborted

`-` is a move this broker does not know (never seen, or forgotten across a
restart before anything was persisted). A committed or aborted move is
final and remembered (REMEMBERED_MOVES), so a late or repeated step gets
the first outcome.

The tap records every op on the moving slots from the instant the snapshot
begins; ops carry absolute values, so applying them over a snapshot read
while the queues kept changing converges on A's state at the freeze.
Guarantee 4 (one writer per slot): A is frozen durably before the
coordinator commits, and B serves only after ACTIVATE, which comes after
the commit.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from shardq import failpoints
from shardq.broker.job import Job
from shardq.broker.queue import BY_ORDER, QueueDefaults, QueueState
from shardq.broker.replay import Images, QueueImage, apply_chunk, apply_op, op_job_id
from shardq.broker.validate import non_neg_int
from shardq.errors import BadRequestError, ShardqError
from shardq.router import NUM_SLOTS, slot_of

if TYPE_CHECKING:
    from shardq.broker.engine import Broker

log = logging.getLogger("shardq.broker.handoff")

COPY_FRAME_BYTES = 4 * 1024 * 1024  # bound on one IMPORT_CHUNKS frame
FROZEN_ASK_TARGET_AFTER_S = 5.0
REMEMBERED_MOVES = 1000
CATCHUP_FRAME_OPS = 2000
SORT_RUN = 50_000  # jobs sorted per loop step when a copy starts
PRE_CATCHUP_ROUNDS = 3  # rounds of tapped ops sent before the freeze ...
PRE_CATCHUP_ENOUGH = 500  # ... stopping early once a round is this small


class Side(StrEnum):
    """Where one move stands on this broker."""

    TAPPING = "tapping"  # source: copying while serving; ops on its slots are tapped
    FROZEN = "frozen"  # source: frozen durably; writes get TRYAGAIN
    IMPORTING = "importing"  # target: staged, not served
    COMMITTED = "committed"  # final: the target serves the slots
    ABORTED = "aborted"  # final: the source serves them (again)


_FINAL: frozenset[Side | None] = frozenset({Side.COMMITTED, Side.ABORTED})
TRANSITIONS: dict[Side | None, frozenset[Side]] = {
    None: frozenset({Side.TAPPING, Side.IMPORTING, Side.ABORTED}),
    Side.TAPPING: frozenset({Side.TAPPING, Side.FROZEN, Side.ABORTED}),
    Side.FROZEN: frozenset({Side.FROZEN, Side.COMMITTED, Side.ABORTED}),
    Side.IMPORTING: frozenset({Side.COMMITTED, Side.ABORTED}),
    Side.COMMITTED: frozenset(),
    Side.ABORTED: frozenset(),
}


class TransitionError(BadRequestError):
    """A handoff step that the move's state on this broker does not allow."""


@dataclass(slots=True)
class Tap:
    """Ops on the moving slots since the snapshot began (source side)."""

    slots: frozenset[int]
    target: str
    target_addr: str
    skip: int  # ops already in the open batch when the tap began
    ops: list[Any] = field(default_factory=list)


@dataclass(slots=True)
class Import:
    """A move this broker is receiving (target side)."""

    slots: list[int]
    source: str
    staging: Images = field(default_factory=dict)
    # The staged queues with their indexes, built chunk by chunk as the copy
    # arrives and kept current by the catch-up ops. None after a restart
    # (activation then builds them from staging: the slow path).
    live: dict[str, QueueState] | None = None


# One slot-move state machine (send, receive, catch up, finish) over shared
# per-move state; splitting it would scatter one protocol (docs/design.md §5).
# shape: ~420 lines, one protocol
class Handoffs:
    def __init__(self, broker: Broker) -> None:
        self.b = broker
        self.slots = broker.slots  # the ownership table: freezes and imports live there
        self.frozen_moves: dict[str, dict[str, Any]] = {}  # move_id -> {slots, target, addr, at}
        self.importing: dict[str, Import] = {}
        self.finished: OrderedDict[str, str] = OrderedDict()  # move_id -> committed|aborted
        self.finished_epoch: dict[str, int] = {}  # committed moves: the epoch of the commit
        self.taps: dict[str, Tap] = {}
        self._tapped: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        return {
            "frozen": [[mid, self.slots.frozen_by(mid), info]
                       for mid, info in self.frozen_moves.items()],
            "importing": {mid: {"slots": imp.slots, "source": imp.source}
                          for mid, imp in self.importing.items()},
            "finished": [[mid, result, self.finished_epoch.get(mid, 0)]
                         for mid, result in self.finished.items()],
        }

    def restore(self, state: dict[str, Any], staging: dict[str, Images]) -> None:
        for mid, slots, info in state.get("frozen", []):
            self.frozen_moves[mid] = dict(info)
            self.slots.freeze(slots, mid)
        for mid, imp in state.get("importing", {}).items():
            self.importing[mid] = Import(list(imp["slots"]), imp["source"],
                                         staging.get(mid, {}))
            self.slots.begin_import(imp["slots"], mid)
        for mid, result, *epoch in state.get("finished", []):
            self.finished[mid] = result
            if epoch and epoch[0]:
                self.finished_epoch[mid] = int(epoch[0])

    def _persist(self) -> None:
        self.b.log.append(self.b.ownership_op())

    # ------------------------------------------------------------ states
    def side(self, move_id: str) -> Side | None:
        """The move's state here (None: not known)."""
        if move_id in self.importing:
            return Side.IMPORTING
        if move_id in self.frozen_moves:
            return Side.FROZEN
        if move_id in self.taps:
            return Side.TAPPING
        result = self.finished.get(move_id)
        return None if result is None else Side(result)

    def _transition(self, move_id: str, to: Side, epoch: int = 0) -> Side | None:
        """Check that `move_id` may go to `to`; finish it there if `to` is final.

        Returns the state it was in. The caller changes the move's data and
        calls `_persist` (one ownership record) before the step is answered.

        Raises:
            TransitionError: the table does not allow it.
        """
        now = self.side(move_id)
        if to not in TRANSITIONS[now]:
            raise TransitionError(f"move {move_id} is {now or 'unknown'} here: cannot go {to}")
        if to in _FINAL:
            self._finish(move_id, to.value, epoch)
        return now

    def _finish(self, move_id: str, result: str, epoch: int = 0) -> None:
        self.finished[move_id] = result
        self.finished.move_to_end(move_id)
        if epoch:
            self.finished_epoch[move_id] = epoch
        while len(self.finished) > REMEMBERED_MOVES:
            gone, _ = self.finished.popitem(last=False)
            self.finished_epoch.pop(gone, None)
        self.b.handoffs[result] = self.b.handoffs.get(result, 0) + 1

    # ------------------------------------------------------------ hot-path hooks
    def tap_batch(self, ops: list[Any]) -> None:
        """Called with every batch handed to the writer while a tap runs."""
        queues = self.b.queues
        for tap in self.taps.values():
            start, tap.skip = tap.skip, 0
            for op in ops[start:] if start else ops:
                name = op[1]
                if name is None:
                    continue
                q = queues.get(name)
                if q is not None and q.slot in tap.slots:
                    tap.ops.append(op)

    # ------------------------------------------------------------ term
    def check_term(self, term: Any) -> None:
        self.slots.accept_term(term)

    # ------------------------------------------------------------ target side
    async def prepare(self, args: dict[str, Any]) -> Any:
        mid, slots = _move_id(args), _slots(args)
        self.check_term(args.get("term"))
        if self.finished.get(mid) == "aborted":
            raise BadRequestError(f"move {mid} was aborted here; it can never be prepared again")
        if mid not in self.importing:
            self._transition(mid, Side.IMPORTING)
            owned = [s for s in slots if self.b.owned[s]]
            if owned:
                raise BadRequestError(f"already own slots {owned[:5]}")
            # Stale staging of aborted imports of the same slots goes first.
            for other in [m for m, imp in self.importing.items() if set(imp.slots) & set(slots)]:
                self._drop_import(other)
            self.importing[mid] = Import(slots, str(args.get("source", "")))
            self.slots.begin_import(slots, mid)
            self._persist()
        await self.b.commits.durable()
        return {"state": "importing"}

    def import_chunks(self, args: dict[str, Any]) -> Any:
        imp = self._import(args)
        chunks = args.get("chunks")
        if not isinstance(chunks, list):
            raise BadRequestError("chunks must be a list")
        if args.get("reset"):
            imp.staging, imp.live = {}, {}
            self.b.log.append(("SX", None, _move_id(args)))
        if imp.live is None:
            for ch in chunks:
                apply_chunk(imp.staging, ch)
        else:
            apply_chunks_live(imp.staging, imp.live, chunks, self._build)
        self.b.log.append(("SC", None, _move_id(args), chunks))
        return None

    def _build(self, name: str, img: QueueImage) -> QueueState:
        return build_queue(name, img, self.b.log, self.b.defaults)

    def import_ops(self, args: dict[str, Any]) -> Any:
        imp = self._import(args)
        ops = args.get("ops")
        if not isinstance(ops, list):
            raise BadRequestError("ops must be a list")
        if imp.live is None:
            for op in ops:
                apply_op(imp.staging, op)
        else:
            apply_ops_live(imp.staging, imp.live, ops, self._build)
        self.b.log.append(("SO", None, _move_id(args), ops))
        return None

    def _import(self, args: dict[str, Any]) -> Import:
        imp = self.importing.get(_move_id(args))
        if imp is None:
            raise BadRequestError(f"no import {args.get('move_id')!r} in progress here")
        return imp

    async def activate(self, args: dict[str, Any]) -> Any:
        mid = _move_id(args)
        self.check_term(args.get("term"))
        epoch = int(args.get("epoch", 0))
        if self.finished.get(mid) == "committed":
            return {"active": True}
        imp = self.importing.get(mid)
        if imp is None:
            raise TransitionError(f"move {mid} is not importing here (state "
                                  f"{self.finished.get(mid, 'unknown')})")
        b = self.b
        live = imp.live or {}
        for name, img in imp.staging.items():
            q = live.get(name)
            if q is None:
                q = self._build(name, img)
            else:
                q.adopt_meta(img.meta)
            b.queues[name] = q
            b.adopt_tenant_window(q)
        self._transition(mid, Side.COMMITTED, epoch)
        self.slots.take(imp.slots, epoch)
        del self.importing[mid]
        b.log.append(("I", None, mid))
        self._persist()
        # The writer thread lists the imported jobs for the next checkpoint, so
        # the loop does not walk every job here (the pause grows with it).
        b.mark_dirty_queues([(name, img.jobs, img.tombstones)
                             for name, img in imp.staging.items()])
        await b.commits.durable()
        for name in imp.staging:
            q = b.queues[name]
            b.arm(q)
            if name in b.waiters:
                b.serve_waiters(name)
        log.info("move %s activated: %d slots, %d queues", mid, len(imp.slots),
                 len(imp.staging))
        return {"active": True}

    def _drop_import(self, mid: str) -> None:
        self._transition(mid, Side.ABORTED)
        self.importing.pop(mid, None)
        self.slots.end_import(mid)
        self.b.log.append(("AB", None, mid))

    def status(self, args: dict[str, Any]) -> Any:
        """`pending`, `committed` or `aborted`; with `detail`, `{state, epoch}`
        (`epoch`: the epoch the move committed at, 0 when not committed)."""
        mid = _move_id(args)
        if mid in self.importing:
            result = "pending"
        else:
            result = self.finished.get(mid) or ""
            if not result:
                # Never heard of it: record it aborted so it can never activate later.
                self._transition(mid, Side.ABORTED)
                self._persist()
                result = "aborted"
        if args.get("detail"):
            return {"state": result, "epoch": self.finished_epoch.get(mid, 0)}
        return result

    # ------------------------------------------------------------ source side
    async def copy(self, args: dict[str, Any]) -> Any:
        mid, slots = _move_id(args), _slots(args)
        self.check_term(args.get("term"))
        target, addr = str(args.get("target", "")), str(args.get("target_addr", ""))
        rate = non_neg_int(args.get("max_jobs_per_s") or 0, "max_jobs_per_s")
        b = self.b
        not_mine = [s for s in slots if not b.owned[s]]
        if not_mine:
            raise BadRequestError(f"do not own slots {not_mine[:5]}")
        self._transition(mid, Side.TAPPING)
        conn = await self._connect(addr)
        # The tap and the queue metas are taken in the same loop step: the
        # snapshot's counters are exactly those of the ops before the tap.
        tap = Tap(frozenset(slots), target, addr, skip=len(b.log))
        self.taps[mid] = tap
        metas = {n: q.meta(events=True) for n, q in b.queues.items() if q.slot in tap.slots}
        try:
            sent_jobs = await self._stream_snapshot(conn, mid, metas, float(rate))
            # B's IMPORT_* replies are durable (write ops), so the copy is on disk there.
            # Ops tapped during the copy go now, while still serving, so the
            # frozen catch-up only carries what arrives after this.
            sent_ops = 0
            for _ in range(PRE_CATCHUP_ROUNDS):
                ops, tap.ops = tap.ops, []
                await self._send_ops(conn, mid, ops)
                sent_ops += len(ops)
                if len(ops) <= PRE_CATCHUP_ENOUGH:
                    break
        except BaseException:
            self.taps.pop(mid, None)
            raise
        finally:
            await conn.aclose()
        return {"queues": len(metas), "jobs": sent_jobs, "ops": sent_ops}

    async def _stream_snapshot(self, conn: Any, mid: str, metas: dict[str, Any],
                               rate: float) -> int:
        """Send the queues' export chunks in small frames, `rate` jobs/s at
        most (0: unpaced); returns the number of jobs sent."""
        clock = asyncio.get_running_loop().time
        started, sent = clock(), 0
        # A retried COPY starts over: the target drops what an earlier
        # attempt staged, or jobs removed since would come back.
        await conn.request("IMPORT_CHUNKS", {"move_id": mid, "chunks": [], "reset": True},
                           timeout=60)
        batch: list[dict[str, Any]] = []
        size = 0
        for name, meta in metas.items():
            q = self.b.queues.get(name)
            if q is None:
                continue
            for chunk in q.export_chunks(jobs=await _jobs_by_order(q)):
                if chunk["kind"] == "meta":
                    chunk["meta"] = meta
                batch.append(chunk)
                size += 100 * len(chunk.get("jobs", ())) + 64
                sent += len(chunk.get("jobs", ()))
                # Small frames: the target applies each in one loop step,
                # so its other queues stall for ~10 ms at most per frame.
                if size >= COPY_FRAME_BYTES // 16 or len(batch) >= 2:
                    await conn.request("IMPORT_CHUNKS", {"move_id": mid, "chunks": batch},
                                       timeout=60)
                    batch, size = [], 0
                    ahead = sent / rate - (clock() - started) if rate else 0.0
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                await asyncio.sleep(0)  # keep serving between chunks
        if batch:
            await conn.request("IMPORT_CHUNKS", {"move_id": mid, "chunks": batch}, timeout=60)
        return sent

    @staticmethod
    async def _send_ops(conn: Any, mid: str, ops: list[Any]) -> None:
        for i in range(0, len(ops), CATCHUP_FRAME_OPS):
            await conn.request("IMPORT_OPS", {"move_id": mid, "ops": ops[i:i + CATCHUP_FRAME_OPS]},
                               timeout=60)

    async def freeze(self, args: dict[str, Any]) -> Any:
        mid, slots = _move_id(args), _slots(args)
        self.check_term(args.get("term"))
        tap = self.taps.get(mid)
        if mid not in self.frozen_moves:
            if tap is None:
                raise TransitionError(f"move {mid} has no copy in progress here; abort it")
            self._transition(mid, Side.FROZEN)
            loop = asyncio.get_running_loop()
            self.frozen_moves[mid] = {"target": tap.target, "addr": tap.target_addr,
                                      "at": loop.time()}
            self.slots.freeze(slots, mid)
            self._persist()
        await self.b.commits.durable()  # durable before answered (docs/design.md §6 step 3)
        return {"frozen": True}

    async def catchup(self, args: dict[str, Any]) -> Any:
        mid = _move_id(args)
        self.check_term(args.get("term"))
        tap = self.taps.get(mid)
        if tap is None or mid not in self.frozen_moves:
            raise TransitionError(f"move {mid}: nothing recorded to catch up (restarted?); abort")
        await self.b.commits.durable()  # every tapped op is in a batch the tap has seen
        ops = tap.ops
        # The target may have restarted elsewhere since the copy: use the
        # freshest address (the coordinator's, then our map's).
        addr = args.get("target_addr") or self.b.topology.addr_of(tap.target) or tap.target_addr
        tap.target_addr = self.frozen_moves[mid]["addr"] = str(addr)
        conn = await self._connect(tap.target_addr)
        try:
            await self._send_ops(conn, mid, ops)
            await conn.request("IMPORT_OPS", {"move_id": mid, "ops": []}, timeout=60)
        finally:
            await conn.aclose()
        del self.taps[mid]
        return {"ops": len(ops)}

    async def release(self, args: dict[str, Any]) -> Any:
        mid = _move_id(args)
        self.check_term(args.get("term"))
        info = self.frozen_moves.get(mid)
        if info is None:
            return {"released": True}  # already released (idempotent)
        slots = self.slots.frozen_by(mid)
        owner = str(args.get("owner", info["target"]))
        addr = str(args.get("addr", info["addr"]))
        epoch = int(args.get("epoch", 0))
        self._transition(mid, Side.COMMITTED, epoch)
        self.give_up(slots, owner, addr, epoch)
        await self.b.commits.durable()
        return {"released": True}

    def give_up(self, slots: Iterable[int], owner: str, addr: str, epoch: int) -> None:
        """The slots now belong to `owner`: answer MOVED and drop their data."""
        b = self.b
        slot_set = set(slots)
        for mid in self.slots.give_up(slot_set, epoch):
            self.frozen_moves.pop(mid, None)
        for s in slot_set:
            b.topology.patch_slot(s, owner, addr, max(epoch, b.topology.slot_epoch(s)))
        b.topology_patched()
        gone = [n for n, q in b.queues.items() if q.slot in slot_set]
        b.free_later([b.queues.pop(n) for n in gone])
        b.release_waiters(slot_set, epoch)
        if b.events.subs:
            for name in gone:
                s = slot_of(name)
                b.events.moved([name], {"slot": s, "owner": owner, "addr": addr,
                                        "epoch": b.slot_epochs[s]})
        if gone:
            b.log.append(("G", None, gone))
        self._persist()
        b.commits.flush_soon()

    async def abort(self, args: dict[str, Any]) -> Any:
        mid = _move_id(args)
        self.check_term(args.get("term"))
        self._abort_local(mid)
        await self.b.commits.durable()
        return {"aborted": True}

    def _abort_local(self, mid: str) -> None:
        self.taps.pop(mid, None)
        if mid in self.frozen_moves:
            del self.frozen_moves[mid]
            self.slots.thaw(mid)
        if mid in self.importing:
            self._drop_import(mid)
        elif mid not in self.finished:
            self._transition(mid, Side.ABORTED)
        self._persist()
        self.b.commits.flush_soon()
        log.info("move %s aborted here", mid)

    # ------------------------------------------------------------ cut-off source
    async def ask_targets(self) -> None:
        """A source frozen for long asks its target how the move ended."""
        loop = asyncio.get_running_loop()
        for mid, info in list(self.frozen_moves.items()):
            if loop.time() - info.get("at", 0) < FROZEN_ASK_TARGET_AFTER_S:
                continue
            addr = self.b.topology.addr_of(info["target"]) or info["addr"]
            try:
                conn = await self._connect(addr)
                try:
                    result = await conn.request("HANDOFF_STATUS", {"move_id": mid, "detail": True},
                                                timeout=5)
                finally:
                    await conn.aclose()
            except (OSError, ShardqError, TimeoutError) as exc:
                log.debug("target of move %s unreachable: %r", mid, exc)
                continue
            state = result.get("state") if isinstance(result, dict) else None
            if state == "aborted":
                self._abort_local(mid)
            elif state == "committed" and mid in self.frozen_moves:
                slots = self.slots.frozen_by(mid)
                epoch = int(result.get("epoch") or 0) or (
                    max((self.b.slot_epochs[s] for s in slots), default=0) + 1)
                self._transition(mid, Side.COMMITTED, epoch)
                self.give_up(slots, info["target"], addr, epoch)

    async def _connect(self, addr: str) -> Any:
        # A link of the step's own (the caller closes it): a COPY's stream
        # must not queue behind, nor hold up, other traffic to the target.
        return await self.b.peers.pool.dial(addr)


async def _jobs_by_order(q: QueueState) -> Iterator[Job]:
    """The queue's jobs in `order`: sorted in runs, a loop step each, and
    merged lazily as the copy reads them (one sort of 1M jobs holds the loop
    ~100 ms). A job whose order changes meanwhile may come a little out of
    place; the target's indexes put it right (QueueState._insert_waiting)."""
    jobs = list(q.jobs.values())
    runs = []
    for i in range(0, len(jobs), SORT_RUN):
        runs.append(sorted(jobs[i:i + SORT_RUN], key=BY_ORDER))
        await asyncio.sleep(0)
    return heapq.merge(*runs, key=BY_ORDER)


def build_queue(name: str, img: QueueImage, log: list[Any], defaults: QueueDefaults
                ) -> QueueState:
    """A queue with its indexes built over an image's jobs (shared, not copied)."""
    q = QueueState(name, slot_of(name), log, defaults)
    q.restore(img.meta, img.jobs, img.tombstones)
    img.tombstones = q.tombstones  # one dict, so replayed ops reach both
    return q


def apply_chunks_live(staging: Images, live: dict[str, QueueState],
                      chunks: list[dict[str, Any]],
                      build: Callable[[str, QueueImage], QueueState]) -> None:
    """Apply copy chunks to staging and index their jobs as they arrive, so
    the queues are ready when the copy ends (no O(jobs) step later)."""
    for ch in chunks:
        name = str(ch.get("queue"))
        q = live.get(name)
        if q is None:
            apply_chunk(staging, ch)
            live[name] = build(name, staging[name])
            continue
        ids = [rec[0] for rec in ch.get("jobs", ())]
        befores = [q.index_key(jid) for jid in ids]
        apply_chunk(staging, ch)
        if ch["kind"] == "meta":
            q.adopt_meta(staging[name].meta)
        for jid, before in zip(ids, befores, strict=True):
            q.reindex(before, jid)


def apply_ops_live(staging: Images, live: dict[str, QueueState], ops: list[Any],
                   build: Callable[[str, QueueImage], QueueState]) -> None:
    """Replay catch-up ops onto staged images whose queues are already built,
    re-indexing only the job each op touches (O(ops), not O(jobs))."""
    for op in ops:
        name, jid = op[1], op_job_id(op)
        q = live.get(name)
        before = q.index_key(jid) if q is not None and jid is not None else None
        apply_op(staging, op)
        if q is None or op[0] == "X":
            live[name] = build(name, staging[name])  # new (small) or emptied queue
            continue
        if jid is not None:
            q.reindex(before, jid)
        if q.ring is not None:  # the copied event ring stays complete (broker/events.py)
            q.ring.note(op, staging[name].meta["seq"])


def _move_id(args: Any) -> str:
    mid = args.get("move_id") if isinstance(args, dict) else None
    if not isinstance(mid, str) or not mid:
        raise BadRequestError("move_id must be a non-empty string")
    return mid


def _slots(args: dict[str, Any]) -> list[int]:
    slots = args.get("slots")
    if not isinstance(slots, list) or not slots or not all(
            isinstance(s, int) and 0 <= s < NUM_SLOTS for s in slots):
        raise BadRequestError(f"slots must be a non-empty list of ints in [0, {NUM_SLOTS})")
    return slots


def hit(step: str, when: str) -> None:
    if failpoints.ACTIVE:
        failpoints.hit(f"broker.{when}_{step}")
