"""The primary's half of replication (docs/design.md §12): the follower link.

The coordinator's map names, per primary, `{follower, in_sync, repl_epoch}`
(`replication` in the topology). A `Link` to the named follower:

1. connects and sends a snapshot (REPL_APPEND `reset` with every queue's
   meta, taken in one loop step with the point in the open batch where the
   stream starts; then the jobs in chunks, read while the broker serves),
   and from that same step ships every group-commit batch as it leaves for
   the local disk (`ship`, called by broker/commitlog.py). Ops carry absolute
   values (docs/design.md §3.1), so the stream replayed over the fuzzy
   snapshot converges, as in a handoff's copy (§6);
2. sends `synced`, and from that instant gates replies: a write is answered
   only when its batch is on both disks (`gating`, `acked`);
3. asks the coordinator to record the follower in sync (compare-and-set on
   `repl_epoch`).

Before step 2 the coordinator records the follower out of sync, so answering
alone is allowed. When the follower stops answering (connection lost, or an
ack overdue by `ACK_TIMEOUT_S`) while gating, the held replies stay held
until the coordinator durably recorded the follower out of sync at a new
epoch; if the coordinator cannot be reached, or answers that a failover
fenced this primary, they are never sent: the write is refused, never
answered alone. Then the link starts over at step 1.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from typing import TYPE_CHECKING, Any

import httpx

from shardq import coordinator_http
from shardq import protocol as p
from shardq.broker.handoff import _jobs_by_order
from shardq.errors import ShardqError, StaleTermError

if TYPE_CHECKING:
    from shardq.broker.engine import Broker

log = logging.getLogger("shardq.broker.replica")

FENCED = "fenced"  # the freeze a fenced primary puts on its slots
FOLLOW_MAP_S = 30.0
ACK_TIMEOUT_S = 5.0  # a follower that has not acked a batch this long is lost
SNAPSHOT_CHUNK_JOBS = 1000
SNAPSHOT_WINDOW = 8  # snapshot frames in flight
RETRY_S = 0.5
COORDINATOR_TIMEOUT_S = 2.0
# Ops of the last shipped batches kept in memory, so that a follower that
# comes back (restarted, or its connection lost) resumes from its last seq
# instead of taking a whole snapshot again (docs/design.md §12).
TAIL_MAX_OPS = 200_000


class Link:
    """Ships this broker's log to its follower, and gates replies on its acks."""

    def __init__(self, broker: Broker, follower: str, repl_epoch: int,
                 in_sync: bool = False, stream: str = "") -> None:
        self.b = broker
        self.follower = follower
        self.repl_epoch = repl_epoch
        # This process's stream: seqs name the same batches only within it (a
        # restarted primary may reuse a seq for other ops), so a follower
        # resumes only a copy it got from the same stream.
        self.stream = stream
        # (seq, ops) of every batch shipped since the link began, bounded, for a
        # resume; `_unconfirmed`: those not yet on our own disk (a disk-full
        # retry carries their ops again, which the follower already has).
        self._tail: collections.deque[tuple[int, list[Any]]] = collections.deque()
        self._tail_ops = 0
        self._resuming = False  # the tail is not trimmed while a resume is asked
        self._unconfirmed: collections.deque[tuple[int, list[Any]]] = collections.deque()
        self.snapshots = 0  # full snapshots sent
        self.resumes = 0  # returns of the follower served from the tail
        # Recorded in sync (a restart): not one reply alone until the follower
        # is complete again or the coordinator records it out of sync.
        self.gating = in_sync
        self.acked = 0  # the last seq on the follower's disk, once its copy is complete
        self._complete = False
        self._follower_seq = 0
        self.shipped = 0  # the last batch seq shipped
        self.in_sync = False
        self.state = "connecting"  # connecting, syncing, streaming, lost, fenced, closed
        self._conn: Any = None
        self._streaming = False
        self._skip = 0
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self.lost_count = 0
        self._last_error: BaseException | None = None
        if in_sync:
            broker.commits.repl = self

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def fence(self) -> None:
        """A failover promoted our follower: never answer a held write.

        Its slots are frozen here (TRYAGAIN, so clients resend instead of
        waiting), connections with held replies are closed (their clients
        resend to the new owner: adds are idempotent by job id, and a write
        the follower had stays there), and the new map is fetched at once."""
        if self.state == "fenced":
            return
        log.critical("replication of %s was fenced (its follower %s was promoted): "
                     "answering no more writes", self.b.config.broker_id, self.follower)
        self.state = "fenced"
        self._streaming = False
        self.gating = True
        self.acked = -1  # nothing is released any more
        self._lost.set()
        b = self.b
        mine = [s for s in range(len(b.owned)) if b.owned[s] and s not in b.slots.frozen]
        if mine:
            b.slots.freeze(mine, FENCED)
        b.commits.drop_held()
        b.spawn(self._follow_map())

    async def _follow_map(self) -> None:
        """Poll the coordinator's map until it gives our slots away (a failover
        commits within ms of the fence), so clients are redirected at once."""
        cfg = self.b.config
        if not cfg.coordinator:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FOLLOW_MAP_S
        async with coordinator_http.async_client(cfg.coordinator, cfg.link_token,
                                                 timeout_s=COORDINATOR_TIMEOUT_S) as http:
            while loop.time() < deadline and self.b.slots.frozen_by(FENCED):
                try:
                    r = await http.get("/topology")
                    d = r.json()
                    if isinstance(d, dict) and int(d.get("epoch", 0)) > self.b.epoch:
                        self.b.apply_topology(d)
                except (httpx.HTTPError, ValueError) as exc:
                    log.debug("map after the fence: %r", exc)
                await asyncio.sleep(0.05)

    async def close(self, release: bool = False) -> None:
        """Stop shipping (the map names another follower, or none); with
        `release`, the coordinator recorded the follower out of sync, so
        held replies go out."""
        if self.state == "fenced":
            if any(self.b.owned):
                return  # still holding slots: stays fenced until they are given away
            self.b.commits.drop_held()
            release = True
        self.state = "closed"
        self._streaming = False
        if release:
            self.gating = False
        if self.b.commits.repl is self and not self.gating:
            self.b.commits.repl = None
            self.b.commits.release()
        if self._task is not None:
            self._task.cancel()
        if self._conn is not None:
            await self._conn.aclose()

    @property
    def lag_ops(self) -> int:
        """Batches shipped and not yet acknowledged."""
        return max(0, self.shipped - self.acked) if self._streaming else -1

    # ------------------------------------------------------------ the hot path
    def ship(self, seq: int, ops: list[Any]) -> None:
        ops = self._new_ops(seq, ops)
        self._keep(seq, ops)
        if not self._streaming:
            return
        if self._skip:
            ops, self._skip = ops[self._skip:], 0
        fut = self._conn.request(p.REPL_APPEND, {"primary": self.b.config.broker_id,
                                                 "repl_epoch": self.repl_epoch, "seq": seq,
                                                 "ops": ops}, timeout=ACK_TIMEOUT_S)
        self.shipped = seq
        fut.add_done_callback(self._acked)

    def _new_ops(self, seq: int, ops: list[Any]) -> list[Any]:
        """`ops` less the ones already shipped: a batch that found our disk
        full goes again at the head of the next one (broker/commitlog.py), and
        the follower must not apply it twice (its counters would count twice)."""
        pend = self._unconfirmed
        committed = self.b.commits.committed_seq
        while pend and pend[0][0] <= committed:
            pend.popleft()
        raw = ops
        if pend and ops:
            seen = {id(op) for _, batch in pend for op in batch}  # held: ids stay unique
            n = 0
            while n < len(ops) and id(ops[n]) in seen:
                n += 1
            ops = ops[n:] if n else ops
        pend.append((seq, raw))
        return ops

    def _keep(self, seq: int, ops: list[Any]) -> None:
        tail = self._tail
        tail.append((seq, ops))
        self._tail_ops += len(ops)
        while not self._resuming and len(tail) > 1 and self._tail_ops > TAIL_MAX_OPS:
            self._tail_ops -= len(tail.popleft()[1])

    def _acked(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self._fail(exc)
            return
        body = fut.result()
        seq = body.get("seq") if isinstance(body, dict) else None
        if isinstance(seq, int) and seq > self._follower_seq:
            self._follower_seq = seq
            if self._complete and seq > self.acked:
                self.acked = seq
                if self.gating:
                    self.b.commits.release()

    def _fail(self, exc: BaseException) -> None:
        self._last_error = exc
        if self._streaming:
            self._streaming = False
            log.warning("follower %s lost (%r); %s", self.follower, exc,
                        "holding replies until the coordinator marks it out of sync"
                        if self.gating else "answering alone (it was not in sync)")
        self._lost.set()

    # ------------------------------------------------------------ the loop
    async def _run(self) -> None:
        while self.state not in ("closed", "fenced"):
            try:
                await self._sync()
                await self._lost.wait()
            except (OSError, ShardqError, TimeoutError) as exc:
                self._fail(exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replication link to %s failed", self.follower)
                self._fail(RuntimeError("link failed"))
            self.lost_count += 1
            self._streaming = False
            self.state = "lost"
            if self._conn is not None:
                await self._conn.aclose()
                self._conn = None
            if self.gating or self.in_sync or isinstance(self._last_error, StaleTermError):
                # (Refused at this epoch: the follower's copy must be recorded
                # out of sync, at a newer epoch, before it may start over.)
                await self._mark_out_of_sync()
            await asyncio.sleep(RETRY_S)

    async def _sync(self) -> None:
        """Connect, snapshot, stream; returns once in sync (or raises)."""
        from shardq.client.connection import open_connection

        b = self.b
        addr = b.topology.addr_of(self.follower)
        if addr is None:
            raise OSError(f"follower {self.follower} has no address in the map")
        self._lost.clear()
        self.state = "connecting"
        self._conn = await open_connection(addr, token=b.config.link_token,
                                           client_name=f"replica-of-{b.config.broker_id}",
                                           request_timeout=30)
        self.state = "syncing"
        me = b.config.broker_id
        if not await self._resume():
            await self._snapshot()
        # From this instant a reply waits for the follower's disk too.
        self.gating = True
        marker = b.commits.seq
        await self._conn.request(p.REPL_APPEND, {"primary": me, "repl_epoch": self.repl_epoch,
                                                 "synced": True, "seq": marker})
        self._complete = True
        self.acked = max(self.acked, marker, self._follower_seq)
        b.commits.release()
        self.state = "streaming"
        await self._mark_in_sync()

    async def _resume(self) -> bool:
        """Ship the follower what it lacks from the tail, if its copy is
        complete, from this stream, and its seq is within the tail; then the
        stream goes on from there. False: it needs a snapshot (nothing changed
        on its side)."""
        b = self.b
        tail = self._tail
        if not tail or not self.stream or tail[-1][0] != b.commits.seq:
            return False  # (batches went unrecorded: no link then)
        self._resuming = True
        try:
            answer = await self._conn.request(p.REPL_APPEND, {
                "primary": b.config.broker_id, "repl_epoch": self.repl_epoch, "resume": True,
                "stream": self.stream, "from": tail[0][0] - 1, "to": tail[-1][0]})
        finally:
            self._resuming = False
        fseq = answer.get("seq") if isinstance(answer, dict) and answer.get("resumed") else None
        if not isinstance(fseq, int) or isinstance(fseq, bool):
            return False
        # One loop step: the tail after the follower's seq, then the live stream.
        # (Batches shipped during the await above were kept in the tail.)
        me = b.config.broker_id
        for seq, ops in list(tail):
            if seq > fseq:
                fut = self._conn.request(p.REPL_APPEND, {"primary": me,
                                                         "repl_epoch": self.repl_epoch,
                                                         "seq": seq, "ops": ops},
                                         timeout=ACK_TIMEOUT_S)
                fut.add_done_callback(self._acked)
        self._skip = 0
        self._complete = False
        self.shipped = b.commits.seq
        self._follower_seq = fseq
        b.commits.repl = self
        self._streaming = True
        self.resumes += 1
        log.info("follower %s resumes from seq %d (%d batches from the tail)", self.follower,
                 fseq, b.commits.seq - fseq)
        return True

    async def _snapshot(self) -> None:
        """Start the follower's copy over: every queue's meta and the stream's
        starting point in one loop step, then the jobs in chunks."""
        b = self.b
        me = b.config.broker_id
        self.snapshots += 1
        # One loop step: the metas, the stream's starting point, the first ship.
        queues = list(b.queues.values())
        metas = [{"v": 1, "kind": "meta", "queue": q.name, "meta": q.meta()} for q in queues]
        first = self._conn.request(p.REPL_APPEND, {"primary": me, "repl_epoch": self.repl_epoch,
                                                   "reset": True, "chunks": metas,
                                                   "seq": b.commits.seq, "stream": self.stream})
        self._skip = len(b.log)
        self._complete = False
        self.shipped = self._follower_seq = b.commits.seq
        b.commits.repl = self
        self._streaming = True
        await first
        window: list[asyncio.Future[Any]] = []
        for q in queues:
            jobs = await _jobs_by_order(q)
            for chunk in q.export_chunks(SNAPSHOT_CHUNK_JOBS, jobs):
                if chunk["kind"] == "meta" or not self._streaming:
                    continue
                window.append(self._conn.request(
                    p.REPL_APPEND, {"primary": me, "repl_epoch": self.repl_epoch,
                                    "chunks": [chunk]}))
                if len(window) >= SNAPSHOT_WINDOW:
                    await window.pop(0)
            await asyncio.sleep(0)
        for fut in window:
            await fut
        if not self._streaming:
            raise OSError("the follower went away during the snapshot")

    # ------------------------------------------------------------ coordinator
    async def _coordinator(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST to the coordinator; None when it cannot be reached."""
        cfg = self.b.config
        if not cfg.coordinator:
            return None
        try:
            async with coordinator_http.async_client(cfg.coordinator, cfg.link_token,
                                                     timeout_s=COORDINATOR_TIMEOUT_S) as http:
                r = await http.post(path, json=body)
        except httpx.HTTPError as exc:
            log.warning("coordinator unreachable for %s: %r", path, exc)
            return None
        answer = r.json() if r.headers.get("content-type", "").startswith(
            "application/json") else {}
        return answer if isinstance(answer, dict) else {}

    def _body(self) -> dict[str, Any]:
        return {"primary": self.b.config.broker_id, "follower": self.follower,
                "repl_epoch": self.repl_epoch}

    async def _mark_in_sync(self) -> None:
        answer = await self._coordinator("/replication/in-sync", self._body())
        if answer and answer.get("in_sync") and answer.get("follower") == self.follower:
            self.in_sync = True
            log.info("follower %s in sync at replication epoch %d", self.follower,
                     self.repl_epoch)
        # Otherwise stay gating: answering after both disks is always allowed.

    async def _mark_out_of_sync(self) -> None:
        """Until the coordinator durably recorded the follower out of sync, the
        held replies stay held; a fenced primary never sends them."""
        while self.state != "closed":
            answer = await self._coordinator("/replication/out-of-sync", self._body())
            if answer is not None and answer.get("fenced"):
                self.fence()
                return
            if answer is not None and "repl_epoch" in answer and not answer.get("in_sync"):
                self.repl_epoch = int(answer["repl_epoch"])
                self.in_sync = False
                self.gating = False
                self.b.commits.release()
                log.warning("follower %s marked out of sync (epoch %d): answering alone, "
                            "degraded", self.follower, self.repl_epoch)
                return
            await asyncio.sleep(RETRY_S)

    def stats(self) -> dict[str, Any]:
        return {"follower": self.follower, "repl_epoch": self.repl_epoch, "state": self.state,
                "in_sync": self.in_sync, "gating": self.gating, "lag_ops": self.lag_ops,
                "held": self.b.commits.held_replies, "snapshots": self.snapshots,
                "resumes": self.resumes, "tail_batches": len(self._tail)}


class Replication:
    """This broker's replication: its follower link and the replicas it keeps."""

    def __init__(self, broker: Broker) -> None:
        from shardq.broker.follower import Followers

        self.b = broker
        self.followers = Followers(broker)
        self.link: Link | None = None
        self.stream = uuid.uuid4().hex  # see Link.stream

    def on_topology(self, d: dict[str, Any]) -> None:
        """The coordinator's map; its `replication` section names our follower."""
        section = d.get("replication")
        if not isinstance(section, dict):
            return
        me = self.b.config.broker_id
        self.followers.forget_unassigned(section)
        rec = section.get(me)
        rec = rec if isinstance(rec, dict) else {}
        follower = rec.get("follower") or None
        epoch = int(rec.get("repl_epoch") or 0)
        in_sync = bool(rec.get("in_sync"))
        fenced = isinstance(rec.get("failover"), dict)
        link = self.link
        if link is not None:
            if fenced or link.repl_epoch < int(rec.get("fenced_below") or 0):
                link.fence()  # held replies are never sent
                if any(self.b.owned):
                    return  # until the map gives our slots away
                self.b.spawn(link.close())
                self.link = link = None
            elif link.follower == follower and epoch <= link.repl_epoch:
                return  # nothing new (or our own compare-and-set, already adopted)
            elif link.follower == follower and in_sync:
                link.repl_epoch = epoch
                return
            else:
                # The coordinator durably recorded the follower out of sync (or
                # replaced it): replies need not wait for the old one any more.
                self.b.spawn(link.close(release=not in_sync))
                self.link = link = None
        if isinstance(follower, str) and follower != me and not fenced and not self.b.held:
            # (A held broker, back on another disk, has nothing to replicate.)
            self.link = Link(self.b, follower, epoch, stream=self.stream)
            self.link.start()

    def resume(self) -> None:
        """At start, from the map persisted with the data: a follower recorded in
        sync keeps replies waiting from the first write on (not one answered
        alone while the coordinator counts on that follower)."""
        d = self.b.ownership_state().get("topology") or {}
        rec = (d.get("replication") or {}).get(self.b.config.broker_id)
        if not isinstance(rec, dict) or isinstance(rec.get("failover"), dict):
            return
        follower = rec.get("follower")
        if isinstance(follower, str) and follower != self.b.config.broker_id:
            self.link = Link(self.b, follower, int(rec.get("repl_epoch") or 0),
                             in_sync=bool(rec.get("in_sync")), stream=self.stream)
            self.link.start()

    @property
    def active(self) -> bool:
        return self.link is not None or bool(self.followers.replicas)

    def stats(self) -> dict[str, Any]:
        return {"link": self.link.stats() if self.link is not None else None,
                "replicas": self.followers.stats()}
