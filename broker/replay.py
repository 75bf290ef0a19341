"""Recovery: apply redo-log ops (their schema: broker/redo.py) to queue images.

Job fields in ops are absolute, so applying every op after the checkpointed
seq over job rows that may be *newer* than that seq (a checkpoint that was
cut short, or rows read while they changed) still ends in the true state.
Queue meta (counters, seq, paused) is checkpointed atomically with the seq,
so its counter effects are re-derived from the op codes alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardq.broker import redo
from shardq.broker.job import ACTIVE, COMPLETED, FAILED, Job
from shardq.broker.jobadmin import set_fields
from shardq.broker.limits import note_runs
from shardq.broker.queue import append_log, dlq_reset


@dataclass(slots=True)
class QueueImage:
    """A queue's persisted state, before indexes are built."""

    meta: dict[str, Any] = field(default_factory=lambda: {
        "paused": False, "seq": 0, "order": 0,
        "counters": {"added": 0, "completed": 0, "failed": 0, "retried": 0, "stalled": 0}})
    jobs: dict[str, Job] = field(default_factory=dict)
    tombstones: dict[str, int] = field(default_factory=dict)


Images = dict[str, QueueImage]


def _count(img: QueueImage, name: str) -> None:
    img.meta["counters"][name] = img.meta["counters"].get(name, 0) + 1


def _raise_order(img: QueueImage, order: int) -> None:
    if order > img.meta.get("order", 0):
        img.meta["order"] = order


def _add(img: QueueImage, op: list[Any]) -> None:
    job = Job.from_record(list(op[2]))
    img.jobs[job.id] = job
    img.tombstones.pop(job.id, None)
    img.meta["order"] = max(img.meta.get("order", 0), job.order)
    _count(img, "added")


def _lock(img: QueueImage, op: list[Any]) -> None:
    job = img.jobs.get(op[2])
    if job is not None:
        job.state, job.token, job.lock_until, job.attempts_started, job.processed_on = (
            ACTIVE, op[3], op[4], op[5], op[6])


def _extend(img: QueueImage, op: list[Any]) -> None:
    job = img.jobs.get(op[2])
    if job is not None:
        job.lock_until = op[3]


def _complete(img: QueueImage, op: list[Any]) -> None:
    _count(img, "completed")
    _raise_order(img, op[6])
    job = img.jobs.get(op[2])
    if job is not None:
        job.state, job.result, job.finished_on, job.attempts_made, job.token, job.order = (
            COMPLETED, op[3], op[4], op[5], 0, op[6])


def _fail(img: QueueImage, op: list[Any]) -> None:
    _count(img, "failed")
    if op[6]:
        _count(img, "stalled")
    _raise_order(img, op[8])
    job = img.jobs.get(op[2])
    if job is not None:
        (job.state, job.failed_reason, job.finished_on, job.attempts_made, job.token,
         job.stalled_count, job.order) = (FAILED, op[3], op[4], op[5], 0, op[7], op[8])


def _requeue(img: QueueImage, op: list[Any]) -> None:
    if op[0] == "W":
        _count(img, "retried")
    elif op[0] == "S":
        _count(img, "stalled")
    _raise_order(img, op[7])
    job = img.jobs.get(op[2])
    if job is not None:
        (job.state, job.delay_until, job.attempts_made, job.stalled_count, job.order,
         job.failed_reason) = op[3:9]
        job.token = 0


def _progress(img: QueueImage, op: list[Any]) -> None:
    job = img.jobs.get(op[2])
    if job is not None:
        job.progress = op[3]


def _remove(img: QueueImage, op: list[Any]) -> None:
    img.jobs.pop(op[2], None)
    img.tombstones[op[2]] = op[3]


def _expire(img: QueueImage, op: list[Any]) -> None:
    for jid in op[2]:
        img.tombstones.pop(jid, None)


def _meta(img: QueueImage, op: list[Any]) -> None:
    img.meta["paused"] = bool(op[2].get("paused", False))


def _obliterate(img: QueueImage, op: list[Any]) -> None:
    img.jobs.clear()
    img.tombstones.clear()
    img.meta["paused"] = False
    img.meta["schedulers"] = {}
    img.meta.pop("outbox", None)
    img.meta["counters"] = dict.fromkeys(img.meta["counters"], 0)
    for key in ("rate", "groups", "win", "keep"):  # the tenant stays: the coordinator set it
        img.meta.pop(key, None)


def _sched_upsert(img: QueueImage, op: list[Any]) -> None:
    img.meta.setdefault("schedulers", {})[op[2]["id"]] = dict(op[2])


def _sched_remove(img: QueueImage, op: list[Any]) -> None:
    img.meta.setdefault("schedulers", {}).pop(op[2], None)


def _sched_next(img: QueueImage, op: list[Any]) -> None:
    s = img.meta.setdefault("schedulers", {}).get(op[2])
    if s is not None:
        s["next_tick_ms"] = op[3]


def _log_line(img: QueueImage, op: list[Any]) -> None:
    job = img.jobs.get(op[2])
    if job is not None:
        append_log(job, op[3], op[4])


def _dlq_in(img: QueueImage, op: list[Any]) -> None:
    job = img.jobs.get(op[2])
    if job is not None:
        job.dlq_reason = op[3]


def _dlq_retry(img: QueueImage, op: list[Any]) -> None:
    _raise_order(img, op[3])
    job = img.jobs.get(op[2])
    if job is not None:
        dlq_reset(job, op[3])


def _outbox_put(img: QueueImage, op: list[Any]) -> None:
    img.meta.setdefault("outbox", {})[op[2]] = list(op[3])


