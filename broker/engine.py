"""The broker's core: queues in memory, group commit, ownership, long polls.

Runs on one event loop. Ops mutate memory synchronously and append redo ops
to `self.log`; the writer thread commits them as one log row per group
commit. In durable mode a write's reply is held until the commit holding
its ops returned from fsync (DESIGN §3, §9.1); pulls and extensions ride
along without waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

import msgpack

from shardq.broker import tenants
from shardq.broker.acks import RecentFinishes
from shardq.broker.clock import BrokerClock
from shardq.broker.events import EventHub
from shardq.broker.flows import FlowAgent
from shardq.broker.handoff import Handoffs
from shardq.broker.limits import TenantShare
from shardq.broker.queue import QueueDefaults, QueueState
from shardq.broker.replay import Images
from shardq.broker.store import StorageFullError, Store
from shardq.errors import BusyError, MovedError, TryAgainError
from shardq.router import NUM_SLOTS, Topology, slot_of

log = logging.getLogger("shardq.broker")

CHECKPOINT_EVERY_COMMITS = 20_000
CHECKPOINT_EVERY_S = 30.0
CHECKPOINT_STEP_EVERY_S = 0.02  # under load, one checkpoint chunk per 20 ms of commits ...
CHECKPOINT_STEP_SHARE = 1 / 3  # ... and at most this share of the writer's time
FROZEN_TIMER_RETRY_MS = 10  # a due queue in a frozen slot is looked at again this much later
INLINE_COMMIT_MAX_OPS = 256  # smaller batches commit on the loop thread when the writer is idle
# A broker with no commit for this long checkpoints what its log holds
# (housekeeping), instead of waiting for the next write to come due: a bulk
# push followed by a quiet moment is written out then, not later on top of
# the next burst (measured: the checkpoint of a 333k-job push cut the
# throughput of the load that followed it by 3-5x for ~20 s at 0.3 cores).
IDLE_CHECKPOINT_AFTER_S = 1.0
# With no commit for this long, checkpoint steps run back to back instead of
# paced: a commit that arrives then waits for one step (a few ms) at most.
IDLE_UNPACED_AFTER_S = 0.1
DISK_RETRY_S = 1.0  # with the disk full, a commit is tried again this often
DISK_CHECK_S = 0.05  # adds read the free space at most this often
DISK_FACTOR = 3  # disk bytes per byte of job data (log row, checkpoint row, WAL)


def wall_ms() -> int:
    """The system wall clock in ms (tests; the broker itself uses BrokerClock)."""
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    broker_id: str
    data_dir: str
    advertise: str = ""
    durable: bool = True
    token: str | None = None
    max_jobs: int = 10_000_000
    max_memory: int = 0  # bytes of RSS; 0 = unlimited
    max_frame: int = 16 * 1024 * 1024
    max_job_data: int = 1024 * 1024
    max_connections: int = 10_000
    # Hostile connections (docs/design.md §4): HELLO must come within
    # `handshake_timeout_s`; a connection silent for `idle_timeout_s` is closed.
    handshake_timeout_s: float = 5.0
    idle_timeout_s: float = 300.0
    # Below this much free space on the data dir's filesystem, adds are
    # refused BUSY (a disk alarm, as RabbitMQ's disk_free_limit): the space
    # left lets checkpoints finish and acks go on. 0: off.
    disk_free_limit: int = 64 * 2**20
    verify: bool = False  # start with SQLite's full integrity_check (broker/integrity.py)
    salvage: bool = False  # start on a damaged file, quarantining the damaged records
    coordinator: str | None = None
    ack_journal: str | None = None  # append every accepted ack here (tests, DESIGN §9)
    weight: int = 1
    drain_on_term: bool = False
    # The control role's token (coordinator, other brokers, admin); without
    # one, the client token grants both roles, as before roles existed.
    control_token: str | None = None

    @property
    def link_token(self) -> str | None:
        """The token this broker sends to the coordinator and to other brokers."""
        return self.control_token or self.token


class Sink(Protocol):
    """Where replies go: a connection's transport."""

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...


class Waiter:
    """A long-poll PULL parked until a job arrives or its timer fires."""

    __slots__ = ("count", "done", "handle", "lock_ms", "queues", "req_id", "sink")

    def __init__(self, sink: Sink, req_id: int, queues: list[str], count: int,
                 lock_ms: int) -> None:
        self.sink = sink
        self.req_id = req_id
        self.queues = queues
        self.count = count
        self.lock_ms = lock_ms
        self.handle: asyncio.TimerHandle | None = None
        self.done = False


