"""The client's one redirect/retry loop (docs/design.md §4, "client does").

Every request the client may resend goes through here: single calls
(`Cluster.call`), bulk rounds (`Cluster.bulk` charges each round's failures
with `decide`), a worker's pulls and an event subscription's SUBSCRIBE
(`run`). `retry.Budget` makes the decisions; this module is the part with
I/O around them: it patches the map on MOVED, refreshes it, and sleeps.

    MOVED         patch the slot (or override), resend; `max_redirects` per
                  request; a redirect back to a broker already tried, or a
                  MOVED newer than the whole map, refreshes the map
    stale MOVED   the answering broker knows an older owner than our map:
                  resend to it after a pause, within the TRYAGAIN budget
    TRYAGAIN      wait retry_after_ms; refresh after 1 s; past 5 s raise
    BUSY          wait retry_after_ms; past its budget raise BusyError
    newer epoch   a reply (connection.py's on_epoch) or a MOVED from a newer
                  map than ours: refresh in the background (coalesced)
    unreachable   an owner down, unknown or unable to serve: refresh, back
                  off, resend; past 5 s raise UnavailableError
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shardq.errors import (
    BusyError,
    ConnectionClosedError,
    MovedError,
    OwnerUnavailableError,
    TryAgainError,
)

from .retry import Budget, Decision, RetryPolicy
from .topology import TopologyManager

T = TypeVar("T")

# Errors that mean "the link, not the broker's answer": reconnect and resend.
# OwnerUnavailableError: the owner is up but cannot serve (lost storage): wait
# for the map to change as for a dead owner, then UnavailableError.
LINK_ERRORS = (OSError, TimeoutError, ConnectionClosedError, OwnerUnavailableError)
RETRYABLE = (MovedError, TryAgainError, BusyError, *LINK_ERRORS)



def retry_kind(exc: BaseException) -> type | None:
    """How a bulk round groups a failed item for one charge per kind: its
    answer's class (MOVED, TRYAGAIN, BUSY), ConnectionClosedError for any
    link failure, None when it is not retried."""
    if isinstance(exc, MovedError | TryAgainError | BusyError):
        return type(exc)
    if isinstance(exc, LINK_ERRORS):
        return ConnectionClosedError
    return None


Route = tuple[str, str]
"""(broker id, address)."""


class RetryLoop:
    """Resends by the rules above, for every caller of one client."""

    def __init__(self, topology: TopologyManager, policy: RetryPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topology = topology
        self.policy = policy or RetryPolicy()
        self._clock = clock

    def budget(self) -> Budget:
        """A fresh budget for one logical request (all its resends)."""
        return Budget(self.policy, self._clock)

    # -- decisions -------------------------------------------------------------

    def saw_epoch(self, epoch: int) -> None:
        """Something carried topology epoch `epoch`: newer than our map's,
        refresh in the background (coalesced, at most every 100 ms)."""
        self.topology.note_epoch(epoch)

    def follow(self, err: MovedError) -> bool:
        """Patch the map with one MOVED (an answer or a `moved` push).

        Returns whether it was stale: the broker that sent it knows an
        older owner than our map does (it has not learned the move yet).
        """
        stale = self.topology.is_stale(err)
        self.topology.patch(err)
        self.saw_epoch(err.epoch)
        return stale

    def decide(self, budget: Budget, exc: BaseException, sent_to: str) -> Decision:
        """Charge one failure of a request sent to broker `sent_to`.

        Returns what to do before the resend. Raises the error the user
        sees once its budget is spent (MovedError, TryAgainError,
        BusyError, UnavailableError), and `exc` itself when it is not
        retryable (AUTH, BAD_REQUEST, NOT_FOUND, ...).
        """
        if isinstance(exc, MovedError):
            return budget.moved(exc, sent_to, self.follow(exc))
        if isinstance(exc, TryAgainError):
            return budget.tryagain(exc)
        if isinstance(exc, BusyError):
            return budget.busy(exc)
        if isinstance(exc, LINK_ERRORS):
            return budget.unreachable(sent_to, exc)
        raise exc

    async def apply(self, decision: Decision) -> None:
        if decision.refresh:
            await self.topology.refresh()
        if decision.delay:
            await asyncio.sleep(decision.delay)

    # -- the loop --------------------------------------------------------------

    async def run(self, route: Callable[[], Route | None],
                  send: Callable[[str, str], Awaitable[T]], *, what: str,
                  closed: Callable[[], bool] = lambda: False,
                  retry: tuple[type[BaseException], ...] = RETRYABLE,
                  failed: tuple[BaseException, str] | None = None) -> T:
        """`send(broker_id, addr)` to wherever `route()` says now, until an
        answer, resending after the failures in `retry`.

        `route()` is asked again before every resend (a MOVED patched the
        map; a refresh replaced it); None means no owner is known (not
        bootstrapped yet, a forgotten broker): handled as an unreachable
        owner. Once `closed()`, a link failure is raised as is. `failed`:
        the caller's own first attempt failed so, at that broker (a call
        sends once inline, sparing the hot path the loop's closures).

        Raises:
            as `decide`, and any error `send` raises that is not in `retry`.
        """
        budget = self.budget()
        if failed is not None:
            if closed() and isinstance(failed[0], LINK_ERRORS):
                raise failed[0]
            await self.apply(self.decide(budget, *failed))
        while True:
            target = route()
            if target is None:
                no_owner = ConnectionClosedError(f"no broker owns {what}")
                await self.apply(budget.unreachable("?", no_owner))
                continue
            try:
                return await send(*target)
            except retry as exc:
                if closed() and isinstance(exc, LINK_ERRORS):
                    raise
                decision = self.decide(budget, exc, target[0])
            await self.apply(decision)
