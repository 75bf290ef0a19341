"""Retry budgets for one request (docs/design.md §4's "client does" column).

Pure decisions, no sleeping and no I/O: `Budget` is told what went wrong and
answers how long to wait before the resend, whether the topology should be
refreshed first, or raises the error the user sees. The clock is injected
so the budgets are unit-tested without sleeps. The loop that acts on the
decisions (patches, refreshes, sleeps, resends) is retrying.py, the one
every resending caller goes through.

    MOVED        patch, resend; at most `max_redirects` per request; a
                 redirect back to a node already tried refreshes the map
    TRYAGAIN     wait retry_after_ms; refresh after 1 s; past 5 s raise
    BUSY         wait retry_after_ms; past the busy budget raise BusyError
    unreachable  reconnect with backoff; past 5 s raise UnavailableError
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shardq.errors import BusyError, MovedError, TryAgainError, UnavailableError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Budgets, in seconds unless named otherwise."""

    max_redirects: int = 5
    tryagain_budget: float = 5.0
    tryagain_refresh_after: float = 1.0
    busy_budget: float = 5.0
    unavailable_budget: float = 5.0
    backoff_min: float = 0.02
    backoff_max: float = 0.5


@dataclass(slots=True)
class Decision:
    """What to do before the resend."""

    delay: float = 0.0
    refresh: bool = False


@dataclass(slots=True)
class Budget:
    """The retry state of one logical request (all its resends)."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    clock: Callable[[], float] = time.monotonic
    redirects: int = 0
    visited: set[str] = field(default_factory=set)
    tryagain_since: float | None = None
    tryagain_refreshed: bool = False
    busy_since: float | None = None
    down_since: float | None = None
    down_attempts: int = 0
    maybe_applied: bool = False  # some attempt was sent and never answered

    def moved(self, err: MovedError, sent_to: str, stale: bool = False) -> Decision:
        """A MOVED answer from broker `sent_to` (already patched by the caller).

        `stale`: the answer names an owner older than our map's, so the broker
        has not learned the new map yet (it will at its next heartbeat): wait
        and resend to it, within the TRYAGAIN budget, instead of redirecting."""
        if stale:
            return self.tryagain(TryAgainError(
                f"{sent_to} still routes slot {err.slot} by epoch {err.epoch}", 50))
        self.redirects += 1
        if self.redirects > self.policy.max_redirects:
            raise err
        self.visited.add(sent_to)
        # A redirect back to a node we already tried means our patch did not
        # settle it (a chain of stale brokers): fetch the whole map.
        return Decision(refresh=err.owner in self.visited)

    def tryagain(self, err: TryAgainError) -> Decision:
        now = self.clock()
        if self.tryagain_since is None:
            self.tryagain_since = now
        waited = now - self.tryagain_since
        if waited >= self.policy.tryagain_budget:
            raise err
        refresh = False
        if waited >= self.policy.tryagain_refresh_after and not self.tryagain_refreshed:
            self.tryagain_refreshed = refresh = True
        return Decision(delay=_retry_after(err.retry_after_ms, self.policy), refresh=refresh)

    def busy(self, err: BusyError) -> Decision:
        now = self.clock()
        if self.busy_since is None:
            self.busy_since = now
        if now - self.busy_since >= self.policy.busy_budget:
            raise err
        return Decision(delay=_retry_after(err.retry_after_ms, self.policy))

    def unreachable(self, broker: str, exc: BaseException) -> Decision:
        """The connection failed, broke or timed out under the request.

        An error with a true `maybe_applied` (a request sent, then a timeout or
        a lost link) makes the final UnavailableError say the outcome is unknown.
        """
        self.maybe_applied = self.maybe_applied or bool(getattr(exc, "maybe_applied", False))
        now = self.clock()
        if self.down_since is None:
            self.down_since = now
        if now - self.down_since >= self.policy.unavailable_budget:
            raise UnavailableError(broker, str(exc) or type(exc).__name__,
                                   maybe_applied=self.maybe_applied) from exc
        self.down_attempts += 1
        delay = min(self.policy.backoff_min * 2 ** (self.down_attempts - 1),
                    self.policy.backoff_max)
        # The broker may have moved or been replaced: re-read the map.
        return Decision(delay=delay, refresh=True)

    def reached(self) -> None:
        """A reply arrived: the link is fine again (its budget restarts)."""
        self.down_since = None
        self.down_attempts = 0


def _retry_after(ms: int, policy: RetryPolicy) -> float:
    return min(max(ms / 1000.0, 0.001), policy.backoff_max * 4)
