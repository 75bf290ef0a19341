"""The follower's half of replication (docs/design.md §12).

A broker follows at most a few primaries (with `replicas 1`, one). For each
it keeps a `Replica`: the primary's queues as standby `QueueState`s, built
and kept current from the stream exactly as a handoff's target keeps its
staged queues (`apply_chunks_live`, `apply_ops_live`, broker/handoff.py),
plus a durable copy in its own SQLite file, `replica-<primary>.db` in the
data directory, written by its own `CommitLog` (so batches that arrive while
the disk is busy share one fsync, as on the primary).

The stream (REPL_APPEND) carries the primary's redo ops in commit order with
its replication epoch and log seq, or snapshot chunks (a new or returning
follower catches up from a snapshot plus the stream). A batch is answered
once it is fsynced here. A stream whose epoch is older than the newest one
seen is refused (`STALE_TERM`): that is the fence a failover puts up first
(REPL_FENCE), so a primary cut off or paused can never again count this
disk as its second one.

Promotion (`promote`) adopts the standby queues into the broker: they are
written into the broker's own log (as a handoff's staging is, then
activated with one record) and served at once; a reply to a write on them
waits for that commit like every other. Once the broker's own log holds
them the replica file is emptied but kept, with its fence and a
`promoted` mark, so the old primary's stream stays refused; until then a
restart promotes again from it (the coordinator's map says which epoch's
slots came from it). It is deleted when the map no longer names this
broker for that primary (the old primary came back and starts over).

A replica file is checkpointed as the broker's own is (broker/store.py):
its jobs table and queue metas are rewritten from the standby queues and
the log they cover is deleted, so its storage stays bounded and a restart
replays only the log since. Snapshot chunks (`RC`) carry no per-job op, so
their jobs are marked dirty by id; a reset first logs its old queues as gone
(`G`), whose rows the next checkpoint deletes.
"""

from __future__ import annotations

import asyncio
import copy
import glob
import logging
import os
from typing import TYPE_CHECKING, Any

from shardq import failpoints
from shardq.broker.commitlog import IDLE_CHECKPOINT_AFTER_S, CommitLog, Sink
from shardq.broker.handoff import apply_chunks_live, apply_ops_live, build_queue
from shardq.broker.queue import QueueState
from shardq.broker.replay import Images, QueueImage, apply_broker_op
from shardq.broker.store import RowSource, Store
from shardq.codec import encode_frame
from shardq.errors import BadRequestError, StaleTermError
from shardq.router import slot_of

if TYPE_CHECKING:
    from shardq.broker.engine import Broker

log = logging.getLogger("shardq.broker.follower")

PROMOTE_CHUNK_JOBS = 1000  # jobs per staging op written at promotion
PROMOTE_STEP_CHUNKS = 50  # chunks written per loop step at promotion
DROP_FLUSH_TIMEOUT_S = 30.0  # a dropped replica's log gets this long to go idle


def replica_path(data_dir: str, primary: str) -> str:
    return os.path.join(data_dir, f"replica-{primary}.db")


