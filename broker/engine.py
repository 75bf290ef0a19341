"""The broker's core: queues in memory, group commit, ownership, long polls.

Runs on one event loop. Ops mutate memory synchronously and append redo ops
to `self.log`; the writer thread commits them as one log row per group
commit. In durable mode a write's reply is held until the commit holding
its ops returned from fsync (docs/design.md §3, §9.1); pulls and extensions ride
along without waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from shardq.broker import replies, tenants
from shardq.broker.acks import RecentFinishes
from shardq.broker.clock import BrokerClock
from shardq.broker.commitlog import CommitLog, Sink
from shardq.broker.events import EventHub
from shardq.broker.flows import FlowAgent
from shardq.broker.handoff import Handoffs
from shardq.broker.limits import TenantShare
from shardq.broker.ownership import SlotTable
from shardq.broker.peers import Peers
from shardq.broker.queue import QueueDefaults, QueueState
from shardq.broker.replay import Images
from shardq.broker.replica import Replication
from shardq.broker.store import RowSource, Store
from shardq.broker.tombstones import trim_oldest
from shardq.errors import BusyError, MovedError, OwnerUnavailableError, TryAgainError
from shardq.router import BrokerInfo, BrokerState, Topology, slot_of

log = logging.getLogger("shardq.broker")

FROZEN_TIMER_RETRY_MS = 10  # a due queue in a frozen slot is looked at again this much later
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
    ack_journal: str | None = None  # append every accepted ack here (tests, docs/design.md §9)
    weight: int = 1
    # A failure-domain label (rack, zone): the coordinator places this broker's
    # follower on another zone when it can (docs/design.md §12).
    zone: str | None = None
    drain_on_term: bool = False
    # The control role's token (coordinator, other brokers, admin); without
    # one, the client token grants both roles, as before roles existed.
    control_token: str | None = None

    @property
    def link_token(self) -> str | None:
        """The token this broker sends to the coordinator and to other brokers."""
        return self.control_token or self.token


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
        self.commits = CommitLog(self.store, self, config.durable, config.ack_journal)
        self.queues: dict[str, QueueState] = {}
        self.log = self.commits.ops  # the open batch, shared by every QueueState
        # Slots, epochs, freezes, imports, term: changed only through its methods;
        # `owned` and `slot_epochs` are read-only views of it for the hot path.
        self.slots = SlotTable()
        self.owned = self.slots.owned
        self.slot_epochs = self.slots.epochs
        self.topology = Topology.empty()
        # `topology` as a dict (the coordinator's own, until a MOVED-time patch),
        # and whether the log already holds it: ownership records in the log
        # carry the map only when it changed (replay merges records), since a
        # 4096-slot map is ~80 KB and handoff steps write a record each.
        self._topology_dict: dict[str, Any] | None = None
        self._topology_logged = False
        self.epoch = 0
        self.storage_id = ""  # this data directory's identity (set by recover)
        # Why the map's slots for this broker are not adopted (its storage
        # identity is not the one they are owned under), or None.
        self.held: str | None = None
        self.waiters: dict[str, list[Waiter]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        # Queues by their next timer (delayed job, lock deadline, TTL, scheduler
        # tick, rate-limit wake): a firing visits only the queues due, not all of
        # them (a full scan of 1100 queues per firing took 13% of a broker).
        # Lazy: an entry counts only while `_armed[queue]` still names its time.
        self._due: list[tuple[int, str]] = []
        self._armed: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.total_jobs = 0
        self.rss = 0
        self._admitted_bytes = 0  # estimated memory of adds let in since the RSS sample
        self._admitted_before = 0  # ... and in the second before it
        self._drift_logged = 0
        self.disk_low = False  # the disk alarm (_check_disk_space)
        self._disk_free = 1 << 62
        self._disk_admitted = 0
        self._disk_checked_at = 0.0
        self.handoffs: dict[str, int] = {}  # handoff results, for metrics
        self.finishes = RecentFinishes()  # tokens ACK/FAIL consumed: resends answer ok
        self.handoff = Handoffs(self)
        self.events = EventHub(self)
        self.flows = FlowAgent(self)  # run by serve(); see broker/flows.py
        self.peers = Peers(config.broker_id, config.link_token)  # links to other brokers
        # Its follower link and the replicas it keeps (docs/design.md §12).
        self.replication = Replication(self)
        self._asking = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started = time.monotonic()

    # ------------------------------------------------------------ startup
    def recover(self) -> None:
        """Rebuild memory from SQLite; serve exactly the slots persisted."""
        images, state, staging, last_seq = self.store.open_and_recover()
        self.storage_id = self.store.claim_identity(self.config.broker_id)
        self.commits.resume_at(last_seq)
        self._restore_ownership(state)
        self.handoff.restore(state.get("handoff", {}), staging)
        self._build_queues(images)
        self.total_jobs = sum(len(q.jobs) for q in self.queues.values())
        self.replication.followers.recover()

    def _build_queues(self, images: Images) -> None:
        for name, img in images.items():
            q = QueueState(name, slot_of(name), self.log, self.defaults)
            q.restore(img.meta, img.jobs, img.tombstones)
            self.queues[name] = q
            self.adopt_tenant_window(q)

    @property
    def term(self) -> int:
        """The coordinator term this broker accepted last."""
        return self.slots.term

    def _restore_ownership(self, state: dict[str, Any]) -> None:
        self.slots.restore(state.get("slots", []), int(state.get("term", 0)))
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
        self.commits.attach(loop)
        self.replication.followers.start(loop)
        self.replication.resume()
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
        owned, epochs, slots = self.owned, self.slot_epochs, self.slots
        self._set_held(_held_reason(topo.brokers.get(me), self.storage_id))
        # Slots the map names for us are ours only under our storage identity
        # and from the epoch it was recorded at: older ones were owned by a
        # data directory we are not (docs/design.md §5, storage identity).
        since = -1 if self.held else _since(topo.brokers.get(me))
        if "replication" in d:  # a failover may hand us slots from a replica
            self.replication.followers.before_topology(topo.slot_owners, topo.slot_epochs,
                                                       d["replication"] or {})
        # Only slots whose ownership differs from the map's can change (a
        # comparison per slot in C; the map is applied at every epoch change).
        named = bytes([owner == me for owner in topo.slot_owners])
        for s in (i for i, (a, b) in enumerate(zip(named, owned, strict=True)) if a != b):
            owner, e = topo.slot_owners[s], topo.slot_epochs[s]
            if owner == me and e >= epochs[s] and e >= since >= 0:
                # Bootstrap or forget hand slots over empty; a handoff's slots
                # wait for ACTIVATE (guarantee 4), never for the map.
                if s not in slots.importing:
                    slots.adopt(s, e)
                    changed = True
            elif owner is not None and owner != me and e > epochs[s]:
                lost.setdefault(owner, []).append(s)  # a committed handoff moved it
        self._adopt(topo, d)
        slots.accept_term(topo.term)
        self.epoch = topo.epoch
        for owner, gone in lost.items():
            self.handoff.give_up(gone, owner, topo.addr_of(owner) or "",
                                 max(topo.slot_epoch(s) for s in gone))
            changed = True
        self.log.append(self.ownership_op())
        self.commits.schedule_flush()
        if changed:
            log.info("owning %d slots at epoch %d", sum(self.owned), self.epoch)
        if "replication" in d:
            self.replication.on_topology(d)

    def _set_held(self, reason: str | None) -> None:
        if reason != self.held:
            if reason:
                log.warning("not serving the slots the coordinator's map gives broker %s: %s",
                            self.config.broker_id, reason)
            elif self.held:
                log.warning("broker %s: storage identity accepted again; serving the map's "
                            "slots", self.config.broker_id)
            self.held = reason

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
        if self._topology_dict is None:
            self._topology_dict = self.topology.to_dict()
        return {"slots": self.slots.runs(), "term": self.slots.term,
                "topology": self._topology_dict, "handoff": self.handoff.state(),
                "tenants": self._leases()}

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
            if self.owned[slot] and not (self.slots.frozen and slot in self.slots.frozen):
                return q
        else:
            slot = slot_of(name)
            if self.owned[slot] and not (self.slots.frozen and slot in self.slots.frozen):
                q = self.queues[name] = QueueState(name, slot, self.log, self.defaults)
                return q
        raise self._not_owner(slot, name)

    def serves(self, q: QueueState) -> bool:
        """Owned and not frozen for a handoff."""
        return self.slots.serves(q.slot)

    def _not_owner(self, slot: int, queue: str) -> Exception:
        if slot in self.slots.frozen:
            # Short: a freeze lasts tens of ms, and a resend costs the broker ~µs.
            return TryAgainError(f"slot {slot} is frozen for a handoff", 5)
        owner = self.topology.owner_of_slot(slot)
        addr = self.topology.addr_of(owner) if owner else None
        if owner == self.config.broker_id and self.held:
            return OwnerUnavailableError(f"broker {owner} cannot serve slot {slot}: {self.held}")
        if owner is None or addr is None or owner == self.config.broker_id:
            return TryAgainError(f"slot {slot} has no serving owner yet", 200)
        # A slot's MOVED names no queue: the client patches the whole slot
        # (docs/design.md §4/§5; `queue` is for pinned-queue overrides only).
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

    # ------------------------------------------------------------ commit host
    def batch_started(self, ops: list[Any]) -> dict[str, int] | None:
        """A batch leaves for the store: handoff taps see it; events are marked
        to go out after the commit holding their ops (broker/events.py)."""
        if self.handoff.taps:
            self.handoff.tap_batch(ops)
        return self.events.marks() if self.events.subs else None

    def batch_durable(self, marks: dict[str, int] | None) -> None:
        if marks:
            self.events.publish(marks)

    def checkpoint_blocked(self) -> bool:
        return bool(self.handoff.importing)

    def checkpoint_state(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any], RowSource]:
        metas = {name: q.meta() for name, q in self.queues.items()}
        return metas, self.ownership_state(), self._row_source

    # ------------------------------------------------------------ disk alarm
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
            self.commits.disk_full_total += 1
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
                self.commits.disk_full_total += 1
                log.error("disk alarm: %d MiB free on %s, under --disk-free-limit %d MiB; "
                          "refusing adds", free >> 20, self.config.data_dir, limit >> 20)
            else:
                log.warning("disk alarm cleared: %d MiB free; accepting adds", free >> 20)
        if low:
            self.commits.reclaim_when_idle()

    @property
    def refusing_adds(self) -> bool:
        return self.disk_low or bool(self.commits.disk_full_since)

    def _row_source(self, queue: str, jid: str) -> tuple[int, bytes | None] | None:
        # Runs on the writer thread; see broker/store.py for why racing reads are safe.
        return live_row(self.queues, queue, jid)

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
        self.commits.on_writer(self.store.mark_dirty_queues, queues)

    def close(self) -> None:
        self.commits.close()
        self.store.close()
        self.replication.followers.close()

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
        frozen = self.slots.frozen
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
            self.commits.schedule_flush()

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
        """Once a second: job totals, RSS, tombstone expiry and bound, a timer safety net."""
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
        trim_oldest(self.queues.values(), self.defaults.max_tombstones)
        self.run_timers()
        self.commits.checkpoint_if_idle()
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
        self.commits.schedule_flush()

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
            "disk_full_total": self.commits.disk_full_total,
            "clock_drift_ms": self.clock.drift_ms() if isinstance(self.clock, BrokerClock) else 0,
            "tenants": tenants.demand(self),
            **({"replication": self.replication.stats()} if self.replication.active else {}),
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
        return q.slot, _row_packer().pack(job.to_record())
    ts = q.tombstones.get(jid)
    if ts is not None:
        return q.slot, msgpack.packb([ts])
    return q.slot, None


_packers = threading.local()


def _row_packer() -> msgpack.Packer:
    """This thread's Packer: `packb` builds a new one (and its buffer) per
    call, a third of a checkpoint row's packing time."""
    p: msgpack.Packer | None = getattr(_packers, "p", None)
    if p is None:
        p = _packers.p = msgpack.Packer(use_bin_type=True)
    return p


def _reply(req_id: int, body: Any, epoch: int) -> bytes:
    return replies.frame(req_id, body, epoch)


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


def _held_reason(me: BrokerInfo | None, storage_id: str) -> str | None:
    """Why this broker must not adopt the map's slots for it, if it must not."""
    if me is None:
        return None
    if me.state is BrokerState.LOST_STORAGE or (me.storage and me.storage != storage_id):
        return (f"its slots are owned under storage {me.storage or '?'} but this data "
                f"directory is storage {storage_id}: the jobs are not on this disk (lost or "
                "replaced). Restore that data directory, or run `shardq forget "
                f"{me.id} --accept-data-loss` to serve the slots again, empty")
    return None


def _since(me: BrokerInfo | None) -> int:
    """The first epoch at which the map's slots can be ours (0: any)."""
    return me.since if me is not None and me.storage is not None else 0
