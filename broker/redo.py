"""The redo-op schema: every op the broker logs, defined once (docs/design.md §3).

A group commit is one log row holding a list of ops. An op is a plain tuple
`(code, queue, *fields)`, built at the emitting site with the field order
given here (tuples keep the hot path at a few hundred ns per op; nothing is
validated per op). Broker-level ops carry `None` as their queue.

Everything that reads ops takes its knowledge from `OPS`:

* replay (broker/replay.py) binds one apply function per queue-level code
  and refuses to import if one is missing;
* the store (broker/store.py) asks `DIRTY` which checkpoint rows an op
  touches;
* handoff catch-up (broker/handoff.py) asks `job_id` which job to re-index;
* a test parses every emitting site and checks its code is defined here and
  round-trips through replay (tests/unit/test_redo.py).

`Touch` says what an op changes, for the checkpoint: one job row (its id in
field 2, or in the record of an add), a list of tombstone rows, a whole
queue (gone), a list of queues (gone), or only the queue's meta / the
broker's state (nothing row-level).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Level(Enum):
    JOB = "job"  # changes one job (its row is rewritten at the next checkpoint)
    QUEUE = "queue"  # changes the queue's meta, or several jobs at once
    BROKER = "broker"  # ownership, handoff staging, leases (queue field is None)


class Touch(Enum):
    """Which checkpoint rows an op makes dirty."""

    JOB = "job"  # (queue, op[2])
    ADDED = "added"  # (queue, op[2][0]): the job record's id
    TOMBSTONES = "tombstones"  # (queue, id) for id in op[2]
    QUEUE_GONE = "queue-gone"  # every row of op[1]
    QUEUES_GONE = "queues-gone"  # every row of each queue in op[2]
    META = "meta"  # none: the queue meta or broker state is checkpointed whole


@dataclass(frozen=True, slots=True)
class OpSpec:
    code: str
    fields: tuple[str, ...]  # after (code, queue)
    level: Level
    touch: Touch
    doc: str


def _op(code: str, fields: str, level: Level, touch: Touch, doc: str) -> OpSpec:
    return OpSpec(code, tuple(fields.split()), level, touch, doc)


J, Q, B = Level.JOB, Level.QUEUE, Level.BROKER
_REQUEUE = "state delay_until attempts_made stalled_count order reason"

OPS: dict[str, OpSpec] = {s.code: s for s in (
    # -- a job's life (broker/queue.py)
    _op("A", "record", J, Touch.ADDED, "add: the full job record"),
    _op("L", "id token lock_until attempts_started processed_on", J, Touch.JOB,
        "activate: handed to a worker under a lock"),
    _op("E", "id lock_until", J, Touch.JOB, "extend the lock"),
    _op("C", "id result finished_on attempts_made order", J, Touch.JOB, "complete"),
    _op("F", "id reason finished_on attempts_made stalled stalled_count order", J, Touch.JOB,
        "fail for good"),
    _op("W", "id " + _REQUEUE, J, Touch.JOB, "retry: back to waiting or delayed"),
    _op("S", "id " + _REQUEUE, J, Touch.JOB, "stalled: its lock ran out"),
    _op("D", "id " + _REQUEUE, J, Touch.JOB, "a delayed job came due"),
    _op("P", "id progress", J, Touch.JOB, "progress"),
    _op("R", "id removed_at", J, Touch.JOB, "removed (a dedup tombstone is kept)"),
    _op("T", "ids", Q, Touch.TOMBSTONES, "tombstones expired"),
    _op("aL", "id index line", J, Touch.JOB, "job log line number `index`"),
    _op("aQ", "id dlq_reason", J, Touch.JOB, "into the DLQ (just before its F)"),
    _op("aR", "id order", J, Touch.JOB,
        "out of the DLQ: waiting again, attempts, stalls and TTL reset"),
    # -- job management (broker/jobadmin.py)
    _op("jU", "id fields", J, Touch.JOB,
        "fields of one job set, absolute: {field: value} (a retry, a promotion, new "
        "data, priority, delay, or attempts for a discard)"),
    _op("jK", "retention", Q, Touch.META,
        "the queue's retention {completed: n|None, failed: n|None} (None: broker default)"),
    # -- the queue (broker/queue.py, broker/limits.py)
    _op("M", "meta", Q, Touch.META, "queue meta: {paused}"),
    _op("X", "", Q, Touch.QUEUE_GONE, "obliterate"),
    _op("SU", "scheduler", Q, Touch.META, "job scheduler upsert"),
    _op("SR", "scheduler_id", Q, Touch.META, "job scheduler removed"),
    _op("SN", "scheduler_id next_tick_ms", Q, Touch.META, "job scheduler advanced"),
    _op("bR", "rate", Q, Touch.META, "queue rate limit [max, per_ms], or None to clear"),
    _op("bG", "group settings", Q, Touch.META,
        "a group's settings, absolute: {concurrency?, paused?, rate?} or None"),
    _op("bS", "now windows", Q, Touch.META,
        "starts noted in rate windows {key: [n, per_ms]} ('' queue, 'g:<group>', 't')"),
    _op("bT", "tenant", Q, Touch.META, "the queue's cluster-wide tenant, or None"),
    # -- flows (broker/flowqueue.py)
    _op("cO", "child_id entry", Q, Touch.META,
        "a finished child's outbox entry: [parent queue, parent id, flow id, key, ok, "
        "value, ignore]"),
    _op("cX", "child_id", Q, Touch.META, "outbox entry delivered"),
    _op("cD", "id child_key value", J, Touch.JOB, "a child's result on its parent"),
    _op("cR", "id " + _REQUEUE, J, Touch.JOB, "a parent released to waiting by its children"),
    # -- the broker (broker/engine.py, broker/handoff.py, broker/tenants.py)
    _op("O", "state", B, Touch.META,
        "ownership, freezes, imports, term; merged into the last (a record without "
        "'topology' keeps the last map logged)"),
    _op("SC", "move_id chunks", B, Touch.META, "a handoff's copy chunks, into staging"),
    _op("SO", "move_id ops", B, Touch.META, "a handoff's catch-up ops, into staging"),
    _op("SX", "move_id", B, Touch.META, "a retried copy: staging starts over"),
    _op("I", "move_id", B, Touch.META, "activation: staging becomes live"),
    _op("AB", "move_id", B, Touch.META, "an aborted import: staging dropped"),
    _op("G", "queues", B, Touch.QUEUES_GONE, "queues handed off: dropped"),
    _op("bL", "leases", B, Touch.META, "tenant leases from the coordinator"),
    # -- a follower's copy of a primary (broker/follower.py, docs/design.md §12)
    _op("RC", "reset chunks", B, Touch.META,
        "a primary's snapshot chunks, applied straight to the replica's queues; "
        "reset: the replica starts over first"),
)}

QUEUE_CODES = frozenset(c for c, s in OPS.items() if s.level is not Level.BROKER)
BROKER_CODES = frozenset(c for c, s in OPS.items() if s.level is Level.BROKER)
# Looked up once per logged op by the store: a dict of enums, not attribute chains.
DIRTY: dict[str, Touch] = {c: s.touch for c, s in OPS.items()}
_JOB_ID_AT_2 = frozenset(c for c, s in OPS.items() if s.touch is Touch.JOB)


def job_id(op: Any) -> str | None:
    """The id of the one job a queue op changes, or None (queue-level ops)."""
    code = op[0]
    if code == "A":
        return str(op[2][0])
    return str(op[2]) if code in _JOB_ID_AT_2 else None


def arity(code: str) -> int:
    """The length of a well-formed op tuple with this code."""
    return 2 + len(OPS[code].fields)
