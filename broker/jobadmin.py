"""Job management on one queue: getters, single-job and queue-wide actions,
retention settings (docs/features-jobs.md "Job management"). Plain Python
without I/O, mixed into `QueueState` like broker/flowqueue.py.

Every change is one redo op with absolute values, so replay over any newer
copy of a job converges (broker/replay.py; the ops are defined in broker/redo.py):

    ("jU", q, id, {field: value, ...})   fields of one job set (a retry, a
                                         promotion, new data, priority, delay,
                                         or attempts for a discard)
    ("jU", q, id, {"stacktrace": [...]})
                                         a failed attempt's stack trace, after its
                                         F or W (the whole bounded list)
    ("jK", q, {"completed": n|None, "failed": n|None})
                                         the queue's retention (None: broker default)

Removal is the existing ("R", q, id, removed_at) op. A change that moves a
job within the indexes always gives it a new `order`: the lazy index
entries of its old place stop matching (waiting lines and the delayed heap
check state and order), and a handoff's catch-up re-indexes a job whose
state or order changed (`QueueState.reindex`).

States for the getters follow BullMQ: "waiting" is a waiting job of
priority 0, "prioritized" one of a higher priority; `counts()` keeps
counting both as waiting.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from shardq.broker.job import (
    ACTIVE,
    COMPLETED,
    DELAYED,
    FAILED,
    PENDING,
    STACKTRACE_LIMIT,
    STACKTRACE_MAX,
    WAITING,
    WAITING_CHILDREN,
    Job,
)
from shardq.errors import BadRequestError, JobStateError, NotFoundError

if TYPE_CHECKING:
    from shardq.broker.limits import Line

PRIORITIZED = "prioritized"
LIST_STATES = (WAITING, PRIORITIZED, DELAYED, ACTIVE, COMPLETED, FAILED, WAITING_CHILDREN)
CLEAN_STATES = (WAITING, PRIORITIZED, DELAYED, COMPLETED, FAILED)
RETRY_STATES = (COMPLETED, FAILED)
# Jobs one request may touch (queue-wide actions) or list: the client asks
# again for more, so one request never holds the event loop for long.
MAX_TOUCH = 10_000
MAX_PAGE = 1000
# Fields a "jU" op may set (replay refuses others).
SETTABLE = frozenset({
    "data", "priority", "attempts", "state", "delay_until", "order", "attempts_made",
    "stalled_count", "failed_reason", "finished_on", "dlq_reason", "expires_at", "token",
    "result", "processed_on", "progress", "stacktrace",
})

SortKey = tuple[int, int, str]


def retry_fields(order: int) -> dict[str, Any]:
    """A finished job back to waiting as if new: attempts, stalls, TTL, lock
    and outcome reset (BullMQ's `job.retry()`)."""
    return {"state": WAITING, "order": order, "attempts_made": 0, "stalled_count": 0,
            "failed_reason": None, "finished_on": 0, "dlq_reason": None, "expires_at": 0,
            "delay_until": 0, "token": 0, "result": None, "processed_on": 0}


def set_fields(job: Job, fields: dict[str, Any]) -> None:
    """Apply a "jU" op's fields (live and in replay: one code path)."""
    for key, val in fields.items():
        if key not in SETTABLE:
            raise ValueError(f"jU op sets unknown job field {key!r}")
        setattr(job, key, val)


def sort_key(job: Job, rank: int) -> SortKey:
    """Listing order across partitions: the state's rank in the request,
    then its time (due time for delayed, start for active, finish for
    completed/failed, added otherwise), then id."""
    st = job.state
    if st == DELAYED:
        t = job.delay_until
    elif st == ACTIVE:
        t = job.processed_on
    elif st in RETRY_STATES:
        t = job.finished_on
    else:
        t = job.timestamp
    return rank, t, job.id


class JobAdmin:
    """The job-management half of `QueueState` (see the module docstring)."""

    if TYPE_CHECKING:
        name: str
        jobs: dict[str, Job]
        active: dict[str, Job]
        counters: dict[str, int]
        n_waiting: int
        n_delayed: int
        defaults: Any
        _order: int
        _waiting: dict[int, deque[tuple[int, Job]]]
        _lines: dict[str, Line]
        _n_gwait: int
        _delayed: list[tuple[int, int, Job]]
        _finished: dict[str, deque[Job]]
        ttls: list[tuple[int, Job]]
        outbox: dict[str, list[Any]]

        def _emit(self, op: tuple[Any, ...]) -> None: ...

        def _push_waiting(self, job: Job) -> None: ...

        def _push_delayed(self, job: Job) -> None: ...

        def _remove(self, job: Job, now: int) -> None: ...

        def _unindex_pending(self, job: Job) -> None: ...

    keep: dict[str, int | None]

    _fin_changed: set[str]  # histories that lost jobs since the last compaction

    def _init_admin(self) -> None:
        self.keep = {COMPLETED: None, FAILED: None}
        self._fin_changed = set()

    # ---------------------------------------------------------------- retention
    def keep_for(self, state: str) -> int:
        """How many completed/failed jobs the queue keeps (its own setting or
        the broker default; a job's remove_on_* overrides both)."""
        own = self.keep.get(state)
        if own is not None:
            return own
        return int(self.defaults.keep_completed if state == COMPLETED
                   else self.defaults.keep_failed)

    def set_retention(self, completed: int | None, failed: int | None, now: int) -> int:
        """Set both retention counts (None: the broker default); history over
        a new bound is removed at once, oldest first. Returns jobs removed."""
        self.keep = {COMPLETED: completed, FAILED: failed}
        self._emit(("jK", self.name, {COMPLETED: completed, FAILED: failed}))
        self._fin_changed.update(RETRY_STATES)
        self._compact_finished()  # a stale entry must not count as a kept job
        removed = 0
        for st in RETRY_STATES:
            hist = self._finished[st]
            keep = self.keep_for(st)
            while len(hist) > keep:
                old = hist.popleft()
                if self.jobs.get(old.id) is old and old.state == st:
                    self._remove(old, now)
                    removed += 1
        return removed

    def _adopt_keep(self, meta: dict[str, Any]) -> None:
        keep = meta.get("keep") or {}
        self.keep = {COMPLETED: keep.get(COMPLETED), FAILED: keep.get(FAILED)}

    def _keep_meta(self) -> dict[str, Any]:
        if self.keep[COMPLETED] is None and self.keep[FAILED] is None:
            return {}
        return {"keep": dict(self.keep)}

    # ---------------------------------------------------------------- getters
    def jobs_in(self, state: str) -> Iterator[Job]:
        """Live jobs in one listing state, through its index where there is one."""
        if state in (WAITING, PRIORITIZED):
            return self._waiting_jobs(state == PRIORITIZED)
        if state == DELAYED:
            return self._delayed_jobs()
        if state == ACTIVE:
            return iter(list(self.active.values()))
        if state in RETRY_STATES:
            return (j for j in self._finished[state]
                    if j.state == state and self.jobs.get(j.id) is j)
        if state == WAITING_CHILDREN:
            return (j for j in self.jobs.values() if j.state == WAITING_CHILDREN)
        raise BadRequestError(f"unknown job state {state!r}; one of {', '.join(LIST_STATES)}")

    def _waiting_jobs(self, prioritized: bool) -> Iterator[Job]:
        # Only the lines of the priorities asked for are walked (a live entry's
        # job has its line's priority: a priority change gives a new order), so
        # counting prioritized jobs costs O(prioritized), not O(waiting). A
        # replayed handoff op can index a job twice: listed once.
        seen: set[str] = set()
        for dq in self._waiting_lines(prioritized):
            for order, job in dq:
                if job.state == WAITING and job.order == order and job.id not in seen:
                    seen.add(job.id)
                    yield job

    def _delayed_jobs(self) -> Iterator[Job]:
        seen: set[str] = set()
        for _, order, job in self._delayed:
            if job.state == DELAYED and job.order == order and job.id not in seen:
                seen.add(job.id)
                yield job

    def _waiting_lines(self, prioritized: bool) -> Iterator[deque[tuple[int, Job]]]:
        for lines in (self._waiting, *(line.waiting for line in self._lines.values())):
            for prio, dq in lines.items():
                if (prio > 0) == prioritized:
                    yield dq

    def job_counts(self, states: Iterable[str]) -> dict[str, int]:
        """Jobs per listing state (waiting excludes prioritized, as BullMQ)."""
        out: dict[str, int] = {}
        prioritized: int | None = None
        for st in states:
            if st in (WAITING, PRIORITIZED):
                if prioritized is None:
                    prioritized = sum(1 for _ in self.jobs_in(PRIORITIZED))
                out[st] = prioritized if st == PRIORITIZED else self.n_waiting - prioritized
            elif st == DELAYED:
                out[st] = self.n_delayed
            elif st == ACTIVE:
                out[st] = len(self.active)
            else:
                out[st] = sum(1 for _ in self.jobs_in(st))
        return out

    def list_jobs(self, states: list[str], start: int, end: int,
                  asc: bool) -> tuple[list[tuple[SortKey, Job]], int]:
        """Jobs `start..end` (inclusive; end -1: to the last) of the states in
        `sort_key` order (asc=False: newest first, ranks still in the order
        given), at most MAX_PAGE; and how many jobs the states hold."""
        # Ranks ascend in both directions, so the listing is each state's jobs
        # in turn, each sorted by (time, id): a state wholly before `start` or
        # after `end` is only counted, and a state is one C-level sort on
        # attrgetter keys (near-sorted indexes make it ~O(n)), several times
        # cheaper than keying every job in Python at 100,000 jobs.
        walked = [list(self.jobs_in(st)) for st in states]
        total = sum(len(jobs) for jobs in walked)
        stop = total if end < 0 else min(total, end + 1)
        stop = min(stop, start + MAX_PAGE)
        page: list[tuple[SortKey, Job]] = []
        offset = 0
        for rank, (st, jobs) in enumerate(zip(states, walked, strict=True)):
            lo, hi = max(start - offset, 0), min(stop - offset, len(jobs))
            offset += len(jobs)
            if lo >= hi:
                continue
            ordered = sorted(jobs, key=_TIME_ID[st], reverse=not asc)
            page += [(sort_key(j, rank), j) for j in ordered[lo:hi]]
        return page, total

    # ---------------------------------------------------------------- one job
    def _get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r} in {self.name!r}")
        return job

    def _detach(self, job: Job) -> None:
        """Take a job out of its state's counts; its index entries go stale
        because the caller then changes its state or order."""
        st = job.state
        if st == WAITING:
            self.n_waiting -= 1
            if job.group is not None:
                line = self._lines.get(job.group)
                if line is not None:
                    line.n -= 1
                self._n_gwait -= 1
        elif st == DELAYED:
            self.n_delayed -= 1
        elif st == PENDING:
            self._unindex_pending(job)

    def note_stacktrace(self, job_id: str, stacktrace: str) -> None:
        """Keep a failed attempt's stack trace on the job (BullMQ's `job.stacktrace`):
        the last STACKTRACE_LIMIT, each cut to its last STACKTRACE_MAX characters.
        A job its FAIL removed (remove_on_fail) keeps nothing."""
        job = self.jobs.get(job_id)
        if job is None or not stacktrace:
            return
        kept = [*(job.stacktrace or ()), stacktrace[-STACKTRACE_MAX:]][-STACKTRACE_LIMIT:]
        job.stacktrace = kept
        self._emit(("jU", self.name, job_id, {"stacktrace": kept}))

    def _place(self, job: Job, fields: dict[str, Any]) -> None:
        """Set a detached job's new state and order, index it, log it."""
        set_fields(job, fields)
        if job.state == WAITING:
            self._push_waiting(job)
        elif job.state == DELAYED:
            self._push_delayed(job)
        if job.expires_at and job.state in (WAITING, DELAYED):
            heapq.heappush(self.ttls, (job.expires_at, job))
        self._emit(("jU", self.name, job.id, fields))

    def _next_order(self) -> int:
        self._order += 1
        return self._order

    def retry_job(self, job_id: str) -> None:
        """A completed or failed job back to waiting, attempts reset."""
        job = self._get(job_id)
        if job.state not in RETRY_STATES:
            raise JobStateError(job_id, job.state, "only completed or failed jobs are retried")
        self._retry(job)
        self._compact_finished()

    def _retry(self, job: Job) -> None:
        was = job.state
        self._detach(job)
        self._place(job, retry_fields(self._next_order()))
        self._fin_changed.add(was)

    def remove_job(self, job_id: str, now: int) -> None:
        """Remove a job that no worker holds (its id stays a tombstone).
        A flow child that has not finished counts as done (None) on its
        parent, so the parent is not left waiting for it."""
        job = self._get(job_id)
        if job.state == ACTIVE:
            raise JobStateError(job_id, job.state, "a worker holds the job; it cannot be removed")
        if job.state == PENDING:
            raise JobStateError(job_id, job.state,
                                "its flow is not committed yet; remove the flow's parent")
        self._remove_one(job, now)
        self._compact_finished()

    def _remove_one(self, job: Job, now: int) -> None:
        self._detach(job)
        if job.parent is not None and job.state not in RETRY_STATES:
            p = job.parent
            base = self.name.split("~", 1)[0]
            entry = [p[0], p[1], p[2], f"{base}:{job.id}", True, None, bool(p[4])]
            self.outbox[job.id] = entry
            self._emit(("cO", self.name, job.id, entry))
        if job.state in RETRY_STATES:
            self._fin_changed.add(job.state)
        job.state = "removed"
        self._remove(job, now)

    def promote_job(self, job_id: str) -> None:
        """A delayed job to waiting now."""
        job = self._get(job_id)
        if job.state != DELAYED:
            raise JobStateError(job_id, job.state, "only delayed jobs are promoted")
        self._detach(job)
        self._place(job, {"state": WAITING, "delay_until": 0, "order": self._next_order()})

    def update_job_data(self, job_id: str, data: bytes) -> None:
        """Replace a job's data (msgpack bytes), in any state."""
        job = self._get(job_id)
        job.data = data
        self._emit(("jU", self.name, job_id, {"data": data}))

    def change_job_priority(self, job_id: str, priority: int) -> None:
        """A new priority for a job not finished (a waiting job joins the
        back of its new priority's line, as BullMQ's changePriority; an
        active one keeps it for a retry)."""
        job = self._get(job_id)
        if job.state in RETRY_STATES:
            raise JobStateError(job_id, job.state, "a finished job has no priority to change")
        if job.state != WAITING:
            job.priority = priority
            self._emit(("jU", self.name, job_id, {"priority": priority}))
            return
        self._detach(job)
        self._place(job, {"priority": priority, "order": self._next_order()})

    def change_job_delay(self, job_id: str, delay_ms: int, now: int) -> None:
        """Run a waiting or delayed job `delay_ms` from now (0: now)."""
        job = self._get(job_id)
        if job.state not in (WAITING, DELAYED):
            raise JobStateError(job_id, job.state, "only waiting or delayed jobs take a delay")
        self._detach(job)
        if delay_ms > 0:
            fields = {"state": DELAYED, "delay_until": now + delay_ms}
        else:
            fields = {"state": WAITING, "delay_until": 0}
        self._place(job, {**fields, "order": self._next_order()})

    def discard_job(self, job_id: str) -> None:
        """No more retries: the job's current (or next) attempt is its last."""
        job = self._get(job_id)
        if job.state in RETRY_STATES:
            raise JobStateError(job_id, job.state, "the job has finished")
        job.attempts = job.attempts_made + 1
        self._emit(("jU", self.name, job_id, {"attempts": job.attempts}))

    # ---------------------------------------------------------------- queue-wide
    def retry_jobs(self, state: str, count: int) -> int:
        """Up to `count` jobs of `state` (completed/failed) back to waiting,
        oldest first. Returns how many."""
        if state not in RETRY_STATES:
            raise BadRequestError(f"retry_jobs state must be completed or failed, not {state!r}")
        jobs = list(islice(self.jobs_in(state), count))
        for job in jobs:
            self._retry(job)
        self._compact_finished()
        return len(jobs)

    def promote_jobs(self, count: int) -> int:
        """Up to `count` delayed jobs to waiting, soonest due first."""
        jobs = heapq.nsmallest(count, self.jobs_in(DELAYED),
                               key=lambda j: (j.delay_until, j.order))
        for job in jobs:
            self._detach(job)
            self._place(job, {"state": WAITING, "delay_until": 0, "order": self._next_order()})
        return len(jobs)

    def clean(self, grace_ms: int, limit: int, state: str, now: int) -> int:
        """Remove up to `limit` jobs of `state` older than `grace_ms` (by finish
        time for completed/failed, by add time otherwise), oldest first."""
        if state not in CLEAN_STATES:
            raise BadRequestError(f"clean state must be one of {', '.join(CLEAN_STATES)}")
        cutoff = now - grace_ms
        old = (j for j in self.jobs_in(state) if sort_key(j, 0)[1] <= cutoff)
        jobs = heapq.nsmallest(limit, old, key=lambda j: (sort_key(j, 0)[1], j.order))
        for job in jobs:
            self._remove_one(job, now)
        self._compact_finished()
        return len(jobs)

    # ---------------------------------------------------------------- history
    def _compact_finished(self) -> None:
        """Drop jobs that left the completed/failed history from it, so its
        length is the retained count again (O(history), bounded by retention)."""
        for st in self._fin_changed:
            self._finished[st] = deque(j for j in self._finished[st]
                                       if j.state == st and self.jobs.get(j.id) is j)
        self._fin_changed.clear()


# A listing state's (time, id) as `sort_key` takes it (jobs_in(st) yields jobs in st;
# a prioritized job's state is waiting: its time is when it was added).
_TIME_ID = {
    WAITING: attrgetter("timestamp", "id"), PRIORITIZED: attrgetter("timestamp", "id"),
    WAITING_CHILDREN: attrgetter("timestamp", "id"), DELAYED: attrgetter("delay_until", "id"),
    ACTIVE: attrgetter("processed_on", "id"), COMPLETED: attrgetter("finished_on", "id"),
    FAILED: attrgetter("finished_on", "id"),
}