class Broker:
    def __init__(self, config: BrokerConfig, clock: Callable[[], int] | None = None,
                 defaults: QueueDefaults | None = None) -> None:
        self.config = config
        # Monotonic epoch ms (broker/clock.py): a wall-clock step moves no deadline.
        self.clock: Callable[[], int] = clock or BrokerClock()
        self.defaults = defaults or QueueDefaults()
        self.store = Store(os.path.join(config.data_dir, "broker.db"), durable=config.durable,
                           verify=config.verify, salvage=config.salvage)
        self.queues: dict[str, QueueState] = {}
        self.log: list[Any] = []  # the open batch, shared by every QueueState
        self.owned = bytearray(NUM_SLOTS)
        self.slot_epochs = [0] * NUM_SLOTS
        self.topology = Topology.empty()
        # `topology` as a dict (the coordinator's own, until a MOVED-time patch),
        # and whether the log already holds it: ownership records in the log
        # carry the map only when it changed (replay merges records), since a
        # 4096-slot map is ~80 KB and handoff steps write a record each.
        self._topology_dict: dict[str, Any] | None = None
        self._topology_logged = False
        self.epoch = 0
        self.term = 0
        self.waiters: dict[str, list[Waiter]] = {}
        self._pending_replies: list[tuple[Sink, bytes]] = []  # for the open batch
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._writer_busy = False
        self._flush_scheduled = False
        self._seq = 0
        self._commits_since_ckpt = 0
        self._last_ckpt = time.monotonic()
        self._ckpt_requested = False
        self._ckpt_active = False
        self._last_step = 0.0
        self._next_step_at = 0.0  # under load, no checkpoint step before this
        self._last_commit_at = time.monotonic()  # when the last batch went to the writer
        self._step_timer: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        # Queues by their next timer (delayed job, lock deadline, TTL, scheduler
        # tick, rate-limit wake): a firing visits only the queues due, not all of
        # them (a full scan of 1100 queues per firing took 13% of a broker).
        # Lazy: an entry counts only while `_armed[queue]` still names its time.
        self._due: list[tuple[int, str]] = []
        self._armed: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        self.total_jobs = 0
        self.rss = 0
        self._admitted_bytes = 0  # estimated memory of adds let in since the RSS sample
        self._admitted_before = 0  # ... and in the second before it
        self._drift_logged = 0
        # Disk full (_storage_full): ops of failed commits, not yet on disk.
        self._unsaved: list[Any] = []
        self.disk_full = False  # no commit until the retry timer
        self.disk_full_since = 0.0  # monotonic start of the episode, 0 when none
        self.disk_full_total = 0
        self.disk_low = False  # the disk alarm (_check_disk_space)
        self._disk_free = 1 << 62
        self._disk_admitted = 0
        self._disk_checked_at = 0.0
        self.handoffs: dict[str, int] = {}  # handoff results, for metrics
        self.finishes = RecentFinishes()  # tokens ACK/FAIL consumed: resends answer ok
        self.handoff = Handoffs(self)
        self.events = EventHub(self)
        self.flows = FlowAgent(self)  # run by serve(); see broker/flows.py
        self.ack_journal: TextIO | None = (
            open(config.ack_journal, "a", encoding="utf-8")  # noqa: SIM115 - lives with the broker
            if config.ack_journal else None)
        # Journal lines of the open batch, and of batches being committed: a
        # line reaches the file only once its own commit did (no false doubles).
        self.journal_lines: list[str] = []
        self._journal_batches: dict[int, list[str]] = {}
        self._asking = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._committed_seq = 0
        self._seq_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.started = time.monotonic()

    # ------------------------------------------------------------ startup
    def recover(self) -> None:
        """Rebuild memory from SQLite; serve exactly the slots persisted."""
        images, state, staging, last_seq = self.store.open_and_recover()
        self._seq = self._committed_seq = last_seq
        self._restore_ownership(state)
        self.handoff.restore(state.get("handoff", {}), staging)
        self._build_queues(images)
        self.total_jobs = sum(len(q.jobs) for q in self.queues.values())

    def _build_queues(self, images: Images) -> None:
        for name, img in images.items():
            q = QueueState(name, slot_of(name), self.log, self.defaults)
            q.restore(img.meta, img.jobs, img.tombstones)
            self.queues[name] = q
            self.adopt_tenant_window(q)

    def _restore_ownership(self, state: dict[str, Any]) -> None:
        for start, end, epoch in state.get("slots", []):
            for s in range(start, end + 1):
                self.owned[s] = 1
                self.slot_epochs[s] = epoch
        self.term = int(state.get("term", 0))
        for name, lease in (state.get("tenants") or {}).items():
            self.defaults.tenants[name] = TenantShare.from_dict(lease)
        if state.get("topology"):
            self._adopt(Topology.from_dict(state["topology"]), state["topology"])
            self.epoch = self.topology.epoch

    def bootstrap_standalone(self) -> None:
        """With no coordinator and nothing persisted, own every slot at epoch 1;
        a standalone restart keeps its slots and advertises its new address."""
        if any(self.owned):
            self._adopt(Topology.standalone(self.config.broker_id, self.config.advertise))
            self.epoch = max(self.epoch, self.topology.epoch)
            return
        self.apply_topology(Topology.standalone(self.config.broker_id,
                                                self.config.advertise).to_dict())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for q in self.queues.values():
            self._arm(q)

    # ------------------------------------------------------------ ownership
    def apply_topology(self, d: dict[str, Any]) -> None:
        """Adopt a topology from the coordinator (or the standalone one).

        A slot is taken when the topology names this broker at an epoch not
        older than ours, and given up only at a strictly newer epoch."""
        topo = Topology.from_dict(d)
        if topo.term < self.term:
            log.warning("ignoring topology from older term %d < %d", topo.term, self.term)
            return
        me = self.config.broker_id
        changed = False
        lost: dict[str, list[int]] = {}
        owned, epochs = self.owned, self.slot_epochs
        # Only slots whose ownership differs from the map's can change (a
        # comparison per slot in C; the map is applied at every epoch change).
        named = bytes([owner == me for owner in topo.slot_owners])
        for s in (i for i, (a, b) in enumerate(zip(named, owned, strict=True)) if a != b):
            owner, e = topo.slot_owners[s], topo.slot_epochs[s]
            if owner == me and e >= epochs[s]:
                # Bootstrap or forget hand slots over empty; a handoff's slots
                # wait for ACTIVATE (guarantee 4), never for the map.
                if not self.handoff.importing_slot(s):
                    owned[s], epochs[s], changed = 1, e, True
            elif owner is not None and owner != me and e > epochs[s]:
                lost.setdefault(owner, []).append(s)  # a committed handoff moved it
        self._adopt(topo, d)
        self.term = max(self.term, topo.term)
        self.epoch = topo.epoch
        for owner, slots in lost.items():
            self.handoff.give_up(slots, owner, topo.addr_of(owner) or "",
                                 max(topo.slot_epoch(s) for s in slots))
            changed = True
        self.log.append(self.ownership_op())
        self._schedule_flush()
        if changed:
            log.info("owning %d slots at epoch %d", sum(self.owned), self.epoch)

    def _adopt(self, topo: Topology, as_dict: dict[str, Any] | None = None) -> None:
        self.topology = topo
        self._topology_dict = as_dict
        self._topology_logged = False

    def topology_patched(self) -> None:
        """`self.topology` was changed in place (a handoff gave slots up)."""
        self._topology_dict = None
        self._topology_logged = False

    def ownership_state(self) -> dict[str, Any]:
        """Slots, epochs, term, topology, handoffs and leases: the whole record."""
        runs: list[list[int]] = []
        s = 0
        for (own, e), group in itertools.groupby(zip(self.owned, self.slot_epochs, strict=True)):
            n = sum(1 for _ in group)
            if own:
                runs.append([s, s + n - 1, e])
            s += n
        if self._topology_dict is None:
            self._topology_dict = self.topology.to_dict()
        return {"slots": runs, "term": self.term, "topology": self._topology_dict,
                "handoff": self.handoff.state(), "tenants": self._leases()}

    def ownership_op(self) -> tuple[str, None, dict[str, Any]]:
        """An ownership record for the log: without the map if the log has it."""
        state = self.ownership_state()
        if self._topology_logged:
            del state["topology"]
        self._topology_logged = True
        return ("O", None, state)

    def queue_for(self, name: str) -> QueueState:
        """The queue if this broker owns its slot; raises MOVED/TRYAGAIN."""
        q = self.queues.get(name)
        if q is not None:
            slot = q.slot
            if self.owned[slot] and not (self.handoff.frozen and slot in self.handoff.frozen):
                return q
        else:
            slot = slot_of(name)
            if self.owned[slot] and not (self.handoff.frozen and slot in self.handoff.frozen):
                q = self.queues[name] = QueueState(name, slot, self.log, self.defaults)
                return q
        raise self._not_owner(slot, name)

    def serves(self, q: QueueState) -> bool:
        """Owned and not frozen for a handoff."""
        return bool(self.owned[q.slot]) and q.slot not in self.handoff.frozen

    def _not_owner(self, slot: int, queue: str) -> Exception:
        if slot in self.handoff.frozen:
            # Short: a freeze lasts tens of ms, and a resend costs the broker ~µs.
            return TryAgainError(f"slot {slot} is frozen for a handoff", 5)
        owner = self.topology.owner_of_slot(slot)
        addr = self.topology.addr_of(owner) if owner else None
        if owner is None or addr is None or owner == self.config.broker_id:
            return TryAgainError(f"slot {slot} has no serving owner yet", 200)
        # A slot's MOVED names no queue: the client patches the whole slot
        # (DESIGN §4/§5; `queue` is for pinned-queue overrides only).
        return MovedError(slot, owner, addr, self.topology.slot_epoch(slot))

    def check_capacity(self, jobs: Sequence[Any] = ()) -> None:
        """BUSY when the broker is at --max-jobs, or when the memory `jobs` are
        about to take would pass --max-memory. Checked before anything is
        applied, against the last RSS sample plus what was let in since it
        (the sample is a second old; a burst must not overshoot meanwhile)."""
        cfg = self.config
        if self.total_jobs >= cfg.max_jobs:
            raise BusyError(f"broker {cfg.broker_id} is at its limit of {cfg.max_jobs} jobs", 100)
        if cfg.disk_free_limit and jobs:
            self._check_disk_for(jobs)
        if not cfg.max_memory:
            return
        if not self.rss:
            self.rss = _rss_bytes()
        adding = job_memory(jobs)
        in_use = self.rss + self._admitted_bytes + self._admitted_before
        if in_use + adding > cfg.max_memory:
            raise BusyError(
                f"broker {cfg.broker_id} is at its memory limit: ~{in_use >> 20} MiB in use, "
                f"this request needs ~{adding >> 20} MiB more, limit {cfg.max_memory >> 20} MiB",
                100)
        self._admitted_bytes += adding

    # ------------------------------------------------------------ group commit
    def defer_reply(self, sink: Sink, data: bytes) -> None:
        """Send `data` once everything logged so far is durable."""
        if self.config.durable and (self.log or self._writer_busy or self._unsaved):
            self._pending_replies.append((sink, data))
            self._schedule_flush()
        else:
            sink.write(data)

    def flush_soon(self) -> None:
        """Commit what is logged without anyone waiting on it (pulls, extends)."""
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._writer_busy:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._writer_busy or self.disk_full:
            return  # disk full: the retry timer flushes (see _storage_full)
        if not self.log and not self._unsaved:
            self._writer_idle()
            return
        ops = self._unsaved + self.log if self._unsaved else self.log[:]
        self._unsaved = []
        self.log.clear()
        if self.handoff.taps:
            self.handoff.tap_batch(ops)
        replies = self._pending_replies
        self._pending_replies = []
        # Events go out after the commit holding their ops (broker/events.py).
        marks = self.events.marks() if self.events.subs else None
        self._seq += 1
        seq = self._seq
        self._last_commit_at = time.monotonic()
        if self.journal_lines:
            self._journal_batches[seq] = self.journal_lines
            self.journal_lines = []
        self._commits_since_ckpt += 1
        start_ckpt = not self._ckpt_active and self._ckpt_due()
        if len(ops) <= INLINE_COMMIT_MAX_OPS and not self._ckpt_active and not start_ckpt:
            # A small batch and an idle writer: commit on the loop thread. This
            # skips two thread hand-offs, most of a lone client's latency
            # besides the fsync; under load batches grow and go to the writer.
            try:
                self.store.commit(seq, ops)
            except Exception as exc:
                self._after_commit(exc, replies, seq, marks, ops)
            else:
                self._after_commit(None, replies, seq, marks)
            return
        self._writer_busy = True
        assert self._loop is not None
        fut = self._loop.run_in_executor(self._writer, self.store.commit, seq, ops)
        fut.add_done_callback(
            lambda f: self._after_commit(f.exception(), replies, seq, marks, ops))
        if start_ckpt:
            self._begin_checkpoint(seq)

    def _after_commit(self, exc: BaseException | None,
                      replies: list[tuple[Sink, bytes]], seq: int,
                      marks: dict[str, int] | None = None, ops: list[Any] | None = None) -> None:
        self._writer_busy = False
        lines = self._journal_batches.pop(seq, None)
        if isinstance(exc, StorageFullError):
            self._storage_full(exc, ops or [], replies, lines)
            return
        self._committed_seq = seq
        if self.disk_full_since:
            self._storage_back()
        if lines and self.ack_journal is not None and exc is None:
            self.ack_journal.write("".join(lines))
            self.ack_journal.flush()  # before the acks are answered
        if exc is not None:
            # A failed commit means answered writes could be lost: stop now and
            # let the supervisor restart us on the data that did commit.
            log.critical("commit failed: %r; exiting", exc)
            os._exit(3)
        self._send(replies)
        if marks:
            self.events.publish(marks)
        if self._seq_waiters:
            self._wake_seq_waiters()
        if self._ckpt_active and (
                not self.log or time.monotonic() >= self._next_step_at):
            self._checkpoint_step()  # commits come first, but the checkpoint never starves
        elif self.log:
            self._schedule_flush()
        else:
            self._writer_idle()

    # ------------------------------------------------------------ disk full
    def _storage_full(self, exc: StorageFullError, ops: list[Any],
                      replies: list[tuple[Sink, bytes]], lines: list[str] | None) -> None:
        """A commit found no space. Its ops stay in memory, unsaved, and go
        first into the next commit; its replies wait for that commit. Until
        then adds are refused BUSY (server.py), acks and reads go on, and a
        commit is tried again every DISK_RETRY_S: no answered write is lost,
        and the broker resumes by itself when space returns."""
        self._unsaved = ops + self._unsaved
        self._pending_replies = replies + self._pending_replies
        if lines:
            self.journal_lines = lines + self.journal_lines
        self.disk_full = True
        if not self.disk_full_since:
            self.disk_full_since = time.monotonic()
            self.disk_full_total += 1
            log.error("disk full: %s; refusing adds, holding %d unsaved ops until space "
                      "returns (retry every %.0f s)", exc, len(self._unsaved), DISK_RETRY_S)
        else:
            log.info("disk still full: %s", exc)
        for f in self._idle_waiters:  # flush_all gives up (see there)
            if not f.done():
                f.set_result(None)
        self._idle_waiters = []
        assert self._loop is not None
        self._loop.call_later(DISK_RETRY_S, self._retry_storage)

    def _retry_storage(self) -> None:
        if self._writer_busy:
            assert self._loop is not None
            self._loop.call_later(DISK_RETRY_S, self._retry_storage)
            return
        if self._ckpt_active and not self.store.checkpointing:
            self._ckpt_active = False  # abandoned on the full disk: begun again later
            self._ckpt_requested = True
        # First win back the WAL's space (the frames of failed writes, and
        # whatever the last checkpoint left), then commit what is unsaved. No
        # checkpoint starts while the episode lasts (_ckpt_due): it would
        # spend the space on a second copy of the jobs before they are saved.
        self._writer_busy = True
        assert self._loop is not None
        fut = self._loop.run_in_executor(self._writer, self.store.reclaim_wal)
        fut.add_done_callback(self._reclaimed)

    def _reclaimed(self, fut: asyncio.Future[bool]) -> None:
        self._writer_busy = False
        self.disk_full = False
        self._schedule_flush()

    def _check_disk_for(self, jobs: Sequence[Any]) -> None:
        """The disk alarm, checked before an add is applied: free space (read
        at most every DISK_CHECK_S) minus what was let in since, at the
        space a job takes on disk (its log row, its checkpoint row and their
        WAL copies: ~3x its data)."""
        now = time.monotonic()
        if now - self._disk_checked_at >= DISK_CHECK_S:
            self._check_disk_space()
        adding = sum(DISK_FACTOR * len(j[2]) for j in jobs
                     if isinstance(j, list) and len(j) > 2 and isinstance(j[2], bytes))
        self._disk_admitted += adding
        left = self._disk_free - self._disk_admitted
        if not self.disk_low and left < self.config.disk_free_limit:
            self.disk_low = True
            self.disk_full_total += 1
            log.error("disk alarm: ~%d MiB free on %s, under --disk-free-limit %d MiB; refusing "
                      "adds", left >> 20,
                      self.config.data_dir, self.config.disk_free_limit >> 20)
        if self.disk_low:
            raise BusyError(f"broker {self.config.broker_id} cannot write: its disk is full "
                            "(adds resume by themselves when space returns)", 1000)

    def _check_disk_space(self) -> None:
        """The disk alarm: refuse adds while free space is under the limit,
        and hand the WAL's space back to the filesystem once checkpointed."""
        limit = self.config.disk_free_limit
        if not limit:
            return
        try:
            st = os.statvfs(self.config.data_dir)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        self._disk_free, self._disk_admitted = free, 0
        self._disk_checked_at = time.monotonic()
        low = free < limit
        if low != self.disk_low:
            self.disk_low = low
            if low:
                self.disk_full_total += 1
                log.error("disk alarm: %d MiB free on %s, under --disk-free-limit %d MiB; "
                          "refusing adds", free >> 20, self.config.data_dir, limit >> 20)
            else:
                log.warning("disk alarm cleared: %d MiB free; accepting adds", free >> 20)
        if low and not self._writer_busy and not self._ckpt_active and not self.log:
            self._writer.submit(self.store.reclaim_wal)

    @property
    def refusing_adds(self) -> bool:
        return self.disk_low or bool(self.disk_full_since)

    def _storage_back(self) -> None:
        log.warning("disk has space again after %.1f s; accepting adds",
                    time.monotonic() - self.disk_full_since)
        self.disk_full_since = 0.0

    def _writer_idle(self) -> None:
        """Nothing is being written: replies parked meanwhile are durable."""
        if self._pending_replies:
            self._send(self._pending_replies)
            self._pending_replies = []
        if self._ckpt_active:
            now = time.monotonic()
            wait = self._next_step_at - now
            # (flush_all waits, or nothing was committed lately: no pacing)
            if wait <= 0 or self._idle_waiters or now - self._last_commit_at > IDLE_UNPACED_AFTER_S:
                self._checkpoint_step()
            elif self._step_timer is None:
                # Paced even when idle: a commit arriving mid-step waits for
                # the whole step, so steps take at most their share of time.
                assert self._loop is not None
                self._step_timer = self._loop.call_later(wait, self._paced_step)
        else:
            self._wake_idle()

    def _paced_step(self) -> None:
        self._step_timer = None
        if self._ckpt_active and not self._writer_busy:
            if self.log:
                self._schedule_flush()  # commits first; the step follows them
            else:
                self._checkpoint_step()

    @staticmethod
    def _send(replies: list[tuple[Sink, bytes]]) -> None:
        for sink, data in replies:
            if not sink.is_closing():
                sink.write(data)

    # ------------------------------------------------------------ checkpoints
    def _ckpt_due(self) -> bool:
        if self.handoff.importing:
            return False  # staging lives in the log until activation or abort
        if self.disk_full_since:
            return False  # the log's space first (_retry_storage)
        return self._ckpt_requested or self._commits_since_ckpt >= CHECKPOINT_EVERY_COMMITS or (
            time.monotonic() - self._last_ckpt > CHECKPOINT_EVERY_S
            and self._commits_since_ckpt > 0)

    def _checkpoint_if_idle(self) -> None:
        """Start a checkpoint of the log when nothing was committed lately."""
        if (self._commits_since_ckpt == 0 or self._ckpt_active or self._ckpt_requested
                or self.disk_full_since
                or self.log or self._writer_busy or self.handoff.importing
                or time.monotonic() - self._last_commit_at < IDLE_CHECKPOINT_AFTER_S):
            return
        # A checkpoint begins right after a batch is handed to the writer;
        # an ownership record (as flush_all writes) is that batch.
        self._ckpt_requested = True
        self.log.append(self.ownership_op())
        self._schedule_flush()

    def _begin_checkpoint(self, seq: int) -> None:
        # Called right after handing batch `seq` to the writer with the open
        # batch empty, so memory now reflects exactly the ops <= seq.
        metas = {name: q.meta() for name, q in self.queues.items()}
        self._commits_since_ckpt = 0
        self._last_ckpt = time.monotonic()
        self._ckpt_requested = False
        self._ckpt_active = True
        self._writer.submit(self.store.checkpoint_begin, seq, metas, self.ownership_state(),
                            self._row_source)

    def _row_source(self, queue: str, jid: str) -> tuple[int, bytes | None] | None:
        # Runs on the writer thread; see broker/store.py for why racing reads are safe.
        return live_row(self.queues, queue, jid)

    def _checkpoint_step(self) -> None:
        self._last_step = time.monotonic()
        self._writer_busy = True
        assert self._loop is not None
        fut = self._loop.run_in_executor(self._writer, self.store.checkpoint_step)
        fut.add_done_callback(self._checkpoint_stepped)

    def _checkpoint_stepped(self, fut: asyncio.Future[bool]) -> None:
        self._writer_busy = False
        # A slow step (a big chunk, a loaded disk) waits proportionally
        # longer before the next one while commits are waiting.
        took = time.monotonic() - self._last_step
        self._next_step_at = time.monotonic() + max(
            CHECKPOINT_STEP_EVERY_S, took * (1 / CHECKPOINT_STEP_SHARE - 1))
        exc = fut.exception()
        if isinstance(exc, StorageFullError):
            self._storage_full(exc, [], [], None)
            return
        if exc is not None:
            log.critical("checkpoint failed: %r; exiting", exc)
            os._exit(3)
        if not fut.result():
            self._ckpt_active = False
        if self.log:
            self._schedule_flush()
        else:
            self._writer_idle()

    def _wake_idle(self) -> None:
        if not self._writer_busy and not self.log and self._idle_waiters:
            for f in self._idle_waiters:
                if not f.done():
                    f.set_result(None)
            self._idle_waiters = []

    async def durable(self) -> None:
        """Return once everything logged so far is committed. Unlike
        `flush_all`, this does not wait for the log to run dry, so it ends
        under any load."""
        target = self._seq + (1 if self.log else 0)
        if self._committed_seq >= target:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._seq_waiters.append((target, fut))
        self._schedule_flush()
        await fut

    def _wake_seq_waiters(self) -> None:
        keep = []
        for target, fut in self._seq_waiters:
            if target <= self._committed_seq:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._seq_waiters = keep

    async def flush_all(self, checkpoint: bool = False) -> None:
        """Wait until everything logged is committed (and checkpointed)."""
        assert self._loop is not None
        if checkpoint:
            self._ckpt_requested = True
            self._commits_since_ckpt = max(self._commits_since_ckpt, 1)
            if not self.log:
                self.log.append(self.ownership_op())
        # A checkpoint cannot start while an import is staged (its data lives
        # in the log until activation or abort): then the log is enough.
        while self.log or self._writer_busy or self._ckpt_active or (
                checkpoint and self._ckpt_requested and not self.handoff.importing):
            if self.disk_full_since:
                # Nothing unsaved was answered: stopping now loses no answered write.
                log.error("stopping with the disk full: %d ops not saved (none answered)",
                          len(self._unsaved) + len(self.log))
                return
            fut: asyncio.Future[None] = self._loop.create_future()
            self._idle_waiters.append(fut)
            self._schedule_flush()
            await fut

    def spawn(self, coro: Any) -> None:
        """Run a task the broker owns (handoff steps); kept until it ends."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def free_later(self, queues: list[QueueState]) -> None:
        """Free dropped queues' jobs a slice per loop step (see free_in_steps)."""
        if self._loop is None or not queues:
            return

        async def free() -> None:
            for q in queues:
                for _ in q.free_in_steps():
                    await asyncio.sleep(0)

        self.spawn(free())

    def mark_dirty_queues(self, queues: list[tuple[str, dict[str, Any], dict[str, int]]]
                          ) -> None:
        """Have the next checkpoint write every job of these (imported) queues."""
        self._writer.submit(self.store.mark_dirty_queues, queues)

    def close(self) -> None:
        if self.ack_journal is not None:
            self.ack_journal.close()
        self._writer.shutdown(wait=True)
        self.store.close()

    # ------------------------------------------------------------ timers
    def arm(self, q: QueueState) -> None:
        """Make sure the broker timer fires by the queue's next due time."""
        self._arm(q)

    def _arm(self, q: QueueState) -> None:
        due = q.next_timer()
        if due is not None:
            self._enlist(q.name, due)
            self._schedule_timer()

    def _enlist(self, name: str, due: int) -> None:
        if due < self._armed.get(name, due + 1):
            self._armed[name] = due
            heapq.heappush(self._due, (due, name))

    def _schedule_timer(self) -> None:
        if not self._due or self._due[0][0] >= self._timer_at:
            return
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due = self._due[0][0]
        delay = max(0.0, (due - self.clock()) / 1000.0)
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self.run_timers()

    def run_timers(self) -> None:
        """Promote due delayed jobs and expire locks in the queues that are due."""
        now = self.clock()
        frozen = self.handoff.frozen
        due_heap, armed = self._due, self._armed
        while due_heap and due_heap[0][0] <= now:
            due, name = heapq.heappop(due_heap)
            if armed.get(name) != due:
                continue  # superseded by an earlier time
            del armed[name]
            q = self.queues.get(name)
            if q is None:
                continue
            if frozen and q.slot in frozen:
                # The target takes over its timers; look again after the freeze.
                self._enlist(name, now + FROZEN_TIMER_RETRY_MS)
                continue
            moved = q.promote(now)
            stalled = q.expire_locks(now)
            q.expire_ttls(now)
            if q.schedulers:
                moved += q.fire_schedulers(now)
            if q.blocked_until and q.wake_due(now):
                moved += 1  # a rate limit freed budget: parked pulls go on
            if (moved or stalled) and q.name in self.waiters:
                self.serve_waiters(q.name)
            nxt = q.next_timer()
            if nxt is not None:
                self._enlist(name, max(nxt, now + 1))  # never due again in this pass
        self._schedule_timer()
        if self.log:
            self._schedule_flush()

    def _note_clock_drift(self) -> None:
        """Log once per new wall-clock step (broker/clock.py)."""
        if not isinstance(self.clock, BrokerClock):
            return
        drift = self.clock.drift_ms()
        if abs(drift - self._drift_logged) > 1000:
            self._drift_logged = drift
            log.warning("the wall clock is %+d ms away from the broker's monotonic clock (a "
                        "step); deadlines in memory are unaffected, persisted times follow "
                        "the wall clock at the next restart", drift)

    def housekeeping(self) -> None:
        """Once a second: job totals, RSS, tombstone expiry, a timer safety net."""
        now = self.clock()
        self.total_jobs = sum(len(q.jobs) for q in self.queues.values())
        self.rss = _rss_bytes()
        self._note_clock_drift()
        self._check_disk_space()
        # What was let in before this sample may not all show in it yet (the
        # redo batch is packed and committed after the reply): count one
        # more window of it, then trust the sample.
        self._admitted_before, self._admitted_bytes = self._admitted_bytes, 0
        for q in self.queues.values():
            if q.tombstones:
                q.expire_tombstones(now)
            due = q.next_timer()  # the safety net: every queue's timer is enlisted
            if due is not None:
                self._enlist(q.name, due)
        self.run_timers()
        self._checkpoint_if_idle()
        if self.handoff.frozen_moves and not self._asking:
            self._asking = True
            assert self._loop is not None
            task = self._loop.create_task(self._ask_targets())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ask_targets(self) -> None:
        try:
            await self.handoff.ask_targets()
        finally:
            self._asking = False

    # ------------------------------------------------------------ long polls
    def park(self, w: Waiter, wait_ms: int) -> None:
        assert self._loop is not None
        for name in w.queues:
            self.waiters.setdefault(name, []).append(w)
        w.handle = self._loop.call_later(wait_ms / 1000.0, self._expire_waiter, w)

    def _expire_waiter(self, w: Waiter, epoch: int = 0) -> None:
        """Answer a parked pull with no jobs (its wait ran out, or its queue
        moved: then `epoch` is the newer one the worker must refresh to)."""
        if w.done:
            return
        self._unpark(w)
        if not w.sink.is_closing():
            w.sink.write(_reply(w.req_id, [], max(self.epoch, epoch)))

    def _unpark(self, w: Waiter) -> None:
        w.done = True
        if w.handle is not None:
            w.handle.cancel()
        for name in w.queues:
            lst = self.waiters.get(name)
            if lst is not None:
                try:
                    lst.remove(w)
                except ValueError:
                    pass
                if not lst:
                    del self.waiters[name]

    def drop_sink(self, sink: Sink) -> None:
        """A connection closed: forget its parked pulls and subscriptions."""
        if self.events.subs:
            self.events.drop_sink(sink)
        for lst in list(self.waiters.values()):
            for w in list(lst):
                if w.sink is sink and not w.done:
                    self._unpark(w)

    def release_waiters(self, slots: set[int], epoch: int) -> None:
        """Answer parked pulls on queues of slots just given up with what they
        have (nothing), stamped with the new epoch: the worker then refreshes
        its map and pulls from the new owner instead of waiting out wait_ms
        with its slots reserved here."""
        for name in [n for n in self.waiters if slot_of(n) in slots]:
            for w in list(self.waiters.get(name, ())):
                self._expire_waiter(w, epoch)

    def serve_waiters(self, name: str) -> None:
        """Hand newly available jobs of queue `name` to parked pulls, FIFO."""
        lst = self.waiters.get(name)
        q = self.queues.get(name)
        if not lst or q is None:
            return
        now = self.clock()
        while lst and q.n_waiting and not q.paused:
            w = lst[0]
            if w.sink.is_closing():  # its EOF arrived before connection_lost ran
                self._unpark(w)
                lst = self.waiters.get(name)
                continue
            out: list[list[Any]] = []
            for qn in w.queues:
                qq = self.queues.get(qn)
                if qq is not None and self.serves(qq) and len(out) < w.count:
                    qq.pull(w.count - len(out), w.lock_ms, now, out)
            if not out:
                # Jobs wait but a limit holds them back (rate, group, tenant):
                # the waiters stay parked until the limit frees (timer, ack).
                self._arm(q)
                break
            self._unpark(w)
            for qn in w.queues:
                qq = self.queues.get(qn)
                if qq is not None:
                    self._arm(qq)
            if not w.sink.is_closing():
                w.sink.write(_reply(w.req_id, out, self.epoch))
            else:
                log.debug("parked pull's connection closed; jobs will stall and return")
            lst = self.waiters.get(name)
        self._schedule_flush()

    # ------------------------------------------------------------ tenant leases
    def _leases(self) -> dict[str, Any]:
        return {name: ts.to_dict() for name, ts in self.defaults.tenants.items()}

    def adopt_tenant_window(self, q: QueueState) -> None:
        """A queue arrived (recovery, handoff): count its recent tenant starts."""
        if q.tenant is not None:
            tenants.adopt_window(self.defaults.tenants, q)

    def apply_leases(self, leases: dict[str, Any]) -> None:
        """Tenant leases from a heartbeat answer (broker/tenants.py)."""
        tenants.apply_leases(self, leases)

    # ------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        queues = {name: {**q.counts(), **{f"{k}_total": v for k, v in q.counters.items()},
                         "p99_ms": _p99(q.durations_ms)}
                  for name, q in self.queues.items() if self.owned[q.slot]}
        return {
            "broker_id": self.config.broker_id,
            "epoch": self.epoch,
            "slots": sum(self.owned),
            "queues": queues,
            "jobs": self.total_jobs,
            "rss": self.rss or _rss_bytes(),
            "commits": self.store.commits,
            "commit_seconds": self.store.commit_seconds,
            "log_rows": self.store.log_rows,
            "durable": self.config.durable,
            "uptime_s": time.monotonic() - self.started,
            "disk_full": self.refusing_adds,
            "quarantined": len(self.store.damage.quarantined) if self.store.damage else 0,
            "disk_full_total": self.disk_full_total,
            "clock_drift_ms": self.clock.drift_ms() if isinstance(self.clock, BrokerClock) else 0,
            "tenants": tenants.demand(self),
        }


