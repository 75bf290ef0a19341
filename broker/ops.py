"""Op handlers: decode args, run queue logic, build the reply body.

Each handler is `(broker, args, sink, req_id) -> body`. Raising a
ServerError answers that code for the whole request; bulk ops put a
`[code, body]` in the item's place instead. `PARKED` means a long-poll
PULL was parked and will be answered later by the broker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shardq import protocol as p
from shardq.broker import flows, jobops, replies, replops
from shardq.broker import validate as v
from shardq.broker.commitlog import Sink
from shardq.broker.engine import Broker, Waiter
from shardq.broker.queue import LOCK_LOST, NOT_FOUND, QueueState
from shardq.broker.replies import Durability, OpSpec, table
from shardq.errors import (
    BadRequestError,
    LockLostError,
    NotFoundError,
    ServerError,
    ShardqError,
)

log = logging.getLogger("shardq.broker.ops")

PARKED = object()

Handler = Callable[[Broker, Any, Sink, int], Any]


_CODE_BODY = {LOCK_LOST: [LOCK_LOST, "lock token is stale or the lock expired"],
              NOT_FOUND: [NOT_FOUND, "no such job"]}


def op_ping(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return "pong"


def op_add(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    jobs = v.arg(args, "jobs", list)
    b.check_capacity(jobs)
    now = b.clock()
    max_data = b.config.max_job_data
    out: list[Any] = []
    added = 0
    for item in jobs:
        try:
            jid, name, data, opts = v.job_item(item, max_data)
        except ServerError as exc:
            out.append(exc.to_item())
            continue
        if q.add(jid, name, data, opts, now):
            added += 1
        out.append(jid)
    if added:
        b.total_jobs += added
        if q.n_delayed or q.ttls:
            b.arm(q)
        if q.name in b.waiters:
            b.serve_waiters(q.name)
    return out


def _pull_into(b: Broker, queues: list[QueueState], count: int, lock_ms: int,
               out: list[list[Any]]) -> None:
    now = b.clock()
    for q in queues:
        if len(out) >= count:
            break
        if q.pull(count - len(out), lock_ms, now, out) or q.blocked_until:
            b.arm(q)  # a lock deadline, or when a rate limit frees budget


def _pull_limits(args: Any) -> tuple[list[Any], int, int]:
    """(queue names, count, lock_ms) of a PULL or of an ACK's `pull`."""
    names = v.arg(args, "queues", list)
    count = v.non_neg_int(v.arg(args, "count", int, 1), "count", 1)
    lock_ms = v.non_neg_int(v.arg(args, "lock_ms", int, p.DEFAULT_LOCK_MS), "lock_ms", 1)
    return names, min(count, 10_000), lock_ms


def _pull_args(b: Broker, args: Any) -> tuple[list[str], list[QueueState], int, int]:
    names, count, lock_ms = _pull_limits(args)
    if not names:
        raise BadRequestError("queues must be a non-empty list")
    queues = [b.queue_for(v.queue_name(n)) for n in names]
    return names, queues, count, lock_ms


