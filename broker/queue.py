"""One queue's state machine: plain Python, no I/O, time passed in (`now` ms).

Every mutation appends one redo op to `log` (a list shared with the broker's
open group-commit batch). Ops carry absolute values, never increments of job
fields, so replaying them over any newer copy of a job converges on the same
state (see broker/replay.py). Every op code, its fields and what it changes
are defined once, in broker/redo.py.

Dead-letter queue: every final failure (attempts exhausted, stalled too
often, TTL expired before a start) keeps the job `failed` with a
`dlq_reason`: the retained failed history is the DLQ, bounded like it
(keep_failed / remove_on_fail). TTL: a job is never handed out at or after
`expires_at`; pull checks it, and a heap of deadlines lets the broker timer
discard waiting/delayed jobs that nobody pulls.

Scheduling (rate limits, groups: docs/design.md §11, broker/limits.py) runs only for
queues that use it: `pull` takes the plain priority/FIFO path unless the
queue has a limit or grouped jobs waiting. Grouped jobs wait in one line per
group; PULL serves groups round-robin, one job per turn, and the ungrouped
line takes a turn like one more group. Priority orders jobs within a group
(and within the ungrouped line), never across groups: a tenant's urgent
jobs do not jump other tenants' turns.

Every op adds one to the queue's `seq`, and counter effects are implied by the
op code alone, so replay recomputes both from a checkpointed meta.
"""

from __future__ import annotations

import heapq
import random
from bisect import insort
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from operator import attrgetter
from typing import Any

from shardq.broker import schedule
from shardq.broker.events import EventRing
from shardq.broker.flowqueue import FlowQueue
from shardq.broker.histogram import JOB_DURATION_BUCKETS_MS, Buckets
from shardq.broker.job import (
    ACTIVE,
    COMPLETED,
    DELAYED,
    FAILED,
    MAX_LOG_LINE,
    MAX_LOG_LINES,
    PENDING,
    WAITING,
    Job,
    backoff_delay,
)
from shardq.broker.jobadmin import JobAdmin
from shardq.broker.limits import Line, TenantShare, Window

# Per-item results of ack/fail/extend: None is success.
LOCK_LOST = "LOCK_LOST"
NOT_FOUND = "NOT_FOUND"

DLQ_ATTEMPTS = "attempts exhausted"
DLQ_STALLED = "stalled too many times"
DLQ_TTL = "ttl expired"
TTL_REASON = "ttl expired before the job started"

_rand = random.Random()

BY_ORDER = attrgetter("order")
LOCK_HEAP_SLACK = 1024  # stale lock-heap entries tolerated beyond the active jobs

# (job, state, order, lock_until, token) of a job just before a replayed op.
IndexKey = tuple[Job, str, int, int, int]


@dataclass(slots=True)
class QueueDefaults:
    keep_completed: int = 10_000
    keep_failed: int = 10_000
    max_stalled_count: int = 1
    dedup_ttl_ms: int = 3_600_000
    # Per broker (broker/tombstones.py trims the oldest once a second) and per
    # queue at every remove: dedup memory must not grow with the queue count.
    max_tombstones: int = 100_000
    # This broker's leases of cluster-wide tenant limits (shared by its queues).
    tenants: dict[str, TenantShare] = field(default_factory=dict)
    # Start-to-ack durations of this broker's jobs, ms (shardq_job_duration_seconds).
    durations: Buckets = field(default_factory=lambda: Buckets(JOB_DURATION_BUCKETS_MS))


