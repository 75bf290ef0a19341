"""The job record, its states, and its persisted form.

A `Job` is a slotted object; its persisted form is a flat list in the
order of `FIELDS` (stored in the `jobs` table and in redo-log `A` ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

WAITING = "waiting"
DELAYED = "delayed"
ACTIVE = "active"
COMPLETED = "completed"
FAILED = "failed"
STATES = (WAITING, DELAYED, ACTIVE, COMPLETED, FAILED)
# Flows (broker/flowqueue.py): a child written but not yet committed, and a
# parent waiting for its children. Neither is ever handed to a worker.
PENDING = "pending"
WAITING_CHILDREN = "waiting-children"

FIELDS = (
    "id", "name", "data", "state", "priority", "attempts", "backoff", "timestamp",
    "delay_until", "attempts_made", "attempts_started", "stalled_count", "progress",
    "result", "failed_reason", "processed_on", "finished_on", "token", "lock_until",
    "order", "remove_on_complete", "remove_on_fail",
    "timeout_ms", "expires_at", "dlq_reason", "logs", "parent", "children", "group",
    "trace", "stacktrace",
)
RECORD_VERSION = 1

# Job logs (`job.log(line)`): the last MAX_LOG_LINES lines of a job are kept,
# each cut to MAX_LOG_LINE characters (a bound per job, like BullMQ's keepLogs).
MAX_LOG_LINES = 1000
MAX_LOG_LINE = 2000

# Failed attempts' stack traces (`job.stacktrace`, BullMQ's): the last
# STACKTRACE_LIMIT attempts are kept, each its last STACKTRACE_MAX characters
# (the tail holds the raising frame and the message).
STACKTRACE_LIMIT = 5
STACKTRACE_MAX = 8192


@dataclass(slots=True, eq=False)
class Job:
    id: str
    name: str
    data: bytes
    state: str
    priority: int
    attempts: int
    backoff: list[Any] | None  # [kind, delay_ms] with kind "fixed" | "exponential"
    timestamp: int
    delay_until: int = 0
    attempts_made: int = 0
    attempts_started: int = 0
    stalled_count: int = 0
    progress: Any = None
    result: bytes | None = None
    failed_reason: str | None = None
    processed_on: int = 0
    finished_on: int = 0
    token: int = 0
    lock_until: int = 0
    order: int = 0  # FIFO position among equal priorities
    remove_on_complete: int = -1  # -1: queue default; 0: remove at once; n: keep the last n
    remove_on_fail: int = -1
    timeout_ms: int = 0  # attempt timeout the worker enforces; 0: none
    expires_at: int = 0  # TTL deadline (ms): never handed out at or after it; 0: none
    dlq_reason: str | None = None  # set while the job is in the dead-letter queue
    # [lines ever logged, then the last MAX_LOG_LINES lines]: one value, replaced
    # (never changed in place) at each line, so a checkpoint reading it from
    # another thread sees the count and the lines of one instant.
    logs: list[Any] | None = None
    # A flow child: [parent queue, parent id, flow id, creation deadline ms,
    # ignore_failure]. A flow parent: [flow id, child count, {child key:
    # result}] (see broker/flowqueue.py).
    parent: list[Any] | None = None
    children: list[Any] | None = None
    group: str | None = None  # groups are served round-robin (docs/design.md §11)
    trace: dict[str, str] | None = None  # the adder's trace context (client/tracing.py)
    # The last STACKTRACE_LIMIT failed attempts' stack traces, oldest first; the
    # field is last so records stored before it load (as None).
    stacktrace: list[str] | None = None

    def __lt__(self, other: Job) -> bool:
        # Heap entries end with the job; two entries for one job with equal
        # keys (a replayed handoff op can push one again) must not compare it.
        return False

    def to_record(self) -> list[Any]:
        return [
            self.id, self.name, self.data, self.state, self.priority, self.attempts,
            self.backoff, self.timestamp, self.delay_until, self.attempts_made,
            self.attempts_started, self.stalled_count, self.progress, self.result,
            self.failed_reason, self.processed_on, self.finished_on, self.token,
            self.lock_until, self.order, self.remove_on_complete, self.remove_on_fail,
            self.timeout_ms, self.expires_at, self.dlq_reason, self.logs,
            self.parent, self.children,
            self.group, self.trace, self.stacktrace,
        ]

    @classmethod
    def from_record(cls, rec: list[Any]) -> Job:
        return cls(*rec)

    def to_public(self) -> dict[str, Any]:
        """The `get_job` dict (docs/design.md §10); data and result stay packed bytes."""
        out = {
            "id": self.id, "name": self.name, "data": self.data, "state": self.state,
            "priority": self.priority, "attempts": self.attempts,
            "attempts_made": self.attempts_made, "attempts_started": self.attempts_started,
            "stalled_count": self.stalled_count, "progress": self.progress,
            "result": self.result, "failed_reason": self.failed_reason,
            "timestamp": self.timestamp, "processed_on": self.processed_on or None,
            "finished_on": self.finished_on or None,
            "delay_ms": max(0, self.delay_until - self.timestamp) if self.delay_until else 0,
            "dlq": self.dlq_reason is not None,
            "group": self.group,
            "stacktrace": list(self.stacktrace or ()),
        }
        if self.parent is not None:
            out["parent"] = {"queue": self.parent[0], "id": self.parent[1],
                             "flow": self.parent[2]}
        if self.children is not None:
            out["children"] = {"flow": self.children[0], "total": self.children[1],
                               "done": len(self.children[2])}
        return out


def backoff_delay(backoff: list[Any] | None, attempts_made: int) -> int:
    """Delay before the next try after `attempts_made` finished attempts."""
    if not backoff:
        return 0
    kind, delay = backoff[0], int(backoff[1])
    if kind == "exponential":
        return int(delay * (2 ** max(0, attempts_made - 1)))
    return delay
