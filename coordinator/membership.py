"""Membership and ownership decisions (docs/design.md §5, §6): plain Python, injected clock.

`Membership` holds the cluster's topology and every broker's liveness, and
is the only code that changes them. Each change is persisted by the store
*before* the method returns, so nothing is ever answered (to the broker
that caused it, or to anyone reading `/topology`) that a crash could undo.

Epoch rules:

* Before bootstrap (no slot owned) the epoch stays 0: registrations are
  persisted but there is no map for clients yet.
* Bootstrap assigns every slot to its ring target at epoch 1 once
  `expect` brokers are registered (joining and alive); they become active.
* After that, every change of a broker's addr/state/weight, of the broker
  list, or of ownership bumps the epoch by one; slots that change owner
  take the new epoch as their own.

Broker states never move slots by themselves (docs/design.md §5): a broker that
misses heartbeats is marked `dead` and keeps its slots; a heartbeat or
re-registration brings it back to the state it had (`revive_state`).
Bootstrap, `forget` and `commit_move` are the only ownership changes.

Storage identity: every broker's data directory carries a random id, sent
with `register` and heartbeats, and recorded per broker (with the epoch it
was recorded at). A broker that owns slots and comes back under another
identity (an empty, replaced or swapped disk) is held as `lost-storage`:
its slots keep their owner and answer UNAVAILABLE, never empty, until the
recorded disk returns or `forget --accept-data-loss` gives them away empty.

Moves (handoffs, executed by moves.py) are recorded here too: `begin_move`,
`set_move_phase`, `mark_move_aborting` and `finish_move` persist the move
and republish the topology's `moving` list *at the same epoch* (a phase is
not an ownership change); `commit_move` is the commit point of docs/design.md §6
step 5: the slots' new owner at epoch e+1 and the move's `commit` phase in
one SQLite transaction. A `draining`/`leaving` broker whose last slot moves
away becomes `drained` in that same transaction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from shardq.router import (
    DEFAULT_MAX_SLOTS_PER_MOVE,
    DEFAULT_VNODES,
    BrokerInfo,
    BrokerState,
    Move,
    Ring,
    Topology,
    plan_rebalance,
    ring_for,
    slot_of,
)

from .errors import BadRequest, Conflict, Forbidden, NotFound
from .state import BrokerRecord, MoveRecord, MoveState, Store

log = logging.getLogger("shardq.coordinator.membership")

MAX_WEIGHT = 1000
MAX_PARTITIONS = 1024
_OUT_OF_RING = frozenset({BrokerState.DRAINING, BrokerState.LEAVING, BrokerState.DRAINED})
_ABSENT = frozenset({BrokerState.DEAD, BrokerState.LOST_STORAGE})  # not serving its slots
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_STORAGE_RE = re.compile(r"^[0-9a-f]{32}$")

J, A, DG, LV, DD, X, L = (BrokerState.JOINING, BrokerState.ACTIVE, BrokerState.DRAINING,
                          BrokerState.LEAVING, BrokerState.DRAINED, BrokerState.DEAD,
                          BrokerState.LOST_STORAGE)
# The legal changes of a broker's state; `Membership._set_state` checks every
# one. Dead and lost-storage are absences: entering one keeps the state to
# come back to (`revive_state`), and leaving one goes back to it. Every other
# state is operational: entering it makes it the one to come back to.
#
#   from \ to     joining active draining leaving drained dead lost-storage
#   joining                  x       x        x       x      x
#   active                           x        x       x      x       x
#   draining                 x                x       x      x       x
#   leaving                  x                        x      x       x
#   drained                  x       x        x              x       x
#   dead            (back to revive_state)                            x
#   lost-storage    (back to revive_state)
BROKER_TRANSITIONS: dict[BrokerState, frozenset[BrokerState]] = {
    J: frozenset({A, DG, LV, DD, X}),
    A: frozenset({DG, LV, DD, X, L}),
    DG: frozenset({A, LV, DD, X, L}),
    LV: frozenset({A, DD, X, L}),
    DD: frozenset({A, DG, LV, X, L}),
    X: frozenset({J, A, DG, LV, DD, L}),
    L: frozenset({J, A, DG, LV, DD}),
}
_DIGITS = re.compile(r"(\d+)")


def monotonic_ms() -> float:
    """The default liveness clock."""
    return time.monotonic() * 1000.0


def wall_ms() -> int:
    """The default wall clock (what is shown and persisted as `last_heartbeat_ms`)."""
    return int(time.time() * 1000)


class Membership:
    """The coordinator's view of the cluster; every mutation is durable on return.

    Constructing one starts a new term: it increments and persists the term
    in `store`, loads the saved state, and gives every known broker a fresh
    heartbeat deadline (a coordinator restart must not mark everyone dead).

    Args:
        store: the coordinator's SQLite store; owned by the caller.
        expect: brokers to wait for before bootstrap.
        heartbeat_timeout_ms: silence after which a broker is marked dead.
        clock: monotonic milliseconds, for liveness (tests inject one).
        wall: wall-clock milliseconds, for display only.
        vnodes: ring points per unit of weight.
    """

    def __init__(
        self,
        store: Store,
        *,
        expect: int = 1,
        heartbeat_timeout_ms: int = 5000,
        clock: Callable[[], float] = monotonic_ms,
        wall: Callable[[], int] = wall_ms,
        vnodes: int = DEFAULT_VNODES,
    ) -> None:
        if expect < 1:
            raise ValueError(f"expect must be >= 1, got {expect}")
        if heartbeat_timeout_ms < 1:
            raise ValueError(f"heartbeat_timeout_ms must be >= 1, got {heartbeat_timeout_ms}")
        self._store = store
        self._expect = expect
        self._timeout_ms = heartbeat_timeout_ms
        self._clock = clock
        self._wall = wall
        self._vnodes = vnodes
        self.term = store.start_term()
        self._stats: dict[str, dict[str, Any]] = {}
        # The topology's `replication` section (replication.py), when replicating.
        self.replication_view: Callable[[], dict[str, Any]] | None = None
        self._load()
        self._maybe_bootstrap()

    def _load(self) -> None:
        snap = self._store.load()
        self._topo = snap.topology
        self._records = snap.records
        self._barred = snap.barred
        self._pins = self._store.load_pins()
        # The moves table is the truth about moves in flight; `moving` mirrors it.
        self._moves = {r.move_id: r for r in snap.moves}
        self._topo.moving = [r.moving_entry() for r in snap.moves]
        now = self._clock()
        self._last_seen = dict.fromkeys(self._topo.brokers, now)
        self._json: bytes | None = None

    # -- reads ---------------------------------------------------------------

    @property
    def epoch(self) -> int:
        epoch: int = self._topo.epoch
        return epoch

    @property
    def topology(self) -> Topology:
        """The current topology. Read-only: changes go through the methods below."""
        return self._topo

    @property
    def barred(self) -> frozenset[str]:
        return frozenset(self._barred)

    @property
    def bootstrapped(self) -> bool:
        """True once any slot is owned (docs/design.md §5: bootstrap runs while none is)."""
        return _owns_any(self._topo)

    def topology_json(self) -> bytes:
        """`GET /topology`'s body, cached until the next change."""
        if self._json is None:
            d = self._topo.to_dict()
            if self.replication_view is not None:
                d["replication"] = self.replication_view()
            self._json = json.dumps(d, separators=(",", ":")).encode()
        return self._json

    def status(self) -> dict[str, Any]:
        """`GET /status` / `shardq status --json` (docs/design.md §10)."""
        counts = self._topo.slot_counts()
        rows = []
        for bid in sorted(self._topo.brokers, key=natural_key):
            b = self._topo.brokers[bid]
            queues = self._stats.get(bid, {}).get("queues")
            queues = queues if isinstance(queues, dict) else {}
            row = {
                "id": bid, "addr": b.addr, "state": b.state.value, "weight": b.weight,
                "slots": counts.get(bid, 0), "queues": len(queues),
                "waiting": _total(queues, "waiting"), "active": _total(queues, "active"),
                "delayed": _total(queues, "delayed"),
            }
            if b.state is BrokerState.LOST_STORAGE:
                row["problem"] = self.lost_storage_reason(bid)
            rows.append(row)
        return {"epoch": self._topo.epoch, "brokers": rows}

    def stats_of(self, broker_id: str) -> dict[str, Any] | None:
        """The last stats `broker_id` sent with a heartbeat (since this start)."""
        return self._stats.get(broker_id)

    def plan_moves(self, max_slots_per_move: int = DEFAULT_MAX_SLOTS_PER_MOVE) -> list[Move]:
        """The handoffs that would bring every slot to its ring target.

        Joining brokers count as on the ring (a rebalance activates them
        first); a dead broker that was not active when it died (draining,
        joining...) is left off it. Slots already moving are skipped.
        """
        if not self.bootstrapped:
            return []
        joining = [b.id for b in self._topo.brokers.values() if b.state is BrokerState.JOINING]
        off = [bid for bid, b in self._topo.brokers.items() if b.state is BrokerState.DEAD
               and self._records[bid].revive_state is not BrokerState.ACTIVE]
        try:
            ring = ring_for(self._topo, self._vnodes, include=joining, exclude=off)
        except ValueError:  # nobody left on the ring
            return []
        moves: list[Move] = plan_rebalance(self._topo, ring, max_slots_per_move, self._pins)
        return moves

    @property
    def pins(self) -> dict[int, str]:
        """Slots pinned to a broker by `shardq move`. A copy."""
        return dict(self._pins)

    def pin(self, queue: str, broker_id: str) -> dict[str, Any]:
        """Pin the slot of `queue` to an active broker (persisted); the next
        rebalance moves it there and no later one moves it away.

        Raises:
            NotFound: unknown broker. Conflict: the broker is not active.
        """
        info = self._topo.brokers.get(broker_id)
        if info is None:
            raise NotFound(f"unknown broker {broker_id!r}")
        if info.state is not BrokerState.ACTIVE:
            raise Conflict(f"broker {broker_id} is {info.state}, not active")
        slot = slot_of(queue)
        pins = {**self._pins, slot: broker_id}
        self._store.save_pins(pins)
        self._pins = pins
        return {"queue": queue, "slot": slot, "from": self._topo.owner_of_slot(slot),
                "to": broker_id, "epoch": self.epoch}

    @property
    def moves(self) -> dict[str, MoveRecord]:
        """Unfinished moves (running or aborting) by id, oldest first. A copy."""
        return dict(self._moves)

    def lost_storage_reason(self, broker_id: str) -> str:
        """Why a `lost-storage` broker is held, and what the operator can do."""
        b = self._topo.brokers[broker_id]
        presented = self._records[broker_id].presented_storage
        return (f"broker {broker_id} came back with data directory "
                f"{(presented or 'without an identity')[:12]} but its "
                f"{len(self._topo.slots_of(broker_id))} slots are owned under "
                f"{(b.storage or '?')[:12]}: its jobs are not on this disk. Restore that disk "
                f"and restart it, or run `shardq forget {broker_id} --accept-data-loss` "
                "to serve its slots again, empty")

    def revive_state(self, broker_id: str) -> BrokerState | None:
        """The state a dead broker comes back in (its state, if not dead)."""
        rec = self._records.get(broker_id)
        return None if rec is None else rec.revive_state

    # -- broker calls --------------------------------------------------------

    def register(self, broker_id: str, addr: str, weight: int = 1,
                 storage: str | None = None) -> dict[str, Any]:
        """A broker announces itself (at start, or again after losing us).

        A new id joins as `joining` (or triggers bootstrap). A known id
        with a new address or weight is updated; a dead one comes back.
        Either bumps the epoch so clients learn the new address. `storage`
        is the identity of the broker's data directory: a known broker
        that owns slots and presents another one (or none) is held as
        `lost-storage` instead of coming back.

        Raises:
            BadRequest: malformed id, address, weight or storage identity.
            Forbidden: the id was forgotten.
            Conflict: `storage` is recorded for another broker (swapped disks).
        """
        _check_id(broker_id)
        _check_addr(addr)
        if not 1 <= weight <= MAX_WEIGHT:
            raise BadRequest(f"weight must be between 1 and {MAX_WEIGHT}, got {weight}")
        _check_storage(storage)
        self._refuse_barred(broker_id)
        self._refuse_foreign_storage(broker_id, storage)
        self._touch(broker_id)
        info = self._topo.brokers.get(broker_id)
        if info is None:
            topo = self._topo.copy()
            since = self._next_epoch()
            topo.brokers[broker_id] = BrokerInfo(broker_id, addr, BrokerState.JOINING, weight,
                                                 storage, since)
            self._records[broker_id] = BrokerRecord(BrokerState.JOINING, self._wall())
            self._commit(topo)
        else:
            self._returning(info, addr, weight, storage, presented=True)
        self._maybe_bootstrap()
        return self._answer(broker_id)

    def heartbeat(self, broker_id: str, stats: Mapping[str, Any] | None = None,
                  storage: str | None = None) -> dict[str, Any]:
        """A broker is alive; `stats` is kept for `status`.

        A heartbeat without `storage` proves nothing about the disk; one
        with it is checked as `register` checks it.

        Raises:
            BadRequest: a malformed storage identity.
            Forbidden: the id was forgotten.
            NotFound: unknown id (the broker should register).
        """
        _check_storage(storage)
        self._refuse_barred(broker_id)
        info = self._topo.brokers.get(broker_id)
        if info is None:
            raise NotFound(f"unknown broker {broker_id!r}: register first")
        self._touch(broker_id)
        if stats is not None:
            self._stats[broker_id] = dict(stats)
        self._returning(info, info.addr, info.weight, storage, presented=storage is not None)
        self._maybe_bootstrap()
        return self._answer(broker_id)

    def _returning(self, info: BrokerInfo, addr: str, weight: int, storage: str | None,
                   presented: bool) -> None:
        """Bring a known broker up to date: address, weight, liveness, storage identity."""
        bid = info.id
        rec = self._records[bid]
        topo = self._topo.copy()
        b = topo.brokers[bid]
        b.addr, b.weight = addr, weight
        if presented and b.storage is not None and storage != b.storage and _owns(topo, bid):
            self._set_state(topo, bid, BrokerState.LOST_STORAGE)
            if rec.presented_storage != storage or info.state is not BrokerState.LOST_STORAGE:
                rec.presented_storage = storage
                log.warning("broker %s is held (lost-storage): %s", bid,
                            self._reason_for(bid, b, storage))
        elif not presented and b.state is BrokerState.LOST_STORAGE:
            pass  # a heartbeat without an identity proves nothing about the disk
        else:
            if b.state in _ABSENT:
                if b.state is BrokerState.LOST_STORAGE:
                    log.warning("broker %s is back with its recorded storage %s", bid, storage)
                self._set_state(topo, bid, rec.revive_state)
            rec.presented_storage = None
            if presented and storage is not None and storage != b.storage:
                # A first identity for a broker recorded before identities
                # existed keeps every epoch (since 0): it is the same disk.
                if b.storage is not None:
                    log.warning("broker %s owns no slots and now has storage %s (was %s); "
                                "accepted", bid, storage, b.storage)
                b.since = 0 if b.storage is None else self._next_epoch()
                b.storage = storage
        if b != info:
            self._commit(topo)

    def _reason_for(self, bid: str, b: BrokerInfo, storage: str | None) -> str:
        return (f"its {len(self._topo.slots_of(bid))} slots are owned under storage "
                f"{b.storage} but it presents {storage or 'no storage identity'}")

    def _refuse_foreign_storage(self, broker_id: str, storage: str | None) -> None:
        if storage is None:
            return
        for other in self._topo.brokers.values():
            if other.id != broker_id and other.storage == storage:
                raise Conflict(
                    f"broker {broker_id!r} presents the data directory of broker {other.id!r} "
                    f"(storage {storage}): were two data directories swapped? Start each "
                    "broker on its own data directory")

    def leave(self, broker_id: str) -> dict[str, Any]:
        """A broker is stopping.

        One that owns nothing is removed from the topology. One that owns
        slots is marked `dead` at once: its slots wait for it to come back
        (a rolling restart moves no slot, docs/design.md §6). Unknown ids are a no-op.
        """
        info = self._topo.brokers.get(broker_id)
        if info is None:
            return {"term": self.term, "epoch": self.epoch, "state": None}
        topo = self._topo.copy()
        if _owns(topo, broker_id):
            if info.state in _ABSENT:
                return self._answer(broker_id)
            self._set_state(topo, broker_id, BrokerState.DEAD)
            self._commit(topo)
            return self._answer(broker_id)
        del topo.brokers[broker_id]
        self._commit(topo, drop=[broker_id])
        return {"term": self.term, "epoch": self.epoch, "state": None}

    # -- operator calls ------------------------------------------------------

    def activate_joining(self, only: Iterable[str] | None = None) -> list[str]:
        """Put joining brokers (all, or those in `only`) on the ring; one epoch bump for all.

        Before bootstrap this does nothing: bootstrap activates them.

        Returns:
            The ids activated.
        """
        if not self.bootstrapped:
            return []
        wanted = None if only is None else set(only)
        ids = sorted((b.id for b in self._topo.brokers.values()
                      if b.state is BrokerState.JOINING and (wanted is None or b.id in wanted)),
                     key=natural_key)
        if ids:
            topo = self._topo.copy()
            for bid in ids:
                self._set_state(topo, bid, BrokerState.ACTIVE)
            self._commit(topo)
        return ids

    def drain(self, broker_id: str, leaving: bool = False) -> dict[str, Any]:
        """Take a broker off the ring so that its slots move to the others.

        It becomes `draining` (`leaving` when it is being scaled in), or
        `drained` at once when it owns nothing. Draining again is a no-op
        (`leaving` may upgrade a `draining` broker).

        Raises:
            NotFound: unknown id.
            Conflict: it is dead (its data cannot move; restart or forget
                it), or it owns slots and no other broker is active.
        """
        info = self._topo.brokers.get(broker_id)
        if info is None:
            raise NotFound(f"unknown broker {broker_id!r}")
        if info.state in _ABSENT:
            raise Conflict(f"broker {broker_id} is {info.state.value}: its slots cannot move "
                           "until it is back with its disk (restart it), or forget it if its "
                           "disk is lost")
        owned = len(self._topo.slots_of(broker_id))
        if owned:
            want = BrokerState.LEAVING if leaving else BrokerState.DRAINING
            others = [b for b in self._topo.brokers.values()
                      if b.id != broker_id and b.state is BrokerState.ACTIVE]
            if not others:
                raise Conflict(f"broker {broker_id} owns {owned} slots and no other broker is "
                               "active to take them; scale out first")
        else:
            want = BrokerState.DRAINED
        if info.state is not want and not (
                info.state is BrokerState.LEAVING and want is BrokerState.DRAINING):
            topo = self._topo.copy()
            self._set_state(topo, broker_id, want)
            self._commit(topo)
        return {**self._answer(broker_id), "slots": owned}

    def undrain(self, broker_id: str) -> dict[str, Any]:
        """Put a draining, leaving, drained (or joining) broker back on the ring.

        A dead broker comes back active when it returns.

        Raises:
            NotFound: unknown id.
        """
        info = self._topo.brokers.get(broker_id)
        if info is None:
            raise NotFound(f"unknown broker {broker_id!r}")
        rec = self._records[broker_id]
        if info.state in _ABSENT:
            if rec.revive_state is not BrokerState.ACTIVE:
                rec.revive_state = BrokerState.ACTIVE
                self._commit(self._topo.copy())
        elif info.state is not BrokerState.ACTIVE and (
                info.state in _OUT_OF_RING or self.bootstrapped):
            topo = self._topo.copy()
            self._set_state(topo, broker_id, BrokerState.ACTIVE)
            self._commit(topo)
        return self._answer(broker_id)

    def declare_queue(self, name: str, partitions: int) -> dict[str, Any]:
        """Record a partitioned queue: stored as `name~0 .. name~P-1` (docs/design.md §7).

        Declaring again with the same P changes nothing; another P is refused,
        since jobs already routed by the old P would be stranded.

        Raises:
            BadRequest: a bad name or count. Conflict: declared with another P.
        """
        if not name or "~" in name or len(name) > 512:
            raise BadRequest("queue name must be 1-512 characters without '~'")
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise BadRequest(f"partitions must be in 1..{MAX_PARTITIONS}")
        current = self._topo.partitions.get(name)
        if current is not None and current != partitions:
            raise Conflict(f"queue {name!r} is already declared with {current} partitions")
        if current is None:
            topo = self._topo.copy()
            topo.partitions[name] = partitions
            self._commit(topo)
        return {"queue": name, "partitions": partitions, "epoch": self.epoch}

    def forget(self, broker_id: str, accept_data_loss: bool) -> dict[str, Any]:
        """Give a lost broker's slots away, empty, and bar its id (docs/design.md §6 runbook).

        Its slots go to their ring targets among the other *active* brokers
        at a new epoch; overrides pinned to it are dropped (their queues
        fall back to their slot's owner).

        Raises:
            BadRequest: `accept_data_loss` is not true.
            NotFound: unknown id.
            Conflict: it owns slots and is not dead (stop it first), or no
                other active broker can take them.
        """
        if accept_data_loss is not True:
            raise BadRequest("forget drops the broker's data for good: pass accept_data_loss: true")
        info = self._topo.brokers.get(broker_id)
        if info is None:
            if broker_id in self._barred:
                return {"term": self.term, "epoch": self.epoch, "forgotten": broker_id,
                        "slots": 0, "reassigned": {}}
            raise NotFound(f"unknown broker {broker_id!r}")
        slots = self._topo.slots_of(broker_id)
        if slots and info.state not in _ABSENT:
            raise Conflict(
                f"broker {broker_id} is {info.state.value} and owns {len(slots)} slots; "
                "forget is for a lost broker: stop it and wait until it is marked dead"
            )
        if info.state is BrokerState.LOST_STORAGE:
            return self._forget_storage(info, slots)
        topo = self._topo.copy()
        del topo.brokers[broker_id]
        reassigned = self._reassign(topo, slots) if slots else {}
        topo.overrides = {q: o for q, o in topo.overrides.items() if o[0] != broker_id}
        now = self._wall()
        self._commit(topo, drop=[broker_id], bar=[(broker_id, now)])
        self._barred[broker_id] = now
        return {"term": self.term, "epoch": self.epoch, "forgotten": broker_id,
                "slots": len(slots), "reassigned": reassigned, "barred": True}

    def _forget_storage(self, info: BrokerInfo, slots: list[int]) -> dict[str, Any]:
        """`forget` of a broker held for lost storage: its slots start over, empty.

        A broker that is up with its new disk rejoins as a new, empty broker
        that keeps its slots: they are its own again at a new epoch, under the
        identity it presents, so it serves them at once and nothing moves. One
        that is not up gives them to the other active brokers and leaves the
        topology (not barred: it may register again, as a new broker).
        """
        bid = info.id
        rec = self._records[bid]
        alive = self._clock() - self._last_seen.get(bid, float("-inf")) <= self._timeout_ms
        topo = self._topo.copy()
        epoch = self._next_epoch()
        if alive and rec.presented_storage is not None:
            b = topo.brokers[bid]
            self._set_state(topo, bid, rec.revive_state)
            b.storage, b.since = rec.presented_storage, epoch
            rec.presented_storage = None
            for s in slots:
                topo.slot_epochs[s] = epoch
            topo.overrides = {q: (o, epoch if o == bid else e)
                              for q, (o, e) in topo.overrides.items()}
            reassigned = {bid: len(slots)} if slots else {}
            self._commit(topo)
        else:
            del topo.brokers[bid]
            reassigned = self._reassign(topo, slots) if slots else {}
            topo.overrides = {q: o for q, o in topo.overrides.items() if o[0] != bid}
            self._commit(topo, drop=[bid])
        log.warning("broker %s forgotten with its lost storage: %d slots served again, empty, "
                    "at epoch %d by %s", bid, len(slots), self.epoch, reassigned or "nobody")
        return {"term": self.term, "epoch": self.epoch, "forgotten": bid,
                "slots": len(slots), "reassigned": reassigned, "barred": False}

    def _next_epoch(self) -> int:
        """The epoch the next `_commit` with a bump will publish."""
        return self._topo.epoch + 1 if self.bootstrapped else self._topo.epoch

    def _reassign(self, topo: Topology, slots: list[int]) -> dict[str, int]:
        live = [b.id for b in topo.brokers.values() if b.state is BrokerState.ACTIVE]
        if not live:
            raise Conflict("no other active broker can take the slots; start one first")
        not_live = [b.id for b in topo.brokers.values() if b.state is not BrokerState.ACTIVE]
        ring = ring_for(topo, self._vnodes, exclude=not_live)
        epoch = self._topo.epoch + 1
        counts: dict[str, int] = {}
        for s in slots:
            target = ring.target(s)
            topo.slot_owners[s] = target
            topo.slot_epochs[s] = epoch
            counts[target] = counts.get(target, 0) + 1
        return counts

    # -- moves (docs/design.md §6 handoffs) -------------------------------------------

    def begin_move(self, move: Move, move_id: str | None = None) -> MoveRecord:
        """Record a new move in phase `prepare` (persisted before PREPARE is sent).

        Raises:
            Conflict: the source does not own every slot, a slot is already
                moving, or source/target is unknown, the same, or the target
                is not active.
        """
        src, dst = move.source, move.target
        if src == dst or src not in self._topo.brokers or dst not in self._topo.brokers:
            raise Conflict(f"cannot move slots from {src!r} to {dst!r}")
        if self._topo.brokers[dst].state is not BrokerState.ACTIVE:
            raise Conflict(f"target {dst} is {self._topo.brokers[dst].state.value}, not active")
        if not move.slots:
            raise Conflict("a move needs at least one slot")
        busy = {s for r in self._moves.values() for s in r.slots}
        for s in move.slots:
            if self._topo.owner_of_slot(s) != src or s in busy:
                raise Conflict(f"slot {s} is not {src}'s to move (owner "
                               f"{self._topo.owner_of_slot(s)}, moving: {s in busy})")
        now = self._wall()
        rec = MoveRecord(move_id or str(uuid.uuid4()), src, dst, tuple(sorted(move.slots)),
                         created_ms=now, updated_ms=now)
        if rec.move_id in self._moves:
            raise Conflict(f"move {rec.move_id} exists")
        self._save_moves([rec])
        return rec

    def set_move_phase(self, move_id: str, phase: str) -> MoveRecord:
        """Persist that `move_id` is now carrying out `phase` (no epoch bump)."""
        rec = self._move(move_id)
        if rec.phase == phase:
            return rec
        new = dataclasses.replace(rec, phase=phase, updated_ms=self._wall())
        if new.committed != rec.committed:
            raise Conflict(f"move {move_id}: {rec.phase} -> {phase} crosses the commit point")
        self._save_moves([new])
        return new

    def commit_move(self, move_id: str) -> MoveRecord:
        """The commit point: the slots belong to the target at epoch e+1 (durable on return).

        Idempotent for a committed move.

        Raises:
            Conflict: the move is aborting, the source no longer owns every
                slot, or the target is no longer on the ring.
        """
        rec = self._move(move_id)
        if rec.committed:
            return rec
        if rec.state is not MoveState.RUNNING:
            raise Conflict(f"move {move_id} is {rec.state.value}")
        lost = [s for s in rec.slots if self._topo.owner_of_slot(s) != rec.source]
        if lost:
            raise Conflict(f"{rec.source} no longer owns slots {lost[:8]}")
        target = self._topo.brokers.get(rec.target)
        if target is None or not (
                target.state is BrokerState.ACTIVE
                or (target.state is BrokerState.DEAD
                    and self._records[rec.target].revive_state is BrokerState.ACTIVE)):
            state = "gone" if target is None else target.state.value
            raise Conflict(f"target {rec.target} is {state}: not committing")
        topo = self._topo.copy()
        epoch = self._topo.epoch + 1
        for s in rec.slots:
            topo.slot_owners[s] = rec.target
            topo.slot_epochs[s] = epoch
        new = dataclasses.replace(rec, phase="commit", epoch=epoch, updated_ms=self._wall())
        self._commit(topo, moves=[new])
        return new

    def mark_move_aborting(self, move_id: str, error: str) -> MoveRecord:
        """Persist the decision to abort (before the ABORTs are sent).

        Raises:
            Conflict: the move is committed (it can only roll forward).
        """
        rec = self._move(move_id)
        if rec.committed:
            raise Conflict(f"move {move_id} is committed: it cannot abort")
        if rec.state is MoveState.ABORTING:
            return rec
        new = dataclasses.replace(rec, state=MoveState.ABORTING, error=error,
                                  updated_ms=self._wall())
        self._save_moves([new])
        return new

    def finish_move(self, move_id: str, error: str | None = None) -> MoveRecord:
        """Close a move: `done` if committed, else `aborted`; it leaves `moving`.

        A `draining`/`leaving` source that now owns nothing becomes `drained`
        in the same transaction (an epoch bump).
        """
        rec = self._move(move_id)
        state = MoveState.DONE if rec.committed else MoveState.ABORTED
        new = dataclasses.replace(rec, state=state, error=error or rec.error,
                                  updated_ms=self._wall())
        src = self._topo.brokers.get(rec.source)
        if (state is MoveState.DONE and src is not None and src.state in _OUT_OF_RING
                and src.state is not BrokerState.DRAINED and not _owns(self._topo, src.id)):
            topo = self._topo.copy()
            self._set_state(topo, src.id, BrokerState.DRAINED)
            self._commit(topo, moves=[new])
        else:
            self._save_moves([new])
        return new

    def _move(self, move_id: str) -> MoveRecord:
        rec = self._moves.get(move_id)
        if rec is None:
            raise NotFound(f"no move {move_id!r} in flight")
        return rec

    def _save_moves(self, moves: list[MoveRecord]) -> None:
        """Persist move records and the `moving` list at the current epoch."""
        self._commit(self._topo.copy(), moves=moves, bump=False)

    # -- replication (replication.py, docs/design.md §12) -----------------------

    def save_meta(self, meta: Mapping[str, Any]) -> None:
        """Persist `meta` values and republish the topology at a new epoch."""
        self._commit(self._topo.copy(), meta=meta)

    def fail_over(self, primary: str, follower: str,
                  meta_for: Callable[[int], Mapping[str, Any]]) -> tuple[int, list[int]]:
        """The failover's commit point: every slot (and override) of `primary`
        belongs to `follower` at epoch e+1, persisted with `meta_for(e+1)` in
        one transaction. Returns (that epoch, the slots).

        Raises:
            Conflict: the follower is not active.
        """
        target = self._topo.brokers.get(follower)
        if target is None or target.state is not BrokerState.ACTIVE:
            raise Conflict(f"follower {follower} is not active: not failing over {primary}")
        slots = self._topo.slots_of(primary)
        topo = self._topo.copy()
        epoch = self._topo.epoch + 1
        for s in slots:
            topo.slot_owners[s] = follower
            topo.slot_epochs[s] = epoch
        topo.overrides = {q: ((follower, epoch) if o == primary else (o, e))
                          for q, (o, e) in topo.overrides.items()}
        # It owns nothing now: off the ring while away, and back as a joining
        # broker that the rebalancer gives slots again (docs/design.md §12).
        self._records[primary].revive_state = BrokerState.JOINING
        self._commit(topo, meta=meta_for(epoch))
        return epoch, slots

    def is_alive(self, broker_id: str) -> bool:
        """Heard from within the heartbeat timeout."""
        return self._clock() - self._last_seen.get(broker_id, float("-inf")) <= self._timeout_ms

    # -- timers --------------------------------------------------------------

    def check_liveness(self) -> list[str]:
        """Mark brokers silent for longer than the heartbeat timeout as dead.

        Returns:
            The ids marked dead by this call (one epoch bump for all of them).
        """
        now = self._clock()
        expired = [
            bid for bid, b in self._topo.brokers.items()
            if b.state not in _ABSENT  # a held broker stays held while silent
            and now - self._last_seen.get(bid, now) > self._timeout_ms
        ]
        if not expired:
            return []
        topo = self._topo.copy()
        for bid in expired:
            self._set_state(topo, bid, BrokerState.DEAD)
        self._commit(topo)
        return expired

    # -- internals -----------------------------------------------------------

    def _set_state(self, topo: Topology, bid: str, to: BrokerState) -> None:
        """Move broker `bid` of `topo` (a copy about to be committed) to state `to`.

        Raises:
            Conflict: `BROKER_TRANSITIONS` does not allow it.
        """
        b, rec = topo.brokers[bid], self._records[bid]
        now = b.state
        if to is now:
            return
        if to not in BROKER_TRANSITIONS[now] or (now in _ABSENT and to not in _ABSENT
                                                 and to is not rec.revive_state):
            raise Conflict(f"broker {bid} is {now.value}: it cannot become {to.value}")
        if to in _ABSENT:
            if now not in _ABSENT:
                rec.revive_state = now
        else:
            rec.revive_state = to
        b.state = to

    def _maybe_bootstrap(self) -> None:
        if self.bootstrapped:
            return
        weights = {b.id: b.weight for b in self._topo.brokers.values()
                   if b.state is BrokerState.JOINING}
        if len(weights) < self._expect:
            return
        topo = self._topo.copy()
        for bid in weights:
            self._set_state(topo, bid, BrokerState.ACTIVE)
        topo = topo.with_assignment(Ring(weights, self._vnodes).targets(), self._topo.epoch + 1)
        self._commit(topo)

    def _commit(self, topo: Topology, drop: Iterable[str] = (),
                bar: Iterable[tuple[str, int]] = (), moves: Iterable[MoveRecord] = (),
                bump: bool = True, meta: Mapping[str, Any] | None = None) -> None:
        """Persist `topo` (and `moves`) as the next state, then publish it.

        `bump=False` keeps the epoch: only `moving` and move records change.
        """
        for bid in drop:
            self._records.pop(bid, None)
            self._last_seen.pop(bid, None)
            self._stats.pop(bid, None)
        moves = list(moves)
        in_flight = dict(self._moves)
        for r in moves:
            if r.finished:
                in_flight.pop(r.move_id, None)
            else:
                in_flight[r.move_id] = r
        topo.moving = [r.moving_entry() for r in in_flight.values()]
        topo.term = self.term
        topo.epoch = (self._topo.epoch + 1 if bump and _owns_any(topo)
                      else self._topo.epoch)
        try:
            self._store.save(topo, self._records, bar, moves, meta)
        except Exception:
            # Memory must never run ahead of the disk: reload what is there.
            self._load()
            raise
        self._topo = topo
        self._moves = in_flight
        self._json = None

    def _touch(self, broker_id: str) -> None:
        self._last_seen[broker_id] = self._clock()
        rec = self._records.get(broker_id)
        if rec is not None:
            rec.last_heartbeat_ms = self._wall()

    def _refuse_barred(self, broker_id: str) -> None:
        if broker_id in self._barred:
            raise Forbidden(
                f"broker {broker_id!r} was forgotten (shardq forget) and may not register "
                "again; start it with a new --id and an empty data dir"
            )

    def answer(self, broker_id: str) -> dict[str, Any]:
        """What register/heartbeat answer: {term, epoch, state, heartbeat_ms}."""
        return self._answer(broker_id)

    def _answer(self, broker_id: str) -> dict[str, Any]:
        return {"term": self.term, "epoch": self.epoch,
                "state": self._topo.brokers[broker_id].state.value,
                "heartbeat_ms": self.heartbeat_interval_ms}

    @property
    def heartbeat_interval_ms(self) -> int:
        """How often brokers should heartbeat: a quarter of the timeout (at most 1 s).

        Four beats per timeout, as Kafka's heartbeat.interval.ms is a third of
        its session timeout: one late beat on a busy host is not a death.
        """
        return max(10, min(1000, self._timeout_ms // 4))


def natural_key(s: str) -> list[Any]:
    """Sort key putting b2 before b10."""
    return [int(p) if p.isdigit() else p for p in _DIGITS.split(s)]


def _owns_any(topo: Topology) -> bool:
    return any(o is not None for o in topo.slot_owners)


def _owns(topo: Topology, broker_id: str) -> bool:
    return broker_id in topo.slot_owners or any(
        owner == broker_id for owner, _ in topo.overrides.values()
    )


def _total(queues: Mapping[str, Any], key: str) -> int:
    total = 0
    for q in queues.values():
        v = q.get(key) if isinstance(q, dict) else None
        if isinstance(v, int) and not isinstance(v, bool):
            total += v
    return total


def _check_id(broker_id: str) -> None:
    if not _ID_RE.match(broker_id):
        raise BadRequest(
            f"bad broker id {broker_id!r}: 1-64 characters of letters, digits, '_', '.', '-'"
        )


def _check_storage(storage: str | None) -> None:
    if storage is not None and not _STORAGE_RE.match(storage):
        raise BadRequest(f"bad storage identity {storage!r}: expected 32 lowercase hex digits")


def _check_addr(addr: str) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"bad address {addr!r}: expected host:port")
