"""Replication state and follower placement (docs/design.md §12).

With `--replicas 1` the coordinator keeps, per primary (every broker that is
active or owns slots):

    {follower, in_sync, repl_epoch, failover?}

in its store (`meta` key `replication`) and publishes it as the topology's
`replication` section, with each primary's `lag_ops` from its heartbeat.
It changes only by compare-and-set, each change persisted (and the topology
republished at a new epoch) before it is answered:

* placement (`reconcile`): a primary without a usable follower (none, not
  active, or itself) gets one, out of sync at a new `repl_epoch`: another
  active broker, on another `--zone` label when there is one, following as
  few primaries as possible, the next one after it in id order on a tie;
* `out_of_sync` (asked by a primary that lost its follower) and `in_sync`
  (asked by a primary whose follower caught up), both for the `repl_epoch`
  the primary holds: a stale epoch changes nothing and gets the current
  record, with `fenced` true once a failover of that primary began (a
  failed-over primary that returns keeps `fenced_below`: the epoch below
  which what it held is never answered);
* failover (failover.py) sets `failover: {to, phase, epoch}`.

With `--replicas 0` none of this exists: no section, no state, no calls.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from shardq.router import BrokerState

from .errors import BadRequest, NotFound
from .membership import Membership, natural_key
from .state import Store

log = logging.getLogger("shardq.coordinator.replication")

META_KEY = "replication"
_FOLLOWS = frozenset({BrokerState.ACTIVE})  # who may be a follower
_PRIMARY = frozenset({BrokerState.ACTIVE, BrokerState.DRAINING, BrokerState.LEAVING})


class ReplicationBook:
    """Per-primary replication records (see the module doc).

    Args:
        membership: the topology it follows; its `/topology` gains the section.
        store: where the records live (the coordinator's store).
        replicas: 0 or 1.
    """

    def __init__(self, membership: Membership, store: Store, replicas: int) -> None:
        if replicas not in (0, 1):
            raise ValueError(f"replicas must be 0 or 1, got {replicas}")
        self.m = membership
        self.replicas = replicas
        loaded = store.load_meta(META_KEY)
        self.state: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}
        self.zones: dict[str, str] = {}
        self.failovers: dict[str, int] = {}  # result -> count, for metrics
        if replicas:
            membership.replication_view = self.view

    @property
    def enabled(self) -> bool:
        return self.replicas > 0

    # -- reads ---------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        """The topology's `replication` section."""
        out: dict[str, Any] = {}
        for primary, rec in self.state.items():
            out[primary] = {**copy.deepcopy(rec), "lag_ops": self.lag_ops(primary)}
        return out

    def lag_ops(self, primary: str) -> int | None:
        """Batches the primary shipped that its follower has not acknowledged
        (from its last heartbeat; None when unknown or not streaming)."""
        stats = self.m.stats_of(primary) or {}
        link = (stats.get("replication") or {}).get("link") if isinstance(stats, dict) else None
        lag = link.get("lag_ops") if isinstance(link, dict) else None
        return lag if isinstance(lag, int) and lag >= 0 else None

    def status_rows(self, rows: list[dict[str, Any]]) -> None:
        """Add each broker's follower, in-sync flag and lag to `/status` rows."""
        for row in rows:
            rec = self.state.get(row["id"])
            if rec is None:
                continue
            row["follower"] = rec.get("follower")
            row["in_sync"] = bool(rec.get("in_sync"))
            row["lag_ops"] = self.lag_ops(row["id"])
            if row["id"] in self.zones:
                row["zone"] = self.zones[row["id"]]
            if rec.get("follower") and not rec.get("in_sync") and row.get("slots"):
                row.setdefault("problem", f"degraded: follower {rec['follower']} is not in "
                                          "sync; writes are on one disk only")

    # -- changes -------------------------------------------------------------

    def save(self, new: dict[str, dict[str, Any]]) -> None:
        """Persist `new` (and republish the topology); memory follows the disk."""
        self.m.save_meta({META_KEY: new})
        self.state = new

    def note_zone(self, broker_id: str, zone: str | None) -> None:
        if zone:
            self.zones[broker_id] = zone

    def reconcile(self) -> bool:
        """Give every primary a usable follower; True when something changed."""
        if not self.enabled or not self.m.bootstrapped:
            return False
        topo = self.m.topology
        new = {p: copy.deepcopy(r) for p, r in self.state.items() if p in topo.brokers}
        counts: dict[str, int] = {}
        for r in new.values():
            if r.get("follower"):
                counts[r["follower"]] = counts.get(r["follower"], 0) + 1
        ok = {b.id for b in topo.brokers.values() if b.state in _FOLLOWS}
        for bid in sorted(topo.brokers, key=natural_key):
            if topo.brokers[bid].state in _PRIMARY:  # dead or held: the failover's business
                placed = self._place(bid, new.get(bid), ok, counts)
                if placed is not None:
                    new[bid] = placed
        if new == self.state:
            return False
        self.save(new)
        log.info("replication placement: %s", {p: r.get("follower") for p, r in new.items()})
        return True

    def _place(self, bid: str, old: dict[str, Any] | None, ok: set[str],
               counts: dict[str, int]) -> dict[str, Any] | None:
        """A new record for primary `bid`, or None when `old` stays."""
        rec = old
        fenced_below = int(old.get("fenced_below", 0)) if old is not None else 0
        fo = rec.get("failover") if rec is not None else None
        if isinstance(fo, dict) and fo.get("phase") == "done":
            # A failed-over primary is back: it starts over as a new primary, and
            # what it holds from before the fence stays fenced.
            rec = None
            fenced_below = int(old["repl_epoch"]) if old is not None else 0
        f = rec.get("follower") if rec is not None else None
        if rec is not None and f in ok and f != bid:
            return None
        if rec is not None and f is None and not (ok - {bid}):
            return None  # still nobody to follow it
        if f:
            counts[f] = counts.get(f, 0) - 1
        choice = self._choose(bid, sorted(ok - {bid}, key=natural_key), counts)
        if choice:
            counts[choice] = counts.get(choice, 0) + 1
        epoch = int(old.get("repl_epoch", 0)) + 1 if old is not None else 1
        new = {"follower": choice, "in_sync": False, "repl_epoch": epoch}
        if fenced_below:
            new["fenced_below"] = fenced_below
        return new

    def _choose(self, primary: str, candidates: list[str], counts: dict[str, int]) -> str | None:
        if not candidates:
            return None
        zone = self.zones.get(primary)
        if zone is not None:
            elsewhere = [c for c in candidates if self.zones.get(c) != zone]
            candidates = elsewhere or candidates
        # The next broker after the primary in id order, among the least loaded.
        key = natural_key(primary)
        ring = sorted(candidates, key=lambda c: (natural_key(c) <= key, natural_key(c)))
        least = min(counts.get(c, 0) for c in ring)
        return next(c for c in ring if counts.get(c, 0) == least)

    def _record(self, primary: str) -> dict[str, Any]:
        if not self.enabled:
            raise BadRequest("this coordinator runs with --replicas 0")
        rec = self.state.get(primary)
        if rec is None:
            raise NotFound(f"no replication record for {primary!r}")
        return rec

    def _answer(self, primary: str, asked_epoch: int) -> dict[str, Any]:
        """`fenced`: writes the primary holds at `asked_epoch` must never be
        answered (a failover fenced that epoch)."""
        rec = self.state.get(primary, {})
        fenced = bool(rec.get("failover")) or asked_epoch < int(rec.get("fenced_below", 0))
        return {"primary": primary, "follower": rec.get("follower"),
                "in_sync": bool(rec.get("in_sync")), "repl_epoch": int(rec.get("repl_epoch", 0)),
                "fenced": fenced, "epoch": self.m.epoch}

    def out_of_sync(self, primary: str, follower: str, repl_epoch: int) -> dict[str, Any]:
        """A primary lost its follower: record it out of sync at a new epoch,
        if `repl_epoch` is still current and no failover began."""
        rec = self._record(primary)
        if (not rec.get("failover") and rec.get("follower") == follower
                and rec.get("repl_epoch") == repl_epoch):
            new = copy.deepcopy(self.state)
            new[primary] = {**rec, "in_sync": False, "repl_epoch": repl_epoch + 1}
            self.save(new)
            log.warning("%s: follower %s out of sync (epoch %d); %s answers alone, degraded",
                        primary, follower, repl_epoch + 1, primary)
        return self._answer(primary, repl_epoch)

    def in_sync(self, primary: str, follower: str, repl_epoch: int) -> dict[str, Any]:
        """A primary's follower caught up at `repl_epoch`: record it in sync."""
        rec = self._record(primary)
        if (not rec.get("failover") and rec.get("follower") == follower
                and rec.get("repl_epoch") == repl_epoch and not rec.get("in_sync")):
            new = copy.deepcopy(self.state)
            new[primary] = {**rec, "in_sync": True}
            self.save(new)
            log.info("%s: follower %s in sync (epoch %d)", primary, follower, repl_epoch)
        return self._answer(primary, repl_epoch)