class QueueState(FlowQueue, JobAdmin):
    """Jobs of one queue in memory: waiting by (priority, FIFO), delayed by due
    time, active by lock deadline, and bounded completed/failed history
    (flow state: broker/flowqueue.py; job management: broker/jobadmin.py)."""

    def __init__(self, name: str, slot: int, log: list[Any], defaults: QueueDefaults) -> None:
        self.name = name
        self.slot = slot
        self.log = log
        self.defaults = defaults
        self.jobs: dict[str, Job] = {}
        self.paused = False
        self.seq = 0  # op sequence number of this queue
        self.counters = {"added": 0, "completed": 0, "failed": 0, "retried": 0, "stalled": 0}
        self.tombstones: dict[str, int] = {}  # removed id -> removed_at (insertion ordered)
        self.schedulers: dict[str, dict[str, Any]] = {}
        self._waiting: dict[int, deque[tuple[int, Job]]] = {}
        self._prios: list[int] = []
        self.n_waiting = 0
        self._delayed: list[tuple[int, int, Job]] = []
        self.n_delayed = 0
        self.active: dict[str, Job] = {}
        self._locks: list[tuple[int, int, int, Job]] = []  # (deadline, order, token, job)
        self._finished: dict[str, deque[Job]] = {COMPLETED: deque(), FAILED: deque()}
        self._order = 0
        self._finished_stale = False  # history may list jobs that left it (handoff replay)
        self.durations_ms: deque[int] = deque(maxlen=512)  # recent, for /stats p99_ms
        self.ttls: list[tuple[int, Job]] = []  # (expires_at, job), lazy like the others
        self.ring: EventRing | None = None  # recent events, once someone subscribed
        self._init_flows()
        self._init_admin()
        # Scheduling (broker/limits.py); none of it is touched by plain queues.
        self.rate: list[int] | None = None  # [max, per_ms]
        self.groups: dict[str, dict[str, Any]] = {}  # group -> {concurrency, paused, rate}
        self.windows: dict[str, Window] = {}  # "" queue, "g:<group>", "t" tenant
        self.tenant: str | None = None
        self.blocked_until = 0  # a limit frees budget then (0: not blocked by a rate)
        self.wake = False  # a group's active count fell below its concurrency
        self._limited = False  # rate or tenant set: pulls take the scheduled path
        self._lines: dict[str, Line] = {}
        self._gactive: dict[str, int] = {}
        self._ring: deque[str | None] = deque()  # groups with waiting jobs; None: ungrouped
        self._ungrouped_in_ring = False
        self._n_gwait = 0  # grouped jobs waiting (included in n_waiting)

    def _emit(self, op: tuple[Any, ...]) -> None:
        self.seq += 1
        self.log.append(op)
        if self.ring is not None:
            self.ring.note(op, self.seq)

    # ---------------------------------------------------------------- adding
    def add(self, job_id: str, name: str, data: bytes, opts: dict[str, Any] | None,
            now: int, parent: list[Any] | None = None,
            children: list[Any] | None = None) -> bool:
        """Add a job; False (and no change) when the id exists or was removed
        less than dedup_ttl_ms ago. `opts` must already be validated.
        `parent` / `children`: a flow child or parent (broker/flowqueue.py)."""
        if job_id in self.jobs or job_id in self.tombstones:
            return False
        o = opts or {}
        self._order += 1
        delay = o.get("delay_ms", 0)
        ts = o.get("timestamp", now)
        job = Job(job_id, name, data, WAITING, o.get("priority", 0), o.get("attempts", 1),
                  o.get("backoff"), ts, now + delay if delay else 0,
                  order=self._order,
                  remove_on_complete=o.get("remove_on_complete", -1),
                  remove_on_fail=o.get("remove_on_fail", -1))
        if o:
            job.timeout_ms = o.get("timeout_ms", 0)
            ttl = o.get("ttl_ms", 0)
            if ttl:
                job.expires_at = now + ttl  # from the add, paused time included
                heapq.heappush(self.ttls, (job.expires_at, job))
        if o and "group" in o:  # set apart: plain adds pay one check, not a kwarg
            job.group = o["group"]
        if o and "trace" in o:
            job.trace = o["trace"]
        self.jobs[job_id] = job
        if parent is not None or children is not None:
            self._flow_added(job, parent, children)
        elif delay:
            job.state = DELAYED
            self._push_delayed(job)
        else:
            self._push_waiting(job)
        self.counters["added"] += 1
        self._emit(("A", self.name, job.to_record()))
        return True

    def _push_waiting(self, job: Job) -> None:
        if job.group is not None:
            self._push_group(job)
            return
        q = self._waiting.get(job.priority)
        if q is None:
            q = self._waiting[job.priority] = deque()
            insort(self._prios, job.priority)
        q.append((job.order, job))
        self.n_waiting += 1

    def _push_delayed(self, job: Job) -> None:
        heapq.heappush(self._delayed, (job.delay_until, job.order, job))
        self.n_delayed += 1

    # ---------------------------------------------------------------- pulling
    def pull(self, count: int, lock_ms: int, now: int, out: list[list[Any]]) -> int:
        """Lock up to `count` waiting jobs, appending delivery rows to `out`."""
        if self.paused or not self.n_waiting:
            return 0
        if self._limited or self._n_gwait:
            return self._pull_scheduled(count, lock_ms, now, out)
        taken = 0
        prios = self._prios
        waiting = self._waiting
        while taken < count and prios:
            prio = prios[0]
            dq = waiting[prio]
            while dq and taken < count:
                order, job = dq.popleft()
                if job.state != WAITING or job.order != order:
                    continue  # stale entry: the job left waiting since
                if job.expires_at and job.expires_at <= now:
                    self._expire_ttl(job, now)  # never handed out after its TTL
                    continue
                self._start(job, lock_ms, now, out)
                taken += 1
            if not dq:
                del waiting[prio]
                prios.pop(0)
        return taken

    # ---------------------------------------------------------------- scheduling
    def _push_group(self, job: Job, sort: bool = False) -> None:
        g = job.group
        assert g is not None
        line = self._lines.get(g)
        if line is None:
            line = self._lines[g] = Line()
        dq = line.waiting.get(job.priority)
        if dq is None:
            dq = line.waiting[job.priority] = deque()
            insort(line.prios, job.priority)
        if sort:  # a replayed job: keep the line sorted
            _insert_sorted(dq, job)
        else:
            dq.append((job.order, job))
        line.n += 1
        self._n_gwait += 1
        self.n_waiting += 1
        if not line.in_ring:
            line.in_ring = True
            self._ring.append(g)

    def _start(self, job: Job, lock_ms: int, now: int, out: list[list[Any]]) -> None:
        """Hand a waiting job out (every pull path goes through here)."""
        self.n_waiting -= 1
        job.state = ACTIVE
        job.token = token = _rand.getrandbits(62)
        job.lock_until = lock_until = now + lock_ms
        job.attempts_started += 1
        job.processed_on = now
        self.active[job.id] = job
        heapq.heappush(self._locks, (lock_until, job.order, token, job))
        if len(self._locks) > 2 * len(self.active) + LOCK_HEAP_SLACK:
            self._compact_locks()
        self.seq += 1
        op = ("L", self.name, job.id, token, lock_until, job.attempts_started, now)
        self.log.append(op)
        if self.ring is not None:
            self.ring.note(op, self.seq)
        row = [self.name, job.id, job.name, job.data, token, job.attempts_made,
               job.attempts_started, job.timestamp, lock_ms]
        if job.timeout_ms or job.trace is not None:
            row.append(job.timeout_ms)
            if job.trace is not None:
                row.append(job.trace)
        out.append(row)

    def _pull_scheduled(self, count: int, lock_ms: int, now: int, out: list[list[Any]]) -> int:
        """`pull` for a queue with a rate/tenant limit or grouped jobs waiting."""
        budget = count
        if self._limited:
            budget = min(count, self._queue_budget(now))
            if budget <= 0:
                return 0
        noted: dict[str, list[int]] = {}
        if self._n_gwait:
            taken = self._round_robin(budget, lock_ms, now, out, noted)
        else:
            taken = 0
            while taken < budget:
                job = _pop_line(self._waiting, self._prios)
                if job is None:
                    break
                if job.expires_at and job.expires_at <= now:
                    self._expire_ttl(job, now)  # never handed out after its TTL
                    continue
                self._start(job, lock_ms, now, out)
                taken += 1
        if taken and self._limited:
            if self.rate is not None:
                per = self.rate[1]
                self.windows.setdefault("", Window()).note(now, taken, per)
                noted[""] = [taken, per]
            ts = self.defaults.tenants.get(self.tenant) if self.tenant is not None else None
            if ts is not None:
                if ts.window is None:
                    ts.window = Window()
                ts.window.note(now, taken, ts.per_ms)
                self.windows.setdefault("t", Window()).note(now, taken, ts.per_ms)
                noted["t"] = [taken, ts.per_ms]
        if noted:
            self._emit(("bS", self.name, now, noted))
        return taken

    def _block(self, until: int, now: int) -> None:
        """Note when a limit frees budget; a time already passed is stale."""
        if self.blocked_until <= now or until < self.blocked_until:
            self.blocked_until = until

    def _queue_budget(self, now: int) -> int:
        """Starts the queue's own rate limit and its tenant lease allow now."""
        budget = 1 << 62
        if self.rate is not None:
            limit, per = self.rate
            w = self.windows.get("")
            used = w.used(now, per) if w is not None else 0
            if used >= limit:
                assert w is not None
                self._block(w.free_at(now, per, limit), now)
                return 0
            budget = limit - used
        if self.tenant is not None:
            ts = self.defaults.tenants.get(self.tenant)
            share = ts.share(now) if ts is not None else 0
            if ts is None or share <= 0:
                return 0  # no lease here (yet): a new lease wakes the waiters
            used = ts.window.used(now, ts.per_ms) if ts.window is not None else 0
            if used >= share:
                assert ts.window is not None
                self._block(ts.window.free_at(now, ts.per_ms, share), now)
                return 0
            budget = min(budget, share - used)
        return budget

    def _round_robin(self, budget: int, lock_ms: int, now: int, out: list[list[Any]],
                     noted: dict[str, list[int]]) -> int:
        """One job per group per turn; the ungrouped line (None) takes turns too.
        A group that may not start now (paused, at its concurrency, out of
        rate) is passed over; a full turn with nobody able to start ends it."""
        ring = self._ring
        if not self._ungrouped_in_ring and self.n_waiting > self._n_gwait:
            ring.append(None)
            self._ungrouped_in_ring = True
        taken = skipped = 0
        while taken < budget and ring and skipped < len(ring):
            g = ring[0]
            if g is None:
                job = (_pop_line(self._waiting, self._prios)
                       if self.n_waiting > self._n_gwait else None)
                if job is None:
                    ring.popleft()
                    self._ungrouped_in_ring = False
                    continue
                if job.expires_at and job.expires_at <= now:
                    self._expire_ttl(job, now)
                    continue
                self._start(job, lock_ms, now, out)
            else:
                line = self._lines[g]
                if not line.n:
                    ring.popleft()
                    del self._lines[g]
                    continue
                conf = self.groups.get(g)
                if conf is not None and not self._group_may_start(g, conf, now):
                    ring.rotate(-1)
                    skipped += 1
                    continue
                job = _pop_line(line.waiting, line.prios)
                assert job is not None  # line.n counts its live entries
                if job.expires_at and job.expires_at <= now:
                    self._expire_ttl(job, now)  # (its counts too)
                    continue
                line.n -= 1
                self._n_gwait -= 1
                self._gactive[g] = self._gactive.get(g, 0) + 1
                self._start(job, lock_ms, now, out)
                rate = conf.get("rate") if conf is not None else None
                if rate is not None:
                    key = "g:" + g
                    self.windows.setdefault(key, Window()).note(now, 1, rate[1])
                    noted.setdefault(key, [0, rate[1]])[0] += 1
            taken += 1
            skipped = 0
            ring.rotate(-1)
        return taken

    def reset_rotation(self) -> None:
        """Start the round-robin over: the ungrouped line, then the groups by
        name. The rotation's position is not persisted: a restart or handoff
        starts it over (fairness holds from there)."""
        lines = self._lines
        for g in [g for g, line in lines.items() if not line.n]:
            del lines[g]
        for line in lines.values():
            line.in_ring = True
        self._ungrouped_in_ring = self.n_waiting > self._n_gwait
        self._ring = deque([None] if self._ungrouped_in_ring else [])
        self._ring.extend(sorted(lines))

    def _group_may_start(self, g: str, conf: dict[str, Any], now: int) -> bool:
        if conf.get("paused"):
            return False
        conc = conf.get("concurrency")
        if conc is not None and self._gactive.get(g, 0) >= conc:
            return False
        rate = conf.get("rate")
        if rate is not None:
            w = self.windows.get("g:" + g)
            if w is not None and w.used(now, rate[1]) >= rate[0]:
                self._block(w.free_at(now, rate[1], rate[0]), now)
                return False
        return True

    def _group_left_active(self, g: str) -> None:
        n = self._gactive.get(g, 0) - 1
        if n > 0:
            self._gactive[g] = n
        else:
            self._gactive.pop(g, None)
        conf = self.groups.get(g)
        if conf is not None and conf.get("concurrency") is not None:
            self.wake = True  # parked pulls may now get this group's jobs

    def set_rate_limit(self, rate: list[int] | None) -> None:
        """Set (`[max, per_ms]`, validated by the caller) or clear (None) the
        queue's rate limit. Starts already in the window keep counting."""
        self.rate = [int(rate[0]), int(rate[1])] if rate else None
        if self.rate is None:
            self.windows.pop("", None)
        self.blocked_until = 0
        self._refresh_limited()
        self._emit(("bR", self.name, self.rate))

    def set_group(self, group: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Change a group's settings (`concurrency`, `paused`, `rate`: validated
        by the caller; None or False clears one). Returns the settings now."""
        conf = dict(self.groups.get(group, {}))
        for key, val in changes.items():
            if val is None or val is False:
                conf.pop(key, None)
            else:
                conf[key] = list(val) if isinstance(val, list) else val
        if "rate" not in conf:
            self.windows.pop("g:" + group, None)
        if conf:
            self.groups[group] = conf
        else:
            self.groups.pop(group, None)
        self.blocked_until = 0
        self._emit(("bG", self.name, group, conf or None))
        return conf or None

    def set_tenant(self, tenant: str | None) -> bool:
        """Count this queue's starts against a cluster-wide tenant limit
        (set by the coordinator's lease, coordinator/tenants.py)."""
        if tenant == self.tenant:
            return False
        self.tenant = tenant
        if tenant is None:
            self.windows.pop("t", None)
        self.blocked_until = 0
        self._refresh_limited()
        self._emit(("bT", self.name, tenant))
        return True

    def _refresh_limited(self) -> None:
        self._limited = self.rate is not None or self.tenant is not None

    def limits(self) -> dict[str, Any]:
        """The LIMITS view: rate, tenant, and each configured group with its
        active and waiting jobs."""
        groups = {}
        for g, conf in self.groups.items():
            line = self._lines.get(g)
            groups[g] = {**conf, "active": self._gactive.get(g, 0),
                         "waiting": line.n if line is not None else 0}
        return {"rate": self.rate, "tenant": self.tenant, "groups": groups}

    def _sched_meta(self) -> dict[str, Any]:
        m: dict[str, Any] = {}
        if self.rate is not None:
            m["rate"] = list(self.rate)
        if self.groups:
            m["groups"] = {g: {k: list(v) if isinstance(v, list) else v for k, v in c.items()}
                           for g, c in self.groups.items()}
        if self.windows:
            m["win"] = {k: w.export() for k, w in self.windows.items()}
        if self.tenant is not None:
            m["tenant"] = self.tenant
        return m

    def _adopt_sched_meta(self, meta: dict[str, Any]) -> None:
        rate = meta.get("rate")
        self.rate = [int(rate[0]), int(rate[1])] if rate else None
        self.groups = {g: dict(c) for g, c in meta.get("groups", {}).items()}
        self.windows = {k: Window(r) for k, r in meta.get("win", {}).items() if r}
        self.tenant = meta.get("tenant")
        self.blocked_until = 0
        self._refresh_limited()

    def _locked(self, job_id: str, token: int) -> Job | str:
        job = self.active.get(job_id)
        if job is None:
            return NOT_FOUND if job_id not in self.jobs else LOCK_LOST
        if job.token != token:
            return LOCK_LOST
        return job

    # ---------------------------------------------------------------- finishing
    def ack(self, job_id: str, token: int, result: bytes | None, now: int) -> str | None:
        job = self._locked(job_id, token)
        if isinstance(job, str):
            return job
        del self.active[job_id]
        if job.group is not None:
            self._group_left_active(job.group)
        job.state = COMPLETED
        job.result = result
        job.finished_on = now
        job.attempts_made += 1
        job.token = 0
        self._order += 1
        job.order = self._order  # history keeps completion order, exactly
        self.counters["completed"] += 1
        took = now - job.processed_on
        self.durations_ms.append(took)
        self.defaults.durations.observe(took)
        self._emit(("C", self.name, job_id, result, now, job.attempts_made, job.order))
        if job.parent is not None:
            self._outbox_put(job, True, result)
        self._retain(job, COMPLETED, job.remove_on_complete, self.keep_for(COMPLETED), now)
        return None

    def fail(self, job_id: str, token: int, reason: str, now: int) -> str | None:
        job = self._locked(job_id, token)
        if isinstance(job, str):
            return job
        del self.active[job_id]
        if job.group is not None:
            self._group_left_active(job.group)
        job.attempts_made += 1
        job.token = 0
        job.failed_reason = reason
        if job.attempts_made < job.attempts:
            self.counters["retried"] += 1
            self._requeue(job, backoff_delay(job.backoff, job.attempts_made), now, "W")
        else:
            self._fail_final(job, reason, now)
        return None

    def _fail_final(self, job: Job, reason: str, now: int, stalled: bool = False,
                    dlq: str = DLQ_ATTEMPTS) -> None:
        job.state = FAILED
        job.failed_reason = reason
        job.finished_on = now
        self._order += 1
        job.order = self._order
        self.counters["failed"] += 1
        job.dlq_reason = dlq
        self._emit(("aQ", self.name, job.id, dlq))
        self._emit(("F", self.name, job.id, reason, now, job.attempts_made, stalled,
                    job.stalled_count, job.order))
        if job.parent is not None:
            self._outbox_put(job, False, reason)
        self._retain(job, FAILED, job.remove_on_fail, self.keep_for(FAILED), now)

    def _expire_ttl(self, job: Job, now: int) -> None:
        """A waiting or delayed job whose TTL ran out goes to the DLQ."""
        if job.state == WAITING:
            self.n_waiting -= 1
            if job.group is not None:  # its line entry goes stale; counts go now
                line = self._lines.get(job.group)
                if line is not None:
                    line.n -= 1
                self._n_gwait -= 1
        elif job.state == DELAYED:
            self.n_delayed -= 1
        self._fail_final(job, TTL_REASON, now, dlq=DLQ_TTL)

    def _requeue(self, job: Job, delay: int, now: int, code: str) -> None:
        self._order += 1
        job.order = self._order
        if delay > 0:
            job.state = DELAYED
            job.delay_until = now + delay
            self._push_delayed(job)
        else:
            job.state = WAITING
            job.delay_until = 0
            self._push_waiting(job)
        if job.expires_at:
            heapq.heappush(self.ttls, (job.expires_at, job))
        self._emit((code, self.name, job.id, job.state, job.delay_until, job.attempts_made,
                    job.stalled_count, job.order, job.failed_reason))

    def _retain(self, job: Job, state: str, per_job: int, default: int, now: int) -> None:
        if per_job == 0:  # BullMQ's removeOnComplete: true: this job only
            self._remove(job, now)
            return
        keep = default if per_job < 0 else per_job
        hist = self._finished[state]
        hist.append(job)
        while len(hist) > keep:
            old = hist.popleft()
            if self.jobs.get(old.id) is old:
                self._remove(old, now)

    def _remove(self, job: Job, now: int) -> None:
        del self.jobs[job.id]
        self.tombstones[job.id] = now
        self._emit(("R", self.name, job.id, now))
        if len(self.tombstones) > self.defaults.max_tombstones:
            oldest = next(iter(self.tombstones))
            del self.tombstones[oldest]
            self._emit(("T", self.name, [oldest]))

    def extend(self, job_id: str, token: int, lock_ms: int, now: int) -> str | None:
        job = self._locked(job_id, token)
        if isinstance(job, str):
            return job
        job.lock_until = now + lock_ms
        heapq.heappush(self._locks, (job.lock_until, job.order, token, job))
        if len(self._locks) > 2 * len(self.active) + LOCK_HEAP_SLACK:
            self._compact_locks()
        self._emit(("E", self.name, job_id, job.lock_until))
        return None

    def _compact_locks(self) -> None:
        """Rebuild the lock heap from the active jobs. An ack leaves its entry in
        the heap until its deadline; at 10k acks/s and 30 s locks that is 300k
        stale entries holding finished jobs alive, each coming due and waking
        the broker's timer. O(active), amortized over the slack's pushes."""
        self._locks = [(j.lock_until, j.order, j.token, j) for j in self.active.values()]
        heapq.heapify(self._locks)

    def progress(self, job_id: str, token: int, progress: Any) -> str | None:
        job = self._locked(job_id, token)
        if isinstance(job, str):
            return job
        job.progress = progress
        self._emit(("P", self.name, job_id, progress))
        return None

    # ---------------------------------------------------------------- timers
    def promote(self, now: int) -> int:
        """Move delayed jobs that are due to waiting."""
        moved = 0
        heap = self._delayed
        while heap and heap[0][0] <= now:
            _, order, job = heapq.heappop(heap)
            if job.state != DELAYED or job.order != order:
                continue
            self.n_delayed -= 1
            job.state = WAITING
            job.delay_until = 0
            self._order += 1
            job.order = self._order  # joins the back of the line, also after a restore
            self._push_waiting(job)
            self._emit(("D", self.name, job.id, WAITING, 0, job.attempts_made,
                        job.stalled_count, job.order, job.failed_reason))
            moved += 1
        return moved

    def expire_locks(self, now: int) -> int:
        """Jobs whose lock ran out go back to waiting (stalled), or fail when
        they stalled more than max_stalled_count times. Old tokens are revoked."""
        stalled = 0
        heap = self._locks
        while heap and heap[0][0] <= now:
            lock_until, _, token, job = heapq.heappop(heap)
            if job.state != ACTIVE or job.lock_until != lock_until or job.token != token:
                continue  # an entry of an earlier delivery or of a renewed lock
            del self.active[job.id]
            if job.group is not None:
                self._group_left_active(job.group)
            job.token = 0
            job.stalled_count += 1
            self.counters["stalled"] += 1
            stalled += 1
            if job.stalled_count > self.defaults.max_stalled_count:
                job.attempts_made += 1
                self._fail_final(job, "job stalled more than allowable limit", now, stalled=True,
                                 dlq=DLQ_STALLED)
            else:
                self._requeue(job, 0, now, "S")
        return stalled

    def expire_ttls(self, now: int) -> int:
        """Waiting and delayed jobs past their TTL go to the DLQ (the timer's
        half of the TTL check; pull does the other)."""
        expired = 0
        heap = self.ttls
        while heap and heap[0][0] <= now:
            expires_at, job = heapq.heappop(heap)
            if (job.expires_at == expires_at and job.state in (WAITING, DELAYED)
                    and self.jobs.get(job.id) is job):
                self._expire_ttl(job, now)
                expired += 1
        return expired

    def next_timer(self) -> int | None:
        """Earliest due time of a delayed job, lock deadline, TTL or scheduler tick."""
        cands = []
        if self._delayed:
            cands.append(self._delayed[0][0])
        if self._locks:
            cands.append(self._locks[0][0])
        if self.ttls:
            cands.append(self.ttls[0][0])
        if self.schedulers:
            cands.append(min(s["next_tick_ms"] for s in self.schedulers.values()))
        if self.blocked_until:
            cands.append(self.blocked_until)
        return min(cands) if cands else None

    def wake_due(self, now: int) -> bool:
        """True (once) when a rate limit that blocked a pull frees budget by now."""
        if self.blocked_until and self.blocked_until <= now:
            self.blocked_until = 0
            return True
        return False

    # ---------------------------------------------------------------- schedulers
    def upsert_scheduler(self, sched: dict[str, Any], now: int) -> dict[str, Any]:
        """Create or replace a scheduler (validated by the caller); its first
        tick is the next one after now."""
        sched = dict(sched)
        sched["next_tick_ms"] = schedule.next_tick(sched, now)
        self.schedulers[sched["id"]] = sched
        self._emit(("SU", self.name, sched))
        return sched

    def remove_scheduler(self, sid: str) -> bool:
        if self.schedulers.pop(sid, None) is None:
            return False
        self._emit(("SR", self.name, sid))
        return True

    def fire_schedulers(self, now: int) -> int:
        """Make the job of each due tick and advance the tick in the same batch
        (one transaction); the job id `f"{id}:{tick_ms}"` guards the rest
        (guarantee 5). After downtime only the latest missed tick fires."""
        made = 0
        for sid, s in self.schedulers.items():
            tick = schedule.latest_due(s, now)
            if tick is None:
                continue
            if self.add(f"{sid}:{tick}", s.get("name") or sid, s.get("data") or b"\xc0",
                        s.get("opts"), now):
                made += 1
            s["next_tick_ms"] = schedule.next_tick(s, max(now, tick))
            self._emit(("SN", self.name, sid, s["next_tick_ms"]))
        return made

    def expire_tombstones(self, now: int) -> None:
        cutoff = now - self.defaults.dedup_ttl_ms
        expired = []
        for jid, ts in self.tombstones.items():
            if ts > cutoff:
                break
            expired.append(jid)
        if expired:
            self.forget_tombstones(expired)

    def forget_tombstones(self, ids: list[str]) -> None:
        """Drop these dedup tombstones (expired, or over the broker's bound)."""
        for jid in ids:
            del self.tombstones[jid]
        self._emit(("T", self.name, ids))

    # ---------------------------------------------------------------- logs
    def add_log(self, job_id: str, token: int, line: str) -> str | None:
        """Append a line to an active job's log (the handler's lock token)."""
        job = self._locked(job_id, token)
        if isinstance(job, str):
            return job
        line = line[:MAX_LOG_LINE]
        index = job.logs[0] if job.logs else 0
        append_log(job, index, line)
        self._emit(("aL", self.name, job_id, index, line))
        return None

    # ---------------------------------------------------------------- dead letters
    def dlq_jobs(self) -> list[Job]:
        """Jobs in the DLQ, oldest failure first."""
        return [j for j in self._finished[FAILED]
                if j.state == FAILED and j.dlq_reason is not None and self.jobs.get(j.id) is j]

    def dlq_retry(self, job_ids: list[str] | None, now: int) -> int:
        """Put DLQ jobs (all, or those named) back to waiting, attempts reset."""
        if job_ids is None:
            jobs = self.dlq_jobs()
        else:
            jobs = [j for jid in dict.fromkeys(job_ids) if (j := self.jobs.get(jid)) is not None
                    and j.state == FAILED and j.dlq_reason is not None]
        for job in jobs:
            self._order += 1
            dlq_reset(job, self._order)
            self._push_waiting(job)
            self._emit(("aR", self.name, job.id, job.order))
        if jobs:
            self._compact_failed()
        return len(jobs)

    def dlq_purge(self, now: int) -> int:
        """Remove every job in the DLQ (tombstones keep their ids for dedup)."""
        jobs = self.dlq_jobs()
        for job in jobs:
            job.state = "removed"
            self._remove(job, now)
        if jobs:
            self._compact_failed()
        return len(jobs)

    def _compact_failed(self) -> None:
        self._finished[FAILED] = deque(j for j in self._finished[FAILED]
                                       if j.state == FAILED and self.jobs.get(j.id) is j)

    # ---------------------------------------------------------------- admin
    def counts(self) -> dict[str, Any]:
        return {
            WAITING: self.n_waiting, DELAYED: self.n_delayed, ACTIVE: len(self.active),
            COMPLETED: len(self._finished[COMPLETED]), FAILED: len(self._finished[FAILED]),
            "paused": self.paused,
        }

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._emit(("M", self.name, {"paused": paused}))

    def drain(self, include_delayed: bool, now: int) -> int:
        """Remove waiting (and optionally delayed) jobs; active ones finish."""
        doomed = [j for j in self.jobs.values()
                  if j.state == WAITING or (include_delayed and j.state == DELAYED)]
        for job in doomed:
            job.state = "removed"
            self._remove(job, now)
        self._rebuild_indexes()
        return len(doomed)

    def obliterate(self) -> None:
        """Remove the queue's jobs, history, tombstones, counters and pause."""
        self.jobs.clear()
        self.tombstones.clear()
        self.active.clear()
        self.paused = False
        self.schedulers.clear()
        self.outbox.clear()
        self.counters = dict.fromkeys(self.counters, 0)
        self.rate, self.groups, self.windows = None, {}, {}
        self._init_admin()
        self._rebuild_indexes()
        self._refresh_limited()
        self._emit(("X", self.name))

    def meta(self, events: bool = False) -> dict[str, Any]:
        """Queue-level state persisted beside its jobs (and exported). A
        handoff's copy asks for the event ring too (`events`); checkpoints
        never hold it (broker/events.py)."""
        meta = {"paused": self.paused, "seq": self.seq, "order": self._order,
                "counters": dict(self.counters), "slot": self.slot,
                "schedulers": {k: dict(v) for k, v in self.schedulers.items()},
                **self._sched_meta(), **self._keep_meta()}
        if events and self.ring is not None:
            meta["events"] = self.ring.to_meta()
        if self.outbox:
            meta["outbox"] = {k: list(v) for k, v in self.outbox.items()}
        return meta

    # ---------------------------------------------------------------- restore / export
    def restore(self, meta: dict[str, Any], jobs: dict[str, Job],
                tombstones: dict[str, int]) -> None:
        """Rebuild every index from jobs (recovery, import). Logs nothing."""
        self._take_meta(meta)
        self.jobs = jobs
        self.tombstones = dict(sorted(tombstones.items(), key=lambda kv: kv[1]))
        self._order = max([int(meta.get("order", 0)), *(j.order for j in jobs.values())])
        self.active = {j.id: j for j in jobs.values() if j.state == ACTIVE}
        self._rebuild_indexes()
        self.ring = EventRing.from_meta(meta["events"], self.seq) if "events" in meta else None

    def _take_meta(self, meta: dict[str, Any]) -> None:
        """Queue-level state `restore` and `adopt_meta` both take from a meta."""
        self.paused = bool(meta.get("paused", False))
        self.schedulers = {k: dict(v) for k, v in meta.get("schedulers", {}).items()}
        self.outbox = {k: list(v) for k, v in meta.get("outbox", {}).items()}
        self.seq = int(meta.get("seq", 0))
        self.counters.update(meta.get("counters", {}))
        self._adopt_sched_meta(meta)
        self._adopt_keep(meta)

    def _rebuild_indexes(self) -> None:
        self._waiting, self._prios, self.n_waiting = {}, [], 0
        self._lines, self._gactive, self._ring, self._n_gwait = {}, {}, deque(), 0
        self._delayed, self.n_delayed = [], 0
        self._locks = []
        self.ttls = []
        self._finished = {COMPLETED: deque(), FAILED: deque()}
        self.flows_pending = {}
        self.active = {k: j for k, j in self.active.items() if self.jobs.get(k) is j}
        for job in sorted(self.jobs.values(), key=lambda j: j.order):
            st = job.state
            if st == WAITING:
                self._push_waiting(job)
            elif st == DELAYED:
                self._push_delayed(job)
            if job.expires_at and st in (WAITING, DELAYED):
                self.ttls.append((job.expires_at, job))
            elif st == ACTIVE:
                self.active[job.id] = job
                heapq.heappush(self._locks, (job.lock_until, job.order, job.token, job))
                if job.group is not None:
                    self._gactive[job.group] = self._gactive.get(job.group, 0) + 1
            elif st == PENDING:
                self._index_pending(job)
        self.reset_rotation()
        for st in (COMPLETED, FAILED):
            done = [j for j in self.jobs.values() if j.state == st]
            done.sort(key=lambda j: j.order)  # finishing assigns a new order
            self._finished[st].extend(done)
        heapq.heapify(self.ttls)

    # ---------------------------------------------------------------- handoff catch-up
    # A handoff's target builds the imported queues' indexes when the copy
    # ends, before the freeze; the catch-up ops are then replayed onto the
    # same Job objects (broker/replay.py) and each one re-indexes only the job
    # it touched, so activation costs O(catch-up ops), not O(jobs).
    def index_key(self, job_id: str) -> IndexKey | None:
        """What `reindex` needs to know about a job before an op changes it."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        return job, job.state, job.order, job.lock_until, job.token

    def reindex(self, before: IndexKey | None, job_id: str) -> None:
        """Update the indexes after a replayed op changed job `job_id`
        (`before` is its `index_key` from just before). Index entries are
        lazy: an entry whose job no longer matches its state and order is
        skipped when reached, so only counts and `active` are fixed here."""
        new = self.jobs.get(job_id)
        if before is not None and not self._unindex(before, new):
            return
        if new is None:
            return
        state = new.state
        if state == WAITING:
            self._insert_waiting(new)
        elif state == DELAYED:
            self._push_delayed(new)
        elif state == ACTIVE:
            if new.group is not None and job_id not in self.active:
                self._gactive[new.group] = self._gactive.get(new.group, 0) + 1
            self.active[job_id] = new
            heapq.heappush(self._locks, (new.lock_until, new.order, new.token, new))
        elif state in self._finished:
            self._finished[state].append(new)
        elif state == PENDING:
            self._index_pending(new)
        if new.expires_at and state in (WAITING, DELAYED):
            heapq.heappush(self.ttls, (new.expires_at, new))
        if new.order > self._order:
            self._order = new.order

    def _insert_waiting(self, job: Job) -> None:
        """`_push_waiting` for a replayed job, whose order may be older than
        the line's tail (the snapshot saw later jobs): keep the line sorted."""
        if job.group is not None:
            self._push_group(job, sort=True)
            return
        dq = self._waiting.get(job.priority)
        if not dq:
            self._push_waiting(job)
            return
        _insert_sorted(dq, job)
        self.n_waiting += 1

    def _unindex(self, before: IndexKey, new: Job | None) -> bool:
        """Take a job out of the place `before` describes; False when it is
        still there (same object, state and order: nothing to re-index)."""
        old, state, order, lock_until, token = before
        if new is old and new.state == state and new.order == order:
            if state == ACTIVE and (new.lock_until, new.token) != (lock_until, token):
                heapq.heappush(self._locks, (new.lock_until, new.order, new.token, new))
            return False
        if state == WAITING:
            self.n_waiting -= 1
            if old.group is not None:
                self._lines[old.group].n -= 1
                self._n_gwait -= 1
        elif state == DELAYED:
            self.n_delayed -= 1
        elif state == ACTIVE:
            if self.active.pop(old.id, None) is not None and old.group is not None:
                self._group_left_active(old.group)
        elif state in self._finished:
            self._finished_stale = True  # the history lists it; compacted on adopt_meta
        elif state == PENDING:
            self._unindex_pending(old)
        if new is not old:
            old.state = "removed"  # its old entries must never match again
        return True

    def adopt_meta(self, meta: dict[str, Any]) -> None:
        """Take queue-level state (paused, schedulers, seq, counters) from a
        replayed image's meta; the jobs and indexes are already current."""
        self._take_meta(meta)
        self.reset_rotation()
        self._order = max(self._order, int(meta.get("order", 0)))
        if self._finished_stale:
            self._finished_stale = False
            for state, hist in self._finished.items():
                # Bounded by the retention (keep_completed/keep_failed), not by jobs.
                kept = {j.id: j for j in hist if self.jobs.get(j.id) is j and j.state == state}
                self._finished[state] = deque(sorted(kept.values(), key=lambda j: j.order))

    def free_in_steps(self, step: int = 5000) -> Iterator[None]:
        """Let go of every job, `step` objects at a time: freeing a big queue
        (one handed off) in one go would stall the event loop for tens of ms."""
        containers: list[Any] = [*self._waiting.values(),
                                 *(dq for ln in self._lines.values() for dq in ln.waiting.values()),
                                 self._delayed, self._locks, self.ttls,
                                 *self._finished.values(), self.active, self.jobs,
                                 self.tombstones]
        for c in containers:
            pop = c.popitem if isinstance(c, dict) else c.pop
            while c:
                for _ in range(min(step, len(c))):
                    pop()
                yield

    def export_chunks(self, chunk_size: int = 1000,
                      jobs: Iterable[Job] | None = None) -> Iterator[dict[str, Any]]:
        """Everything the queue holds as a stream of versioned chunks; `jobs`:
        its jobs already in `order` (default: sorted here, in one step)."""
        yield {"v": 1, "kind": "meta", "queue": self.name, "meta": self.meta()}
        # Records are made chunk by chunk, so a caller that yields to the event
        # loop between chunks (the handoff's copy) never blocks it for long.
        it = iter(sorted(self.jobs.values(), key=BY_ORDER) if jobs is None else jobs)
        while batch := list(islice(it, chunk_size)):
            yield {"v": 1, "kind": "jobs", "queue": self.name,
                   "jobs": [j.to_record() for j in batch]}
        tombs = list(self.tombstones.items())
        for i in range(0, len(tombs), chunk_size * 10):
            yield {"v": 1, "kind": "tombstones", "queue": self.name,
                   "tombstones": [list(t) for t in tombs[i:i + chunk_size * 10]]}


def _insert_sorted(dq: deque[tuple[int, Job]], job: Job) -> None:
    """Append `(order, job)`, or insert it where its order belongs when the
    line's tail is newer (a job replayed by a handoff's catch-up)."""
    i = len(dq)
    while i and dq[i - 1][0] > job.order:
        i -= 1
    dq.insert(i, (job.order, job))


def _pop_line(waiting: dict[int, deque[tuple[int, Job]]], prios: list[int]) -> Job | None:
    """Take the first live entry of a line (by priority, then FIFO)."""
    while prios:
        prio = prios[0]
        dq = waiting[prio]
        while dq:
            order, job = dq.popleft()
            if job.state == WAITING and job.order == order:
                if not dq:
                    del waiting[prio]
                    prios.pop(0)
                return job
        del waiting[prio]
        prios.pop(0)
    return None


def import_chunks(chunks: list[dict[str, Any]], log: list[Any],
                  defaults: QueueDefaults) -> QueueState:
    """Build a queue from `export_chunks` output (the handoff's copy step)."""
    meta: dict[str, Any] = {}
    jobs: dict[str, Job] = {}
    tombs: dict[str, int] = {}
    name = None
    for ch in chunks:
        if ch.get("v") != 1:
            raise ValueError(f"unsupported export version {ch.get('v')!r}")
        name = ch["queue"]
        if ch["kind"] == "meta":
            meta = ch["meta"]
        elif ch["kind"] == "jobs":
            for rec in ch["jobs"]:
                job = Job.from_record(list(rec))
                jobs[job.id] = job
        elif ch["kind"] == "tombstones":
            for jid, ts in ch["tombstones"]:
                tombs[jid] = ts
    if name is None:
        raise ValueError("empty export")
    q = QueueState(name, int(meta.get("slot", 0)), log, defaults)
    q.restore(meta, jobs, tombs)
    return q


def append_log(job: Job, index: int, line: str) -> None:
    """Log line number `index` of a job; a repeat (replayed over a newer row)
    changes nothing, and only the last MAX_LOG_LINES lines are kept."""
    logs = job.logs
    count = logs[0] if logs else 0
    if index != count:
        return
    kept = logs[max(1, len(logs) - MAX_LOG_LINES + 1):] if logs else []
    job.logs = [count + 1, *kept, line]


def dlq_reset(job: Job, order: int) -> None:
    """A DLQ job back to waiting (dlq_retry), with absolute values only."""
    job.state = WAITING
    job.order = order
    job.attempts_made = 0
    job.stalled_count = 0
    job.dlq_reason = None
    job.expires_at = 0  # retried by hand: wanted now, whatever its TTL was
    job.delay_until = 0
    job.finished_on = 0
    job.token = 0