def _outbox_done(img: QueueImage, op: list[Any]) -> None:
    outbox = img.meta.get("outbox")
    if outbox is not None:
        outbox.pop(op[2], None)
        if not outbox:
            del img.meta["outbox"]


def _child_done(img: QueueImage, op: list[Any]) -> None:
    job = img.jobs.get(op[2])
    if job is not None and job.children is not None:
        job.children[2][op[3]] = op[4]


def _windows(img: QueueImage) -> dict[str, list[list[int]]]:
    win: dict[str, list[list[int]]] = img.meta.setdefault("win", {})
    return win


def _rate_limit(img: QueueImage, op: list[Any]) -> None:
    if op[2]:
        img.meta["rate"] = list(op[2])
    else:
        img.meta.pop("rate", None)
        _windows(img).pop("", None)


def _group_set(img: QueueImage, op: list[Any]) -> None:
    groups = img.meta.setdefault("groups", {})
    if op[3]:
        groups[op[2]] = dict(op[3])
    else:
        groups.pop(op[2], None)
    if not op[3] or "rate" not in op[3]:
        _windows(img).pop("g:" + op[2], None)


def _starts(img: QueueImage, op: list[Any]) -> None:
    win = _windows(img)
    for key, (n, per_ms) in op[3].items():
        note_runs(win.setdefault(key, []), op[2], n, per_ms)


def _tenant(img: QueueImage, op: list[Any]) -> None:
    if op[2] is None:
        img.meta.pop("tenant", None)
        _windows(img).pop("t", None)
    else:
        img.meta["tenant"] = op[2]


def _set_fields(img: QueueImage, op: list[Any]) -> None:
    order = op[3].get("order")
    if order is not None:
        _raise_order(img, order)
    job = img.jobs.get(op[2])
    if job is not None:
        set_fields(job, op[3])


def _retention(img: QueueImage, op: list[Any]) -> None:
    keep = {k: v for k, v in op[2].items() if v is not None}
    if keep:
        img.meta["keep"] = keep
    else:
        img.meta.pop("keep", None)


_APPLY: dict[str, Callable[[QueueImage, list[Any]], None]] = {
    "jU": _set_fields, "jK": _retention,
    "aL": _log_line, "aQ": _dlq_in, "aR": _dlq_retry,
    "bR": _rate_limit, "bG": _group_set, "bS": _starts, "bT": _tenant,
    "SU": _sched_upsert, "SR": _sched_remove, "SN": _sched_next,
    "cO": _outbox_put, "cX": _outbox_done, "cD": _child_done, "cR": _requeue,
    "A": _add, "L": _lock, "E": _extend, "C": _complete, "F": _fail,
    "W": _requeue, "S": _requeue, "D": _requeue, "P": _progress, "R": _remove,
    "T": _expire, "M": _meta, "X": _obliterate,
}
# The schema and the appliers agree, or the broker does not start: an op it
# could log but not replay would fail every restart after the first.
if set(_APPLY) != redo.QUEUE_CODES:
    raise ImportError(f"redo schema and replay disagree: {sorted(set(_APPLY) ^ redo.QUEUE_CODES)}")

QUEUE_OPS = redo.QUEUE_CODES


def apply_chunk(images: Images, chunk: dict[str, Any]) -> None:
    """Apply one `QueueState.export_chunks` chunk (a handoff's copy step)."""
    if chunk.get("v") != 1:
        raise ValueError(f"unsupported export version {chunk.get('v')!r}")
    img = images.get(chunk["queue"])
    if img is None:
        img = images[chunk["queue"]] = QueueImage()
    kind = chunk["kind"]
    if kind == "meta":
        img.meta = copy.deepcopy(chunk["meta"])  # never share a frame's dicts
    elif kind == "jobs":
        for rec in chunk["jobs"]:
            job = Job.from_record(list(rec))
            img.jobs[job.id] = job
    elif kind == "tombstones":
        for jid, ts in chunk["tombstones"]:
            img.tombstones[jid] = ts
    else:
        raise ValueError(f"unknown export chunk kind {kind!r}")


def apply_broker_op(images: Images, broker_state: dict[str, Any],
                    staging: dict[str, Images], op: list[Any]) -> None:
    """Apply a broker-level op (`redo.BROKER_CODES`; its second element is None)."""
    code = op[0]
    if code == "O":
        broker_state.update(op[2])
    elif code == "SC":
        stage = staging.setdefault(op[2], {})
        for chunk in op[3]:
            apply_chunk(stage, chunk)
    elif code == "SO":
        stage = staging.setdefault(op[2], {})
        for sub in op[3]:
            apply_op(stage, sub)
    elif code == "I":
        images.update(staging.pop(op[2], {}))
    elif code in ("AB", "SX"):  # aborted, or a copy that starts over
        staging.pop(op[2], None)
    elif code == "G":
        for name in op[2]:
            images.pop(name, None)
    elif code == "bL":
        broker_state["tenants"] = op[2]
    elif code == "RC":
        _replica_chunks(images, staging, op)
    else:
        raise ValueError(f"unknown broker op {code!r}")


def _replica_chunks(images: Images, staging: dict[str, Images], op: list[Any]) -> None:
    """A follower's copy of a primary (broker/follower.py): snapshot chunks."""
    if op[2]:  # the copy starts over
        images.clear()
        staging.clear()
    for chunk in op[3]:
        apply_chunk(images, chunk)


op_job_id = redo.job_id


def apply_op(images: Images, op: list[Any]) -> None:
    """Apply one queue op; broker-level ops are handled by the caller."""
    img = images.get(op[1])
    if img is None:
        img = images[op[1]] = QueueImage()
    img.meta["seq"] = img.meta.get("seq", 0) + 1
    _APPLY[op[0]](img, op)
