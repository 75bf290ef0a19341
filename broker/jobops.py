"""Wire handlers of job management (shardq/protocol.py "Job management"):
decode and check arguments, run broker/jobadmin.py, wake what the change
freed. Merged into broker/ops.py's op table like broker/flows.py's."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardq import protocol as p
from shardq.broker import validate as v
from shardq.broker.job import COMPLETED, FAILED
from shardq.broker.jobadmin import CLEAN_STATES, LIST_STATES, MAX_TOUCH
from shardq.broker.queue import QueueState
from shardq.broker.replies import Durability, OpSpec, table
from shardq.errors import BadRequestError, ServerError, TooLargeError

if TYPE_CHECKING:
    from shardq.broker.commitlog import Sink
    from shardq.broker.engine import Broker

PRIORITY_MAX = 2**31 - 1
DELAY_MAX_MS = 10 * 365 * 86_400_000


def _queue(b: Broker, args: Any) -> QueueState:
    return b.queue_for(v.queue_name(v.arg(args, "queue", str)))


def _states(args: Any, default: tuple[str, ...]) -> list[str]:
    states = v.arg(args, "states", list, None)
    if states is None:
        return list(default)
    if not states or not all(isinstance(s, str) and s in LIST_STATES for s in states):
        raise BadRequestError(f"states must be a non-empty list of {', '.join(LIST_STATES)}")
    return list(dict.fromkeys(states))


def _count(args: Any, key: str = "count") -> int:
    """A request's bound on jobs touched: nil means as many as one request may."""
    n = v.arg(args, key, int, None)
    return MAX_TOUCH if n is None else min(v.non_neg_int(n, key), MAX_TOUCH)


def _woke(b: Broker, q: QueueState) -> None:
    """Jobs may have become waiting or delayed: arm timers, serve parked pulls."""
    b.arm(q)
    if q.name in b.waiters:
        b.serve_waiters(q.name)


def op_get_jobs(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = _queue(b, args)
    states = _states(args, LIST_STATES)
    start = v.non_neg_int(v.arg(args, "start", int, 0), "start")
    end = v.arg(args, "end", int, -1)
    if end < -1:
        raise BadRequestError("end must be -1 (to the last job) or an index >= 0")
    asc = v.arg(args, "asc", bool, False)
    page, total = q.list_jobs(states, start, end, asc)
    return {"jobs": [j.to_public() for _, j in page], "keys": [list(k) for k, _ in page],
            "total": total}


def op_job_counts(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = _queue(b, args)
    out: dict[str, Any] = dict(q.job_counts(_states(args, LIST_STATES)))
    out["completed_total"] = q.counters.get(COMPLETED, 0)
    out["failed_total"] = q.counters.get(FAILED, 0)
    return out


ActionFn = Callable[["Broker", QueueState, str, Any], None]


def _data(b: Broker, q: QueueState, jid: str, arg: Any) -> None:
    if not isinstance(arg, bytes):
        raise BadRequestError("update_data takes the data as msgpack bytes")
    if len(arg) > b.config.max_job_data:
        raise TooLargeError(f"job data over {b.config.max_job_data} bytes")
    q.update_job_data(jid, arg)


def _priority(b: Broker, q: QueueState, jid: str, arg: Any) -> None:
    v.non_neg_int(arg, "priority")
    if arg > PRIORITY_MAX:
        raise BadRequestError(f"priority must be at most {PRIORITY_MAX}")
    q.change_job_priority(jid, arg)


def _delay(b: Broker, q: QueueState, jid: str, arg: Any) -> None:
    v.non_neg_int(arg, "delay")
    if arg > DELAY_MAX_MS:
        raise BadRequestError(f"delay must be at most {DELAY_MAX_MS} ms")
    q.change_job_delay(jid, arg, b.clock())


def _remove(b: Broker, q: QueueState, jid: str, arg: Any) -> None:
    q.remove_job(jid, b.clock())
    if q.outbox:
        b.flows.kick()  # a flow child removed: its parent counts it done


ACTIONS: dict[str, ActionFn] = {
    "retry": lambda b, q, jid, arg: q.retry_job(jid),
    "remove": _remove,
    "promote": lambda b, q, jid, arg: q.promote_job(jid),
    "update_data": _data,
    "priority": _priority,
    "delay": _delay,
    "discard": lambda b, q, jid, arg: q.discard_job(jid),
}


def op_job_actions(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    items = v.arg(args, "items", list)
    out: list[Any] = []
    touched: dict[str, QueueState] = {}
    for it in items:
        try:
            if (not isinstance(it, list) or len(it) != 4 or not isinstance(it[1], str)
                    or not isinstance(it[2], str)):
                raise BadRequestError("item must be [queue, id, action, arg]")
            fn = ACTIONS.get(it[2])
            if fn is None:
                raise BadRequestError(f"unknown job action {it[2]!r}; one of "
                                      f"{', '.join(ACTIONS)}")
            q = b.queue_for(v.queue_name(it[0]))
            fn(b, q, it[1], it[3])
            touched[q.name] = q
            out.append(None)
        except ServerError as exc:
            out.append(exc.to_item())
    for q in touched.values():
        _woke(b, q)
    return out


def op_retry_jobs(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = _queue(b, args)
    state = v.arg(args, "state", str, FAILED)
    n = q.retry_jobs(state, _count(args))
    if n:
        _woke(b, q)
    return n


def op_promote_jobs(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = _queue(b, args)
    n = q.promote_jobs(_count(args))
    if n:
        _woke(b, q)
    return n


def op_clean(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = _queue(b, args)
    grace = v.non_neg_int(v.arg(args, "grace_ms", int), "grace_ms")
    state = v.arg(args, "state", str)
    if state not in CLEAN_STATES:
        raise BadRequestError(f"clean state must be one of {', '.join(CLEAN_STATES)}")
    n = q.clean(grace, _count(args, "limit"), state, b.clock())
    if n and q.outbox:
        b.flows.kick()
    return n


def _keep(args: Any, key: str, now: int | None) -> int | None:
    """nil: unchanged (`now`, the setting in force); -1: the broker default."""
    val = v.arg(args, key, int, None)
    if val is None:
        return now
    if val == -1:
        return None
    return v.non_neg_int(val, key)


def op_set_retention(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = _queue(b, args)
    removed = q.set_retention(_keep(args, "keep_completed", q.keep[COMPLETED]),
                              _keep(args, "keep_failed", q.keep[FAILED]), b.clock())
    return {"keep_completed": q.keep_for(COMPLETED), "keep_failed": q.keep_for(FAILED),
            "removed": removed}


# This module's part of the op table (broker/ops.py).
OPS: dict[str, OpSpec] = {
    **table(Durability.READ, {p.GET_JOBS: op_get_jobs, p.JOB_COUNTS: op_job_counts}),
    **table(Durability.DURABLE, {
        p.JOB_ACTIONS: op_job_actions, p.RETRY_JOBS: op_retry_jobs,
        p.PROMOTE_JOBS: op_promote_jobs, p.CLEAN: op_clean, p.SET_RETENTION: op_set_retention}),
}