class Replica:
    """One primary's queues, kept here durably and ready to serve."""

    def __init__(self, broker: Broker, primary: str) -> None:
        self.b = broker
        self.primary = primary
        self.path = replica_path(broker.config.data_dir, primary)
        self.store = Store(self.path, durable=broker.config.durable)
        self.commits = CommitLog(self.store, self, broker.config.durable)
        self.images: Images = {}
        self.live: dict[str, QueueState] = {}
        self.staging: dict[str, Images] = {}  # the primary's own imports in flight
        self.state: dict[str, Any] = {}
        self.seq = 0  # the primary's last batch seq applied here
        self.synced = False  # a whole snapshot arrived since the last reset
        self._standby_log: list[Any] = []  # standby queues never emit; a sink just in case
        self.promoting = False  # refuses the stream from now on
        self.promoted = False  # the broker's own log holds the copy now
        self.dropping = False  # no longer followed: refuses the stream, then goes

    @property
    def epoch(self) -> int:
        return int(self.state.get("repl_epoch", 0))

    def open(self) -> None:
        images, state, staging, last_seq = self.store.open_and_recover()
        self.commits.resume_at(last_seq)
        self.images, self.state, self.staging = images, state, staging
        self.synced = bool(state.get("repl_synced"))
        self.seq = int(state.get("repl_seq", 0))
        self.promoting = bool(state.get("repl_promoted"))
        self.live = {name: self._build(name, img) for name, img in images.items()}

    def _build(self, name: str, img: QueueImage) -> QueueState:
        return build_queue(name, img, self._standby_log, self.b.defaults)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.commits.attach(loop)

    def close(self) -> None:
        self.commits.close()
        self.store.close()

    def jobs(self) -> int:
        return sum(len(img.jobs) for img in self.images.values())

    # ------------------------------------------------------------ commit host
    def batch_started(self, ops: list[Any]) -> None:
        # Every batch ends with the record of the primary's seq it reaches (and
        # its stream), so a restarted follower knows durably where to resume.
        if ops:
            ops.append(self.ownership_op())

    def batch_durable(self, token: Any) -> None:
        pass

    def checkpoint_blocked(self) -> bool:
        # The primary's imports in flight live only in the log (as the broker's
        # own staging does); a promotion writes the copy into the broker's log.
        return bool(self.staging) or (self.promoting and not self.promoted)

    def checkpoint_state(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any], RowSource]:
        # The images are what a replay of the log builds (their metas follow
        # every op; the standby queues share their jobs and tombstones).
        metas = {name: copy.deepcopy(img.meta) for name, img in self.images.items()}
        return metas, self._record(), self._row

    def _row(self, queue: str, jid: str) -> tuple[int, bytes | None] | None:
        from shardq.broker.engine import live_row

        return live_row(self.live, queue, jid)  # on the writer thread, as the broker's

    def ownership_op(self) -> tuple[str, None, dict[str, Any]]:
        return ("O", None, self._record())

    def _record(self) -> dict[str, Any]:
        return {"repl_epoch": self.epoch, "repl_seq": self.seq, "repl_synced": self.synced,
                "repl_promoted": self.promoted, "repl_stream": self.state.get("repl_stream")}

    # ------------------------------------------------------------ the stream
    def fence(self, epoch: int) -> None:
        """Refuse every stream older than `epoch` from now on (logged; the
        caller waits for `commits.durable()` before answering)."""
        if epoch < self.epoch:
            raise StaleTermError(f"replication epoch {epoch} of {self.primary} is older than "
                                 f"{self.epoch}")
        if epoch > self.epoch:
            self.state["repl_epoch"] = epoch
            self.commits.ops.append(self.ownership_op())
            self.commits.schedule_flush()

    def _check_open(self) -> None:
        """Refuse the stream of a replica being promoted or dropped."""
        if self.promoting:
            raise StaleTermError(f"replica of {self.primary} is being promoted")
        if self.dropping:
            raise StaleTermError(f"{self.b.config.broker_id} no longer follows {self.primary}")

    def append(self, args: dict[str, Any]) -> int:
        """Apply one REPL_APPEND in memory and log it; returns the primary's seq."""
        epoch = args.get("repl_epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise BadRequestError("repl_epoch must be an integer")
        self._check_open()
        reset = bool(args.get("reset"))
        if reset and self.synced and epoch <= self.epoch:
            # A complete copy the coordinator may count on (in sync at this
            # epoch) is never wiped at it: a primary back on an empty disk, or
            # restarted, re-syncs only after the coordinator recorded this
            # copy out of sync (a newer epoch).
            raise StaleTermError(f"the copy of {self.primary} is complete at replication "
                                 f"epoch {self.epoch}: a reset needs a newer one")
        self.fence(epoch)
        out = self.commits.ops
        chunks = args.get("chunks") or []
        if not isinstance(chunks, list):
            raise BadRequestError("chunks must be a list")
        if reset:
            self._start_over(args.get("stream"))
        if reset or chunks:
            apply_chunks_live(self.images, self.live, chunks, self._build)
            op = ("RC", None, reset, chunks)
            out.append(op)
            self._mark_dirty(chunks)
        ops = args.get("ops") or []
        if not isinstance(ops, list):
            raise BadRequestError("ops must be a list")
        if ops:
            self._apply(ops)
            out.extend(ops)
        seq = args.get("seq")
        if isinstance(seq, int) and seq > self.seq:
            self.seq = seq
        if args.get("synced") and not self.synced:
            self.synced = True
            out.append(self.ownership_op())
        if out:
            self.commits.schedule_flush()
        return self.seq

    def _start_over(self, stream: Any) -> None:
        """A snapshot begins: the copy is emptied, of `stream` from now on."""
        if self.images:  # their rows go at the next checkpoint
            self.commits.ops.append(("G", None, sorted(self.images)))
        self.images.clear()
        self.staging.clear()
        self.live.clear()
        self.synced = False
        self.state["repl_stream"] = stream if isinstance(stream, str) else None

    def _mark_dirty(self, chunks: list[Any]) -> None:
        """Snapshot chunks have no op per job: name their jobs for the checkpoint."""
        touched: dict[str, dict[str, Any]] = {}
        for ch in chunks:
            if not isinstance(ch, dict):
                continue
            ids = touched.setdefault(str(ch.get("queue")), {})
            for rec in ch.get("jobs") or ():
                ids[str(rec[0])] = None
            for t in ch.get("tombstones") or ():
                ids[str(t[0])] = None
        self.store.mark_dirty_queues([(name, ids, {}) for name, ids in touched.items() if ids])

    def resume(self, args: dict[str, Any]) -> dict[str, Any]:
        """A returning primary link asks whether this copy can go on from its
        seq: it must be complete, of the same stream (`Link.stream`) and its
        seq within the primary's tail [`from`, `to`]. If so the newer epoch is
        recorded (the caller answers once it is durable); otherwise nothing
        changes and the primary sends a snapshot."""
        epoch, lo, hi = args.get("repl_epoch"), args.get("from"), args.get("to")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, lo, hi)):
            raise BadRequestError("repl_epoch, from and to must be integers")
        assert isinstance(epoch, int) and isinstance(lo, int) and isinstance(hi, int)
        stream = args.get("stream")
        ok = (self.synced and not self.promoting and isinstance(stream, str) and bool(stream)
              and stream == self.state.get("repl_stream") and lo <= self.seq <= hi)
        if ok:
            self.fence(epoch)  # an older epoch is refused (STALE_TERM)
            self.commits.ops.append(self.ownership_op())
            self.commits.schedule_flush()
        return {"seq": self.seq, "resumed": ok}

    def _apply(self, ops: list[Any]) -> None:
        run: list[Any] = []
        for op in ops:
            if op[1] is not None:
                run.append(op)
                continue
            if run:
                apply_ops_live(self.images, self.live, run, self._build)
                run = []
            self._broker_op(op)
        if run:
            apply_ops_live(self.images, self.live, run, self._build)

    def _broker_op(self, op: list[Any]) -> None:
        code = op[0]
        if code == "O":
            return  # the primary's ownership record: logged, nothing to keep live
        arrived = list(self.staging.get(op[2], {})) if code == "I" else []
        apply_broker_op(self.images, {}, self.staging, op)
        for name in arrived:  # the primary activated an import: its queues are here now
            self.live[name] = self._build(name, self.images[name])
        if code == "G":
            for name in op[2]:
                self.live.pop(name, None)

    # ------------------------------------------------------------ promotion
    async def promote(self, slots: list[int], epoch: int) -> int:
        """Serve the replicated queues of `slots` as this broker's own, from `epoch`.

        The caller marked the slots importing (so the map does not hand them
        over empty meanwhile). Returns the number of queues adopted."""
        b = self.b
        self.promoting = True
        mid = f"failover-{self.primary}-{epoch}"
        wanted = set(slots)
        # A handoff into the primary committed (its slots are among ours) but
        # not activated before it died: its staging is the data of those slots.
        for mid, stage in list(self.staging.items()):
            if stage and all(slot_of(n) in wanted for n in stage):
                for name, img in stage.items():
                    self.images[name] = img
                    self.live[name] = self._build(name, img)
                del self.staging[mid]
        names = [n for n in self.live if slot_of(n) in wanted]
        written = 0
        for name in names:
            q, img = self.live[name], self.images[name]
            q.adopt_meta(img.meta)
            for chunk in q.export_chunks(PROMOTE_CHUNK_JOBS):
                b.log.append(("SC", None, mid, [chunk]))
                written += 1
                if written % PROMOTE_STEP_CHUNKS == 0:
                    await asyncio.sleep(0)  # the loop keeps serving the other slots
        b.log.append(("I", None, mid))
        for name in names:
            q = self.live.pop(name)
            q.log = b.log  # from now on its ops go to the broker's own log
            b.queues[name] = q
            b.adopt_tenant_window(q)
        b.slots.take(slots, epoch)
        b.log.append(b.ownership_op())
        b.mark_dirty_queues([(n, self.images[n].jobs, self.images[n].tombstones)
                             for n in names])
        b.total_jobs = sum(len(q.jobs) for q in b.queues.values())
        b.commits.schedule_flush()
        if failpoints.ACTIVE:
            failpoints.hit("broker.before_failover_activate")
        for name in names:
            b.arm(b.queues[name])
            if name in b.waiters:
                b.serve_waiters(name)
        log.warning("promoted: serving %d slots of %s at epoch %d (%d queues, %d jobs)",
                    len(slots), self.primary, epoch, len(names),
                    sum(len(b.queues[n].jobs) for n in names))
        await b.commits.durable()
        # The copy is the broker's own now. The file stays, emptied, with its
        # fence: a stream from the old primary's epoch is refused for good.
        self.promoted = True
        # (Its rows go at the replica's next checkpoint; `synced` stays, for a
        # fence sent again by a coordinator rolling this failover forward.)
        self.commits.ops.append(("G", None, sorted(self.images)))
        self.images.clear()
        self.live.clear()
        self.staging.clear()
        self.commits.ops.append(("RC", None, True, []))
        self.commits.ops.append(self.ownership_op())
        await self.commits.durable()
        if failpoints.ACTIVE:
            failpoints.hit("broker.after_failover_activate")
        return len(names)


