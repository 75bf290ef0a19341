"""Membership and ownership decisions (DESIGN §5, §6): plain Python, injected clock.

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

Broker states never move slots by themselves (DESIGN §5): a broker that
misses heartbeats is marked `dead` and keeps its slots; a heartbeat or
re-registration brings it back to the state it had (`revive_state`).
Only bootstrap and `forget` assign slots here; live moves come with the
rebalancer (see `Membership.plan_moves`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from shardq.router import (
    DEFAULT_VNODES,
    BrokerInfo,
    BrokerState,
    Move,
    Ring,
    Topology,
    plan_rebalance,
    ring_for,
)

from .errors import BadRequest, Conflict, Forbidden, NotFound
from .state import BrokerRecord, Store

MAX_WEIGHT = 1000
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
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
        self._load()
        self._maybe_bootstrap()

    def _load(self) -> None:
        snap = self._store.load()
        self._topo = snap.topology
        self._records = snap.records
        self._barred = snap.barred
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
        """True once any slot is owned (DESIGN §5: bootstrap runs while none is)."""
        return _owns_any(self._topo)

    def topology_json(self) -> bytes:
        """`GET /topology`'s body, cached until the next change."""
        if self._json is None:
            self._json = json.dumps(self._topo.to_dict(), separators=(",", ":")).encode()
        return self._json

    def status(self) -> dict[str, Any]:
        """`GET /status` / `shardq status --json` (DESIGN §10)."""
        counts = self._topo.slot_counts()
        rows = []
        for bid in sorted(self._topo.brokers, key=natural_key):
            b = self._topo.brokers[bid]
            queues = self._stats.get(bid, {}).get("queues")
            queues = queues if isinstance(queues, dict) else {}
            rows.append({
                "id": bid, "addr": b.addr, "state": b.state.value, "weight": b.weight,
                "slots": counts.get(bid, 0), "queues": len(queues),
                "waiting": _total(queues, "waiting"), "active": _total(queues, "active"),
                "delayed": _total(queues, "delayed"),
            })
        return {"epoch": self._topo.epoch, "brokers": rows}

    def stats_of(self, broker_id: str) -> dict[str, Any] | None:
        """The last stats `broker_id` sent with a heartbeat (since this start)."""
        return self._stats.get(broker_id)

    def plan_moves(self) -> list[Move]:
        """Hook for live rebalancing: the handoffs that would bring joining brokers in.

        Nothing executes these yet; the rebalancer (scale out, drain) will
        run them as handoffs (DESIGN §6) and activate the joining brokers.
        """
        if not self.bootstrapped:
            return []
        joining = [b.id for b in self._topo.brokers.values() if b.state is BrokerState.JOINING]
        moves: list[Move] = plan_rebalance(
            self._topo, ring_for(self._topo, self._vnodes, include=joining))
        return moves

    # -- broker calls --------------------------------------------------------

    def register(self, broker_id: str, addr: str, weight: int = 1) -> dict[str, Any]:
        """A broker announces itself (at start, or again after losing us).

        A new id joins as `joining` (or triggers bootstrap). A known id
        with a new address or weight is updated; a dead one comes back.
        Either bumps the epoch so clients learn the new address.

        Raises:
            BadRequest: malformed id, address or weight.
            Forbidden: the id was forgotten.
        """
        _check_id(broker_id)
        _check_addr(addr)
        if not 1 <= weight <= MAX_WEIGHT:
            raise BadRequest(f"weight must be between 1 and {MAX_WEIGHT}, got {weight}")
        self._refuse_barred(broker_id)
        self._touch(broker_id)
        info = self._topo.brokers.get(broker_id)
        if info is None:
            topo = self._topo.copy()
            topo.brokers[broker_id] = BrokerInfo(broker_id, addr, BrokerState.JOINING, weight)
            self._records[broker_id] = BrokerRecord(BrokerState.JOINING, self._wall())
            self._commit(topo)
        elif info.addr != addr or info.weight != weight or info.state is BrokerState.DEAD:
            topo = self._topo.copy()
            b = topo.brokers[broker_id]
            b.addr, b.weight = addr, weight
            if b.state is BrokerState.DEAD:
                b.state = self._records[broker_id].revive_state
            self._commit(topo)
        self._maybe_bootstrap()
        return self._answer(broker_id)

    def heartbeat(self, broker_id: str, stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A broker is alive; `stats` is kept for `status`.

        Raises:
            Forbidden: the id was forgotten.
            NotFound: unknown id (the broker should register).
        """
        self._refuse_barred(broker_id)
        info = self._topo.brokers.get(broker_id)
        if info is None:
            raise NotFound(f"unknown broker {broker_id!r}: register first")
        self._touch(broker_id)
        if stats is not None:
            self._stats[broker_id] = dict(stats)
        if info.state is BrokerState.DEAD:
            topo = self._topo.copy()
            topo.brokers[broker_id].state = self._records[broker_id].revive_state
            self._commit(topo)
            self._maybe_bootstrap()
        return self._answer(broker_id)

    def leave(self, broker_id: str) -> dict[str, Any]:
        """A broker is stopping.

        One that owns nothing is removed from the topology. One that owns
        slots is marked `dead` at once: its slots wait for it to come back
        (a rolling restart moves no slot, DESIGN §6). Unknown ids are a no-op.
        """
        info = self._topo.brokers.get(broker_id)
        if info is None:
            return {"term": self.term, "epoch": self.epoch, "state": None}
        topo = self._topo.copy()
        if _owns(topo, broker_id):
            if info.state is BrokerState.DEAD:
                return self._answer(broker_id)
            self._records[broker_id].revive_state = info.state
            topo.brokers[broker_id].state = BrokerState.DEAD
            self._commit(topo)
            return self._answer(broker_id)
        del topo.brokers[broker_id]
        self._commit(topo, drop=[broker_id])
        return {"term": self.term, "epoch": self.epoch, "state": None}

    # -- operator calls ------------------------------------------------------

    def forget(self, broker_id: str, accept_data_loss: bool) -> dict[str, Any]:
        """Give a lost broker's slots away, empty, and bar its id (DESIGN §6 runbook).

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
        if slots and info.state is not BrokerState.DEAD:
            raise Conflict(
                f"broker {broker_id} is {info.state.value} and owns {len(slots)} slots; "
                "forget is for a lost broker: stop it and wait until it is marked dead"
            )
        topo = self._topo.copy()
        del topo.brokers[broker_id]
        reassigned = self._reassign(topo, slots) if slots else {}
        topo.overrides = {q: o for q, o in topo.overrides.items() if o[0] != broker_id}
        now = self._wall()
        self._commit(topo, drop=[broker_id], bar=[(broker_id, now)])
        self._barred[broker_id] = now
        return {"term": self.term, "epoch": self.epoch, "forgotten": broker_id,
                "slots": len(slots), "reassigned": reassigned}

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

    # -- timers --------------------------------------------------------------

    def check_liveness(self) -> list[str]:
        """Mark brokers silent for longer than the heartbeat timeout as dead.

        Returns:
            The ids marked dead by this call (one epoch bump for all of them).
        """
        now = self._clock()
        expired = [
            bid for bid, b in self._topo.brokers.items()
            if b.state is not BrokerState.DEAD
            and now - self._last_seen.get(bid, now) > self._timeout_ms
        ]
        if not expired:
            return []
        topo = self._topo.copy()
        for bid in expired:
            self._records[bid].revive_state = topo.brokers[bid].state
            topo.brokers[bid].state = BrokerState.DEAD
        self._commit(topo)
        return expired

    # -- internals -----------------------------------------------------------

    def _maybe_bootstrap(self) -> None:
        if self.bootstrapped:
            return
        weights = {b.id: b.weight for b in self._topo.brokers.values()
                   if b.state is BrokerState.JOINING}
        if len(weights) < self._expect:
            return
        topo = self._topo.copy()
        for bid in weights:
            topo.brokers[bid].state = BrokerState.ACTIVE
            self._records[bid].revive_state = BrokerState.ACTIVE
        topo = topo.with_assignment(Ring(weights, self._vnodes).targets(), self._topo.epoch + 1)
        self._commit(topo)

    def _commit(self, topo: Topology, drop: Iterable[str] = (),
                bar: Iterable[tuple[str, int]] = ()) -> None:
        """Persist `topo` as the next state, then publish it."""
        for bid in drop:
            self._records.pop(bid, None)
            self._last_seen.pop(bid, None)
            self._stats.pop(bid, None)
        topo.term = self.term
        topo.epoch = self._topo.epoch + 1 if _owns_any(topo) else self._topo.epoch
        try:
            self._store.save(topo, self._records, bar)
        except Exception:
            # Memory must never run ahead of the disk: reload what is there.
            self._load()
            raise
        self._topo = topo
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

    def _answer(self, broker_id: str) -> dict[str, Any]:
        return {"term": self.term, "epoch": self.epoch,
                "state": self._topo.brokers[broker_id].state.value}


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


def _check_addr(addr: str) -> None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"bad address {addr!r}: expected host:port")