def op_pull(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    names, queues, count, lock_ms = _pull_args(b, args)
    wait_ms = min(v.non_neg_int(v.arg(args, "wait_ms", int, 0), "wait_ms"), p.MAX_WAIT_MS)
    out: list[list[Any]] = []
    _pull_into(b, queues, count, lock_ms, out)
    if out or not wait_ms:
        return out  # LAZY: the locks are committed soon, not waited on
    b.park(Waiter(sink, req_id, names, count, lock_ms), wait_ms)
    return PARKED


Finisher = Callable[[Broker, QueueState, list[Any], int], "str | None"]


def _finish_items(b: Broker, args: Any, finish: Finisher) -> list[Any]:
    items = v.item_list(args)
    now = b.clock()
    out: list[Any] = []
    for it in items:
        try:
            q = b.queue_for(v.queue_name(it[0]))
            if not isinstance(it[1], str):
                raise BadRequestError("job id must be a string")
            v.token(it[2])
            err = finish(b, q, it, now)
        except ServerError as exc:
            out.append(exc.to_item())
            continue
        out.append(None if err is None else _CODE_BODY[err])
    return out


def _ack(b: Broker, q: QueueState, it: list[Any], now: int) -> str | None:
    result = it[3] if len(it) > 3 else None
    if result is not None and not isinstance(result, bytes):
        raise BadRequestError("result must be msgpack bytes or nil")
    err = q.ack(it[1], it[2], result, now)
    if err is not None:
        return _repeat_of_finish(b, q, it, err)
    b.finishes.record(q.name, it[1], it[2])
    if b.commits.journaling:
        b.commits.journal_lines.append(f"{q.name}\t{it[1]}\t{it[2]}\n")
    if q.outbox:
        b.flows.kick()  # a flow child completed: tell its parent
    if q.wake:  # a group's concurrency freed: parked pulls may take its jobs
        q.wake = False
        if q.name in b.waiters:
            b.serve_waiters(q.name)
    return err


def _repeat_of_finish(b: Broker, q: QueueState, it: list[Any], err: str) -> str | None:
    """A resent ACK/FAIL whose first copy was applied answers as that one did
    (ok), instead of LOCK_LOST, or NOT_FOUND once retention removed the job
    (broker/acks.py)."""
    if err in (LOCK_LOST, NOT_FOUND) and b.finishes.finished(q.name, it[1], it[2]):
        return None
    return err


def _fail(b: Broker, q: QueueState, it: list[Any], now: int) -> str | None:
    reason = it[3] if len(it) > 3 else ""
    if not isinstance(reason, str):
        raise BadRequestError("failure reason must be a string")
    stack = it[4] if len(it) > 4 else None  # optional: the attempt's stack trace
    if stack is not None and not isinstance(stack, str):
        raise BadRequestError("stack trace must be a string or nil")
    err = q.fail(it[1], it[2], reason[:4096], now)
    if err is not None:
        return _repeat_of_finish(b, q, it, err)
    if stack:
        q.note_stacktrace(it[1], stack)
    b.finishes.record(q.name, it[1], it[2])
    b.arm(q)
    if q.outbox:
        b.flows.kick()
    return err


def op_ack(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    acks = _finish_items(b, args, _ack)
    pull = args.get("pull")
    if pull is None:
        return acks
    # The acks above are applied: the refill must not turn this reply into an
    # error (a resent ack would then be refused), so it skips queues this
    # broker does not serve right now (moved, frozen) and never raises.
    jobs: list[list[Any]] = []
    try:
        names, count, lock_ms = _pull_limits(pull)
    except ServerError:
        return {"acks": acks, "jobs": jobs}
    queues = []
    for name in names:
        try:
            queues.append(b.queue_for(v.queue_name(name)))
        except ServerError:
            continue
    _pull_into(b, queues, count, lock_ms, jobs)
    return {"acks": acks, "jobs": jobs}


def op_fail(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    out = _finish_items(b, args, _fail)
    for name in {it[0] for it in args["items"] if isinstance(it[0], str)}:
        if name in b.waiters:
            b.serve_waiters(name)
    return out


def _extend(b: Broker, q: QueueState, it: list[Any], now: int) -> str | None:
    lock_ms = it[3] if len(it) > 3 else p.DEFAULT_LOCK_MS
    v.non_neg_int(lock_ms, "lock_ms", 1)
    return q.extend(it[1], it[2], lock_ms, now)


def op_extend(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return _finish_items(b, args, _extend)


def _job(b: Broker, args: Any) -> tuple[QueueState, str]:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    return q, v.arg(args, "id", str)


def op_progress(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q, jid = _job(b, args)
    err = q.progress(jid, v.token(v.arg(args, "token", int)), args.get("progress"))
    if err == NOT_FOUND:
        raise NotFoundError(f"no job {jid!r} in {q.name!r}")
    if err == LOCK_LOST:
        raise LockLostError("lock token is stale or the lock expired")
    return None


def op_counts(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return b.queue_for(v.queue_name(v.arg(args, "queue", str))).counts()


def op_get_job(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q, jid = _job(b, args)
    job = q.jobs.get(jid)
    return None if job is None else job.to_public()


def op_pause(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    b.queue_for(v.queue_name(v.arg(args, "queue", str))).set_paused(True)
    return None


def op_resume(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    q.set_paused(False)
    if q.name in b.waiters:
        b.serve_waiters(q.name)
    return None


def op_drain(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    return q.drain(bool(args.get("delayed", False)), b.clock())


def op_obliterate(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    b.queue_for(v.queue_name(v.arg(args, "queue", str))).obliterate()
    return None


def op_sched_upsert(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    from shardq.broker import schedule

    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    sid = v.arg(args, "id", str)
    if not sid or len(sid) > v.ID_MAX or ":" in sid:
        raise BadRequestError(f"scheduler id must be 1-{v.ID_MAX} characters without ':'")
    data = v.arg(args, "data", bytes, None)
    if data is not None and len(data) > b.config.max_job_data:
        raise BadRequestError(f"scheduler data over {b.config.max_job_data} bytes")
    spec = schedule.validate(args)
    spec.update(id=sid, name=v.arg(args, "name", str, None) or sid, data=data,
                opts=v.job_opts(args.get("opts")))
    sched = q.upsert_scheduler(spec, b.clock())
    b.arm(q)
    return _public_scheduler(sched)


def _public_scheduler(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s.get(k) for k in ("id", "every_ms", "cron", "tz", "name", "data", "opts",
                                  "next_tick_ms")}


def op_sched_remove(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    return q.remove_scheduler(v.arg(args, "id", str))


def op_sched_list(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    return [_public_scheduler(s) for s in q.schedulers.values()]


# ---------------------------------------------------------------- rate limits, groups
def op_rate_limit(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    q.set_rate_limit(v.rate(args.get("max"), args.get("per_ms")))
    b.serve_waiters(q.name)  # a raised or cleared limit may let parked pulls go
    return q.limits()


def op_group_set(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    group = v.group(v.arg(args, "group", str))
    q.set_group(group, v.group_changes(args))
    b.serve_waiters(q.name)
    return q.limits()["groups"].get(group)


def op_limits(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return b.queue_for(v.queue_name(v.arg(args, "queue", str))).limits()


def op_queues(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return {name: q.counts() for name, q in b.queues.items() if b.owned[q.slot]}


def op_stats(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return b.stats()


def op_topology(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return b.topology.to_dict() if b.topology.epoch else None


# ---------------------------------------------------------------- logs, DLQ, events
def op_log(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q, jid = _job(b, args)
    line = v.arg(args, "line", str)
    err = q.add_log(jid, v.token(v.arg(args, "token", int)), line)
    if err == NOT_FOUND:
        raise NotFoundError(f"no job {jid!r} in {q.name!r}")
    if err == LOCK_LOST:
        raise LockLostError("lock token is stale or the lock expired")
    return None


def op_get_logs(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q, jid = _job(b, args)
    job = q.jobs.get(jid)
    return job.logs[1:] if job is not None and job.logs else []


DLQ_PAGE = 1000


def op_dlq_list(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    offset = v.non_neg_int(v.arg(args, "offset", int, 0), "offset")
    limit = min(v.non_neg_int(v.arg(args, "limit", int, DLQ_PAGE), "limit"), DLQ_PAGE)
    return [{**j.to_public(), "dlq_reason": j.dlq_reason}
            for j in q.dlq_jobs()[offset:offset + limit]]


def op_dlq_retry(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    ids = v.arg(args, "ids", list, None)
    if ids is not None and not all(isinstance(i, str) for i in ids):
        raise BadRequestError("ids must be a list of job ids or nil")
    n = q.dlq_retry(ids, b.clock())
    if n and q.name in b.waiters:
        b.serve_waiters(q.name)
    return n


def op_dlq_purge(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    return q.dlq_purge(b.clock())


def op_subscribe(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    after = v.arg(args, "after_seq", int, None)
    if after is not None:
        v.non_neg_int(after, "after_seq")
    b.events.subscribe(sink, req_id, q, after)
    return PARKED  # answered once durable (broker/events.py)


# ---------------------------------------------------------------- handoffs
def _spawn(b: Broker, sink: Sink, req_id: int, step: str,
           work: Callable[[], Awaitable[Any]]) -> Any:
    """Run a handoff step as a task and answer when it is done (durably)."""
    from shardq.broker.handoff import hit

    async def run() -> None:
        try:
            hit(step, "before")
            t0 = time.perf_counter()
            body = await work()
            log.info("handoff step %s took %.1f ms", step, (time.perf_counter() - t0) * 1e3)
            hit(step, "after")
            data = replies.frame(req_id, body, b.epoch)
        except ServerError as exc:
            data = replies.error_of(req_id, exc, b.epoch)
        except (OSError, ShardqError, TimeoutError) as exc:
            data = replies.error_frame(req_id, "UNAVAILABLE", f"{step}: {exc!r}", b.epoch)
        except Exception as exc:  # a bug costs this step, not the broker
            log.exception("handoff step %s failed", step)
            data = replies.error_frame(req_id, BadRequestError.code, f"{step}: {exc!r}",
                                       b.epoch)
        replies.answer(b, sink, data, Durability.READ)

    b.spawn(run())
    return PARKED


def _handoff(step: str, method: str) -> Handler:
    def handler(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
        if not isinstance(args, dict):
            raise BadRequestError("args must be a map")
        return _spawn(b, sink, req_id, step, lambda: getattr(b.handoff, method)(args))

    return handler


def op_import_chunks(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return b.handoff.import_chunks(v.arg(args, "move_id", str) and args)


def op_import_ops(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return b.handoff.import_ops(v.arg(args, "move_id", str) and args)


def op_handoff_status(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return b.handoff.status(v.arg(args, "move_id", str) and args)


# The op table: every op's handler and what its reply waits for (broker/replies.py).
OPS: dict[str, OpSpec] = {
    **table(Durability.READ, {
        # Handoff steps run as tasks and answer when done; the protocol's own
        # durability points (a freeze is on disk before it is answered, ...)
        # are awaited inside the steps, whatever --fast says (docs/design.md §6).
        p.HANDOFF_PREPARE: _handoff("prepare", "prepare"),
        p.HANDOFF_COPY: _handoff("copy", "copy"),
        p.HANDOFF_FREEZE: _handoff("freeze", "freeze"),
        p.HANDOFF_CATCHUP: _handoff("catchup", "catchup"),
        p.HANDOFF_ACTIVATE: _handoff("activate", "activate"),
        p.HANDOFF_RELEASE: _handoff("cleanup", "release"),
        p.HANDOFF_ABORT: _handoff("abort", "abort"),
        p.PING: op_ping, p.COUNTS: op_counts, p.GET_JOB: op_get_job, p.QUEUES: op_queues,
        p.STATS: op_stats, p.TOPOLOGY: op_topology, p.SCHED_LIST: op_sched_list,
        p.GET_LOGS: op_get_logs, p.DLQ_LIST: op_dlq_list, p.LIMITS: op_limits,
        p.SUBSCRIBE: op_subscribe,  # answered by broker/events.py once durable
    }),
    **table(Durability.LAZY, {p.PULL: op_pull, p.EXTEND: op_extend}),
    **table(Durability.DURABLE, {
        p.ADD: op_add, p.ACK: op_ack, p.FAIL: op_fail, p.PROGRESS: op_progress,
        p.PAUSE: op_pause, p.RESUME: op_resume, p.DRAIN: op_drain,
        p.OBLITERATE: op_obliterate, p.SCHED_UPSERT: op_sched_upsert,
        p.SCHED_REMOVE: op_sched_remove, p.LOG: op_log, p.DLQ_RETRY: op_dlq_retry,
        p.DLQ_PURGE: op_dlq_purge, p.RATE_LIMIT: op_rate_limit, p.GROUP_SET: op_group_set,
        p.IMPORT_CHUNKS: op_import_chunks, p.IMPORT_OPS: op_import_ops,
        p.HANDOFF_STATUS: op_handoff_status,  # an unknown move is recorded aborted first
    }),
    **flows.OPS,
    **jobops.OPS,
    **replops.OPS,  # replication (docs/design.md §12)
}
