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

FIELDS = (
    "id", "name", "data", "state", "priority", "attempts", "backoff", "timestamp",
    "delay_until", "attempts_made", "attempts_started", "stalled_count", "progress",
    "result", "failed_reason", "processed_on", "finished_on", "token", "lock_until",
    "order", "remove_on_complete", "remove_on_fail", "group",
)
RECORD_VERSION = 1


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
    group: str | None = None  # groups are served round-robin (DESIGN §11)

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
            self.group,
        ]

    @classmethod
    def from_record(cls, rec: list[Any]) -> Job:
        return cls(*rec)

    def to_public(self) -> dict[str, Any]:
        """The `get_job` dict (DESIGN §10); data and result stay packed bytes."""
        return {
            "id": self.id, "name": self.name, "data": self.data, "state": self.state,
            "priority": self.priority, "attempts": self.attempts,
            "attempts_made": self.attempts_made, "attempts_started": self.attempts_started,
            "stalled_count": self.stalled_count, "progress": self.progress,
            "result": self.result, "failed_reason": self.failed_reason,
            "timestamp": self.timestamp, "processed_on": self.processed_on or None,
            "finished_on": self.finished_on or None,
            "delay_ms": max(0, self.delay_until - self.timestamp) if self.delay_until else 0,
            "group": self.group,
        }


def backoff_delay(backoff: list[Any] | None, attempts_made: int) -> int:
    """Delay before the next try after `attempts_made` finished attempts."""
    if not backoff:
        return 0
    kind, delay = backoff[0], int(backoff[1])
    if kind == "exponential":
        return int(delay * (2 ** max(0, attempts_made - 1)))
    return delay
