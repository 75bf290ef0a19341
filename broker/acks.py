"""Recently consumed lock tokens, so a resent ACK/FAIL answers as the first did.

A worker that times out waiting for an ack's reply resends it. If the first
copy was applied, the job is no longer active under that token and the
resend would be answered `LOCK_LOST` ("result dropped") for a job that in
fact completed. The broker remembers, for each token an ACK or FAIL
consumed, which job it finished; a repeat of it with the same token is
answered `ok` (both ops answer nil when they succeed), and changes nothing.

What is remembered and for how long is bounded: the last `capacity` tokens
(about 120 bytes each), and none older than `ttl_ms` (a resend comes within
a request timeout, seconds). Memory only: a restart or a handoff between
the first copy and the resend makes the resend `LOCK_LOST` as before, and
the job's state (`get_job`) stays the authority.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_CAPACITY = 100_000
DEFAULT_TTL_MS = 10 * 60 * 1000


class RecentFinishes:
    """token -> (queue, job id, when): O(1) to record and to look up."""

    __slots__ = ("_capacity", "_clock", "_entries", "_ttl_ms")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, ttl_ms: int = DEFAULT_TTL_MS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._ttl_ms = ttl_ms
        self._clock = clock  # monotonic: a wall-clock step neither keeps nor drops entries
        self._entries: OrderedDict[int, tuple[str, str, int]] = OrderedDict()

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def record(self, queue: str, job_id: str, token: int) -> None:
        now = self._now()
        entries = self._entries
        entries[token] = (queue, job_id, now)
        # Oldest first: drop past the capacity and past the age, a few per call.
        while len(entries) > self._capacity:
            entries.popitem(last=False)
        for _ in range(2):
            oldest = next(iter(entries.values()))
            if now - oldest[2] <= self._ttl_ms:
                break
            entries.popitem(last=False)

    def finished(self, queue: str, job_id: str, token: int) -> bool:
        """True when `token` already finished this job (recently)."""
        hit = self._entries.get(token)
        return hit is not None and hit[0] == queue and hit[1] == job_id \
            and self._now() - hit[2] <= self._ttl_ms

    def __len__(self) -> int:
        return len(self._entries)