def live_row(queues: dict[str, QueueState], queue: str,
             jid: str) -> tuple[int, bytes | None] | None:
    """A job's checkpoint row from live memory: (slot, blob), (slot, None) to
    delete it, or None for an unknown queue. A tombstone is a 1-item blob."""
    q = queues.get(queue)
    if q is None:
        return None
    job = q.jobs.get(jid)
    if job is not None:
        return q.slot, msgpack.packb(job.to_record(), use_bin_type=True)
    ts = q.tombstones.get(jid)
    if ts is not None:
        return q.slot, msgpack.packb([ts])
    return q.slot, None


def _reply(req_id: int, body: Any, epoch: int) -> bytes:
    from shardq.codec import encode_frame

    return encode_frame([req_id, "ok", body, epoch])


def _p99(samples: Any) -> int | None:
    """p99 of a queue's recent start-to-ack durations (a sliding sample)."""
    if not samples:
        return None
    ordered = sorted(samples)
    return int(ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)])


# RSS per job beyond its data, and per byte of data, on the generous side:
# measured, a job took ~1 KB with no data and ~3.4 KB with 1 KB of it added
# one frame at a time, ~5.4 KB with four connections adding 5 MB frames at
# once (the redo batch, its packed log row and allocator arenas of the
# writer thread). Over-estimating only matters until the next RSS sample
# (a second later), which replaces the estimate with what is really in use.
JOB_OVERHEAD_BYTES = 1536
DATA_FACTOR = 4


def job_memory(jobs: Sequence[Any]) -> int:
    """Estimated bytes of RSS that adding `jobs` ([id, name, data, opts] items) takes."""
    total = 0
    for item in jobs:
        data = item[2] if isinstance(item, list) and len(item) > 2 else None
        total += JOB_OVERHEAD_BYTES + (DATA_FACTOR * len(data) if isinstance(data, bytes) else 0)
    return total


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
