"""Flows on one queue: pending children, parents waiting for children, the outbox.

A flow (docs/design.md §11) is a parent job and its children, which may live in
queues of other brokers. This is the per-queue half, plain Python without
I/O, mixed into `QueueState`; broker/flows.py carries the messages between
brokers and holds the wire handlers.

Creation is all-or-nothing; the parent's write is the commit point:

 1. each child is added `pending` with `parent = [parent queue, parent id,
    flow id, deadline ms, ignore_failure]`: stored, exported and replayed
    like any job, never handed to a worker;
 2. the parent is added `waiting-children` with `children = [flow id, child
    count, {}]`; its owner refuses it once its clock is past the deadline;
 3. the client commits the children (FLOW_COMMIT): pending -> waiting.

A flow whose children are still pending `RESOLVE_GRACE_MS` after its deadline
(the client died, or its commit was lost) asks the parent's owner
(FLOW_RESOLVE): the parent exists -> "committed", and step 3 is done here;
the parent does not exist and its owner's clock is past the deadline plus
the grace -> "aborted" (no parent can be written any more, as long as
brokers' clocks differ by less than the grace), and the children are
removed. Until one of these answers, pending children just wait.

Completion: a child that completes, or fails for good, puts an entry in
its queue's `outbox` (op cO) in the same batch - so the same group commit -
as its C/F op. broker/flows.py delivers each entry to the parent's current
owner (FLOW_CHILD_DONE), at least once; the parent records each child key
once (op cD) and, with every child in, becomes waiting (op cR). A child
that failed for good fails the parent, naming the child, unless it was
added with `ignore_failure` (then it counts as done with a None value).
An answered delivery takes the entry out of the outbox (op cX). The outbox
is queue meta, so it moves with its queue in a handoff.

Ops (absolute values, like broker/queue.py's):

    ("cO", q, child_id, [parent queue, parent id, flow id, child key, ok, value, ignore])
    ("cX", q, child_id)                          outbox entry delivered
    ("cD", q, parent_id, child_key, value)       a child's result on its parent
    ("cR", q, id, state, delay_until, attempts_made, stalled_count, order, reason)
        a pending child committed, or a parent whose children are all done
        (the shape of W; replayed by the same code, counting nothing)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shardq.broker.job import DELAYED, PENDING, WAITING, WAITING_CHILDREN, Job

# A pending flow asks the parent's owner this long after its deadline; the
# owner answers "aborted" only past deadline + grace by its own clock, so a
# clock difference between brokers below the grace cannot resurrect a flow.
RESOLVE_GRACE_MS = 1000

# Outcomes of a child's delivery to its parent.
RECORDED = "recorded"
DUPLICATE = "duplicate"
GONE = "gone"


class FlowQueue:
    """The flow half of `QueueState` (see the module docstring)."""

    outbox: dict[str, list[Any]]
    # flow id -> [deadline, parent queue, parent id, {ids of pending children}];
    # an index over the jobs, rebuilt by restore and kept by reindex.
    flows_pending: dict[str, list[Any]]

    if TYPE_CHECKING:
        name: str
        jobs: dict[str, Job]
        _order: int

        def _emit(self, op: tuple[Any, ...]) -> None: ...

        def _push_waiting(self, job: Job) -> None: ...

        def _push_delayed(self, job: Job) -> None: ...

        def _remove(self, job: Job, now: int) -> None: ...

        def _fail_final(self, job: Job, reason: str, now: int, stalled: bool = False) -> None: ...

    def _init_flows(self) -> None:
        self.outbox = {}
        self.flows_pending = {}

    # ---------------------------------------------------------------- creation
    def _flow_added(self, job: Job, parent: list[Any] | None,
                    children: list[Any] | None) -> None:
        """A job just added as a flow child (pending) or parent (waiting-children)."""
        if parent is not None:
            job.state = PENDING
            job.parent = parent
            self._index_pending(job)
        else:
            job.state = WAITING_CHILDREN
            job.children = children

    def _index_pending(self, job: Job) -> None:
        p = job.parent
        assert p is not None
        entry = self.flows_pending.get(p[2])
        if entry is None:
            entry = self.flows_pending[p[2]] = [p[3], p[0], p[1], set()]
        entry[3].add(job.id)

    def _unindex_pending(self, job: Job) -> None:
        p = job.parent
        entry = self.flows_pending.get(p[2]) if p is not None else None
        if entry is not None:
            entry[3].discard(job.id)
            if not entry[3]:
                del self.flows_pending[p[2]]  # type: ignore[index]

    def _pending_of(self, flow_id: str) -> list[Job]:
        entry = self.flows_pending.pop(flow_id, None)
        if entry is None:
            return []
        jobs = [j for jid in entry[3] if (j := self.jobs.get(jid)) is not None
                and j.state == PENDING and j.parent is not None and j.parent[2] == flow_id]
        jobs.sort(key=lambda j: j.order)
        return jobs

    def flow_release(self, flow_id: str, now: int) -> int:
        """Commit the flow's pending children here: they become waiting (or
        delayed, if added with a delay still to run). Idempotent."""
        jobs = self._pending_of(flow_id)
        for job in jobs:
            self._to_runnable(job, now)
        return len(jobs)

    def flow_abort(self, flow_id: str, now: int) -> int:
        """Remove the flow's pending children (its creation never finished)."""
        jobs = self._pending_of(flow_id)
        for job in jobs:
            job.state = "removed"
            self._remove(job, now)
        return len(jobs)

    def _to_runnable(self, job: Job, now: int) -> None:
        self._order += 1
        job.order = self._order
        if job.delay_until > now:
            job.state = DELAYED
            self._push_delayed(job)
        else:
            job.state = WAITING
            job.delay_until = 0
            self._push_waiting(job)
        self._emit(("cR", self.name, job.id, job.state, job.delay_until, job.attempts_made,
                    job.stalled_count, job.order, job.failed_reason))

    def flows_due(self, now: int) -> list[tuple[str, str, str, int]]:
        """(flow id, parent queue, parent id, deadline) of flows still pending
        past deadline + grace: their parent's owner must be asked."""
        return [(fid, e[1], e[2], e[0]) for fid, e in self.flows_pending.items()
                if e[0] + RESOLVE_GRACE_MS <= now]

    def flow_status(self, parent_id: str, flow_id: str, deadline: int, now: int) -> str:
        """The parent's owner's answer to FLOW_RESOLVE."""
        job = self.jobs.get(parent_id)
        if job is not None and job.children is not None and job.children[0] == flow_id:
            return "committed"
        if now > deadline + RESOLVE_GRACE_MS:
            return "aborted"
        return "pending"

    # ---------------------------------------------------------------- completion
    def _outbox_put(self, job: Job, ok: bool, value: Any) -> None:
        """Called in the same step as the child's C/F op (same group commit)."""
        p = job.parent
        assert p is not None
        base = self.name.split("~", 1)[0]  # a partition's children are keyed by the queue
        entry = [p[0], p[1], p[2], f"{base}:{job.id}", ok, value, bool(p[4])]
        self.outbox[job.id] = entry
        self._emit(("cO", self.name, job.id, entry))

    def outbox_done(self, child_id: str) -> None:
        """The parent's owner durably has this entry."""
        if self.outbox.pop(child_id, None) is not None:
            self._emit(("cX", self.name, child_id))

    def flow_child_done(self, parent_id: str, flow_id: str, key: str, ok: bool, value: Any,
                        ignore_failure: bool, now: int) -> str:
        """Record one child's outcome on its parent; idempotent by child key."""
        job = self.jobs.get(parent_id)
        if job is None or job.children is None or job.children[0] != flow_id:
            return GONE  # removed, obliterated, or an id reused by another flow
        values: dict[str, Any] = job.children[2]
        if job.state != WAITING_CHILDREN or key in values:
            return DUPLICATE
        if not ok and not ignore_failure:
            self._fail_final(job, f"child {key} failed: {value}", now)
            return RECORDED
        val = value if ok else None
        values[key] = val
        self._emit(("cD", self.name, parent_id, key, val))
        if len(values) >= job.children[1]:
            self._to_runnable(job, now)
        return RECORDED
