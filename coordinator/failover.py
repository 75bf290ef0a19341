"""Automatic failover of a dead primary to its in-sync follower (docs/design.md §12).

Run by the liveness loop after each check. For a primary that is `dead` or
`lost-storage`, still owns slots, and whose follower is in sync and active:

1. fence: persist `failover: {to, phase: fence}` at `repl_epoch + 1`, then
   REPL_FENCE the follower at that epoch. From its answer on, the follower
   refuses the old primary's stream, so the old primary (if it is running,
   cut off or paused) can never again get an ack and so never answers a
   write. A follower whose copy is not complete (`synced` false) is never
   promoted: the failover is dropped and the slots stay unavailable.
2. commit: every slot of the primary belongs to the follower at epoch e+1,
   persisted with `phase: commit` in one transaction (the commit point).
3. activate: REPL_PROMOTE; the follower serves its copy. It also promotes
   by itself when it sees the map, so a lost REPL_PROMOTE only costs time.
   Then `phase: done`.

Every step is persisted before it is sent and is idempotent, so a
coordinator restarted anywhere rolls forward from the recorded phase.
Failpoints `coordinator.{before,after}_failover_{fence,commit,activate}`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shardq import failpoints
from shardq import protocol as p
from shardq.router import BrokerState

from .errors import Conflict, NotFound
from .membership import Membership
from .replication import ReplicationBook

log = logging.getLogger("shardq.coordinator.failover")

SendOp = Callable[[str, str, dict[str, Any], float], Awaitable[Any]]
STEP_TIMEOUT_S = 10.0
_ABSENT = frozenset({BrokerState.DEAD, BrokerState.LOST_STORAGE})


class Failover:
    """Drives failovers; `tick()` is called after every liveness check."""

    def __init__(self, membership: Membership, book: ReplicationBook, send: SendOp) -> None:
        self.m = membership
        self.book = book
        self._send = send
        self.last: dict[str, Any] = {}  # the last failover, for status
        self._lock = asyncio.Lock()  # one failover step sequence at a time

    async def tick(self) -> None:
        if not self.book.enabled or not self.m.bootstrapped:
            return
        async with self._lock:
            await self._tick()

    async def planned(self, primary: str) -> dict[str, Any]:
        """`shardq failover BROKER`: switch a live primary to its in-sync follower.

        Its writes pause from the fence until clients follow the new map (the
        old primary fetches it at once); nothing answered is lost: a write
        not yet on the follower was never answered.

        Raises:
            NotFound: no such primary. Conflict: its follower is not in sync
                and active, or a failover of it already ran.
        """
        async with self._lock:
            rec = self.book.state.get(primary)
            if rec is None:
                raise NotFound(f"no replication record for {primary!r}")
            f = self.m.topology.brokers.get(rec.get("follower") or "")
            if rec.get("failover") or not rec.get("in_sync") or f is None \
                    or f.state is not BrokerState.ACTIVE or not self.m.topology.slots_of(primary):
                raise Conflict(f"{primary} cannot switch over: it needs slots and an active "
                               f"follower in sync ({rec})")
            t0 = time.perf_counter()
            await self.start(primary)
            fo = self.book.state[primary].get("failover") or {}
            if fo.get("phase") != "done":
                raise Conflict(f"switchover of {primary} stopped at phase {fo.get('phase')}; "
                               "it rolls forward on its own")
            return {"primary": primary, "to": fo["to"], "epoch": fo["epoch"],
                    "took_ms": round((time.perf_counter() - t0) * 1000, 1)}

    async def _tick(self) -> None:
        self.book.reconcile()
        for primary in list(self.book.state):
            rec = self.book.state.get(primary)
            if rec is None:
                continue
            fo = rec.get("failover")
            if isinstance(fo, dict) and fo.get("phase") != "done":
                await self._roll_forward(primary)
            elif fo is None and self._due(primary, rec):
                await self.start(primary)

    def _due(self, primary: str, rec: dict[str, Any]) -> bool:
        b = self.m.topology.brokers.get(primary)
        if b is None or b.state not in _ABSENT or not self.m.topology.slots_of(primary):
            return False
        for other in self.book.state.values():
            fo = other.get("failover")
            if isinstance(fo, dict) and fo.get("to") == primary and fo.get("phase") != "done":
                # It died while taking over another primary: its follower may
                # not have that data yet. Two brokers lost: unavailable, not empty.
                return False
        follower = rec.get("follower")
        f = self.m.topology.brokers.get(follower) if follower else None
        if not rec.get("in_sync") or f is None or f.state is not BrokerState.ACTIVE:
            return False  # out of sync: unavailable, never silently empty
        return self.m.is_alive(f.id)

    async def start(self, primary: str) -> None:
        """Begin a failover of `primary` to its in-sync follower (step 1)."""
        rec = self.book.state[primary]
        hit("before_failover_fence")
        new = copy.deepcopy(self.book.state)
        new[primary] = {**rec, "repl_epoch": int(rec["repl_epoch"]) + 1,
                        "failover": {"to": rec["follower"], "phase": "fence", "epoch": 0,
                                     "started_ms": int(time.time() * 1000)}}
        self.book.save(new)
        log.warning("failover of %s to %s: fencing at replication epoch %d", primary,
                    rec["follower"], new[primary]["repl_epoch"])
        await self._roll_forward(primary)

    async def _roll_forward(self, primary: str) -> None:
        rec = self.book.state[primary]
        fo = rec["failover"]
        to = fo["to"]
        try:
            if fo["phase"] == "fence":
                answer = await self._send(to, p.REPL_FENCE, {
                    "primary": primary, "repl_epoch": rec["repl_epoch"], "term": self.m.term},
                    STEP_TIMEOUT_S)
                hit("after_failover_fence")
                if not (isinstance(answer, dict) and answer.get("synced")):
                    self._give_up(primary, f"{to}'s copy of {primary} is not complete")
                    return
                hit("before_failover_commit")
                self._commit(primary)
                hit("after_failover_commit")
                rec = self.book.state[primary]
                fo = rec["failover"]
            if fo["phase"] == "commit":
                hit("before_failover_activate")
                slots = [s for s in range(len(self.m.topology.slot_owners))
                         if self.m.topology.slot_owners[s] == to
                         and self.m.topology.slot_epochs[s] == fo["epoch"]]
                await self._send(to, p.REPL_PROMOTE, {
                    "primary": primary, "slots": slots, "epoch": fo["epoch"],
                    "term": self.m.term}, STEP_TIMEOUT_S * 6)
                hit("after_failover_activate")
                new = copy.deepcopy(self.book.state)
                new[primary]["failover"] = {**fo, "phase": "done",
                                            "done_ms": int(time.time() * 1000)}
                self.book.save(new)
                self.book.failovers["ok"] = self.book.failovers.get("ok", 0) + 1
                self.last = {"primary": primary, **new[primary]["failover"]}
                log.warning("failover of %s done: %s serves its %d slots at epoch %d",
                            primary, to, len(slots), fo["epoch"])
        except Conflict as exc:
            self._give_up(primary, str(exc))
        except Exception as exc:  # unreachable, timed out, refused: the next tick retries
            log.warning("failover of %s to %s: phase %s failed: %r; retrying", primary, to,
                        fo.get("phase"), exc)

    def _commit(self, primary: str) -> None:
        rec = self.book.state[primary]
        to = rec["failover"]["to"]

        def meta_for(epoch: int) -> dict[str, Any]:
            new = copy.deepcopy(self.book.state)
            new[primary]["failover"] = {**rec["failover"], "phase": "commit", "epoch": epoch}
            new[primary]["in_sync"] = False
            self._pending = new
            return {"replication": new}

        epoch, slots = self.m.fail_over(primary, to, meta_for)
        self.book.state = self._pending
        log.warning("failover of %s: committed %d slots to %s at epoch %d", primary,
                    len(slots), to, epoch)

    def _give_up(self, primary: str, why: str) -> None:
        """Before the commit point only: the failover does not happen."""
        new = copy.deepcopy(self.book.state)
        rec = new[primary]
        rec.pop("failover", None)
        rec["in_sync"] = False
        self.book.save(new)
        self.book.failovers["refused"] = self.book.failovers.get("refused", 0) + 1
        log.error("no failover of %s: %s; its slots stay unavailable until it returns with "
                  "its disk (or `shardq forget %s --accept-data-loss`)", primary, why, primary)


def hit(name: str) -> None:
    if failpoints.ACTIVE:
        failpoints.hit(f"coordinator.{name}")