class Followers:
    """The replicas this broker keeps, by primary id."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker
        self.replicas: dict[str, Replica] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        # "primary@epoch" -> its promotion (done or running)
        self._promotions: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._dropping: set[asyncio.Task[None]] = set()  # replicas closing once idle

    def recover(self) -> None:
        """Open every replica file of the data directory (before `start`)."""
        for path in sorted(glob.glob(replica_path(self.b.config.data_dir, "*"))):
            if path.endswith((".db-wal", ".db-shm")):
                continue
            primary = os.path.basename(path)[len("replica-"):-len(".db")]
            r = Replica(self.b, primary)
            r.open()
            self.replicas[primary] = r

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for r in self.replicas.values():
            r.attach(loop)
        self._housekeeping = loop.call_later(IDLE_CHECKPOINT_AFTER_S, self._checkpoint_when_idle)

    def _checkpoint_when_idle(self) -> None:
        """A replica that stopped receiving checkpoints what its log holds (as
        the broker does with its own; under load the commit count or age of
        the log starts one). A timer, not a task: nothing to await at close."""
        for r in list(self.replicas.values()):
            r.commits.checkpoint_if_idle()
        assert self._loop is not None
        self._housekeeping = self._loop.call_later(IDLE_CHECKPOINT_AFTER_S,
                                                   self._checkpoint_when_idle)

    def replica(self, primary: str) -> Replica:
        r = self.replicas.get(primary)
        if r is None:
            if primary == self.b.config.broker_id:
                raise BadRequestError("a broker cannot follow itself")
            r = Replica(self.b, primary)
            r.open()
            if self._loop is not None:
                r.attach(self._loop)
            self.replicas[primary] = r
        return r

    def drop(self, primary: str) -> None:
        """Forget a replica for good (this broker no longer follows that primary).

        From now on it refuses the stream; it is closed and its file deleted
        once its log is idle. Closing it at once raced the primary's stream:
        a batch logged just before would commit on the closed file, and a
        failed commit stops the whole broker (commitlog.py).
        """
        r = self.replicas.get(primary)
        if r is None or r.dropping:
            return
        r.dropping = True
        if self._loop is None:  # recovery, before the loop runs: nothing in flight
            self._remove(r)
            return
        task = self._loop.create_task(self._drop_when_idle(r), name=f"drop-replica-{primary}")
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def _drop_when_idle(self, r: Replica) -> None:
        try:
            await asyncio.wait_for(r.commits.flush_all(), DROP_FLUSH_TIMEOUT_S)
        except TimeoutError:
            log.warning("replica of %s still busy after %.0f s; dropping it anyway",
                        r.primary, DROP_FLUSH_TIMEOUT_S)
        self._remove(r)

    def _remove(self, r: Replica) -> None:
        if self.replicas.get(r.primary) is r:
            del self.replicas[r.primary]
        r.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.remove(r.path + suffix)
            except FileNotFoundError:
                pass
        log.info("dropped the replica of %s", r.primary)

    def close(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        for task in self._dropping:
            task.cancel()  # its replica closes below; the next start drops the file again
        for r in self.replicas.values():
            r.close()

    # ------------------------------------------------------------ ops
    def on_append(self, args: Any, sink: Sink, req_id: int) -> None:
        primary = _primary(args)
        r = self.replica(primary)
        body = r.resume(args) if args.get("resume") else {"seq": r.append(args)}
        frame = encode_frame([req_id, "ok", body, self.b.epoch])
        r.commits.defer_reply(sink, frame)  # after this disk has it

    async def fence(self, args: Any) -> dict[str, Any]:
        primary = _primary(args)
        epoch = args.get("repl_epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise BadRequestError("repl_epoch must be an integer")
        self.b.slots.accept_term(args.get("term"))
        if failpoints.ACTIVE:
            failpoints.hit("broker.before_failover_fence")
        r = self.replica(primary)
        r.fence(epoch)
        await r.commits.durable()
        if failpoints.ACTIVE:
            failpoints.hit("broker.after_failover_fence")
        return {"repl_epoch": r.epoch, "seq": r.seq, "synced": r.synced, "jobs": r.jobs()}

    def start_promotion(self, primary: str, slots: list[int], epoch: int
                        ) -> asyncio.Future[dict[str, Any]] | None:
        """Begin serving `primary`'s replicated `slots` at `epoch` (idempotent);
        None when this broker holds no replica of it."""
        key = f"{primary}@{epoch}"
        running = self._promotions.get(key)
        if running is not None:
            return running
        r = self.replicas.get(primary)
        slots = [s for s in slots if not self.b.owned[s]]
        if r is None or r.promoted or not slots:
            return None
        self.b.slots.begin_import(slots, f"failover-{primary}-{epoch}")
        assert self._loop is not None
        task = self._loop.create_task(self._promote(r, slots, epoch))
        self._promotions[key] = task
        return task

    async def _promote(self, r: Replica, slots: list[int], epoch: int) -> dict[str, Any]:
        queues = await r.promote(slots, epoch)
        return {"active": True, "queues": queues}

    async def promote(self, args: Any) -> dict[str, Any]:
        """REPL_PROMOTE from the coordinator, after its commit point."""
        primary = _primary(args)
        self.b.slots.accept_term(args.get("term"))
        epoch = args.get("epoch")
        slots = args.get("slots")
        if not isinstance(epoch, int) or not isinstance(slots, list) or not all(
                isinstance(s, int) and 0 <= s < len(self.b.owned) for s in slots):
            raise BadRequestError("epoch must be an integer and slots a list of slots")
        if failpoints.ACTIVE:
            failpoints.hit("broker.before_failover_promote")
        task = self.start_promotion(primary, slots, epoch)
        if task is None:
            served = all(self.b.owned[s] for s in slots)
            return {"active": served, "queues": 0}
        return await task

    # ------------------------------------------------------------ the map
    def before_topology(self, owners: list[str | None], epochs: list[int],
                        replication: dict[str, Any]) -> None:
        """A new map: start any promotion it names for this broker, before the
        map's slots are adopted (they would be adopted empty otherwise)."""
        me = self.b.config.broker_id
        for primary, rec in replication.items():
            fo = rec.get("failover") if isinstance(rec, dict) else None
            if not isinstance(fo, dict) or fo.get("to") != me or primary not in self.replicas:
                continue
            epoch = int(fo.get("epoch") or 0)
            slots = [s for s, (o, e) in enumerate(zip(owners, epochs, strict=True))
                     if o == me and e == epoch]
            if slots:
                self.start_promotion(primary, slots, epoch)

    def forget_unassigned(self, replication: dict[str, Any]) -> None:
        """Drop replicas of primaries this broker no longer follows."""
        me = self.b.config.broker_id
        for primary in list(self.replicas):
            rec = replication.get(primary)
            if not isinstance(rec, dict):
                continue
            fo = rec.get("failover")
            if isinstance(fo, dict) and fo.get("to") == me:
                continue  # being promoted here
            r = self.replicas[primary]
            if rec.get("follower") != me and (r.promoted or not r.promoting):
                self.drop(primary)

    def stats(self) -> dict[str, Any]:
        return {p: {"repl_epoch": r.epoch, "seq": r.seq, "synced": r.synced,
                    "queues": len(r.images), "jobs": r.jobs(), "log_rows": r.store.log_rows}
                for p, r in self.replicas.items()}


def _primary(args: Any) -> str:
    primary = args.get("primary") if isinstance(args, dict) else None
    if not isinstance(primary, str) or not primary:
        raise BadRequestError("primary must be a non-empty string")
    return primary
