"""Cluster-wide tenant rate limits (docs/design.md §11): budget shares leased to brokers.

A tenant limit `max` starts per `per_ms` covers queues that may live on
several brokers. The coordinator never sees a job: it leases each broker
that owns some of the tenant's queues a *share* (starts per `per_ms` on that
broker, across the tenant's queues there), in the answer to that broker's
heartbeat, and the broker enforces its share exactly in its pull path
(broker/limits.py `TenantShare`). Shares always sum to at most `max`.

Shares follow demand: each heartbeat reports, per tenant, the broker's
demand (waiting jobs + recent starts of the tenant's queues) and the lease
version it applies. Every `REBALANCE_MS` the targets are recomputed: a
quarter of `max` split evenly between the owners, the rest by demand.

The rule that bounds the overshoot: a share goes DOWN at once, but another
broker's share goes UP only with budget nobody may still be using, i.e.

    granted(b) <= max - sum(effective(o) for o != b)
    effective(o) = max(share(o), previous share(o) until o confirmed the
                       decrease and per_ms has passed since)

A broker enforces its share over a sliding window that still holds the
starts made under its old share, so in any window of `per_ms` the starts of
all brokers add up to at most `max` (docs/design.md §11 bound; see
docs/features-sched.md for the exceptions).

Leases last `LEASE_MS` on the broker's own clock and are renewed by every
heartbeat. With the coordinator down, brokers keep their last lease until it
expires, then fall back to `min(share, max // owners)`: shares only ever go
down without the coordinator, so the bound holds. After a coordinator
restart, an owner not yet heard from is assumed to use the whole `max` for
one lease period, so nobody's share grows on stale knowledge.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from shardq.router import Topology, partition_name

from .errors import BadRequest

LEASE_MS = 5000
REBALANCE_MS = 1000
MAX_QUEUES = 1000
RATE_MAX = 10_000_000
PER_MS_MAX = 86_400_000


class TenantStore(Protocol):
    def load_tenants(self) -> dict[str, Any]: ...

    def save_tenants(self, tenants: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class Grant:
    """What one broker was leased for one tenant."""

    share: int = 0
    version: int = 0
    confirmed_ms: float | None = None  # when the broker reported `version` (None: not yet)
    prior: int = 0  # share before the last decrease: counts until confirmed + per_ms

    def effective(self, now: float, per_ms: int) -> int:
        if self.prior > self.share and (
                self.confirmed_ms is None or now < self.confirmed_ms + per_ms):
            return self.prior
        return self.share


@dataclass(slots=True)
class Tenant:
    queues: list[str]
    max: int
    per_ms: int
    grants: dict[str, Grant] = field(default_factory=dict)
    demand: dict[str, int] = field(default_factory=dict)
    targets: dict[str, int] = field(default_factory=dict)
    targets_ms: float = float("-inf")

    def config(self) -> dict[str, Any]:
        return {"queues": self.queues, "max": self.max, "per_ms": self.per_ms}


def _monotonic_ms() -> float:
    return time.monotonic() * 1000.0


class TenantBook:
    """Tenant limits, their leases and the brokers' demand (coordinator side).

    Args:
        store: persists the tenant configs (leases are soft state).
        term: the coordinator's term; lease versions are `term * 1e6 + n`, so
            they grow across restarts.
        clock: monotonic ms (tests inject one).
    """

    def __init__(self, store: TenantStore | None, term: int = 0,
                 clock: Callable[[], float] = _monotonic_ms, lease_ms: int = LEASE_MS) -> None:
        self._store = store
        self._clock = clock
        self.lease_ms = lease_ms
        self._started = clock()
        self._version = term * 1_000_000
        self._heard: set[str] = set()  # brokers that reported since this start
        self.tenants: dict[str, Tenant] = {}
        for name, c in (store.load_tenants() if store else {}).items():
            self.tenants[name] = Tenant(list(c["queues"]), int(c["max"]), int(c["per_ms"]))

    # -- configuration -------------------------------------------------------------
    def set(self, name: str, queues: Any, limit: Any, per_ms: Any) -> dict[str, Any]:
        """Set (or with `limit` None, remove) a tenant's limit; persisted.

        Raises:
            BadRequest: a bad name, queue list, max or per_ms.
        """
        if not isinstance(name, str) or not name or len(name) > 256:
            raise BadRequest("tenant must be a non-empty string of at most 256 chars")
        if limit is None:
            self.tenants.pop(name, None)
            self._save()
            return {"tenant": name, "removed": True}
        if (not isinstance(queues, list) or not queues or len(queues) > MAX_QUEUES
                or not all(isinstance(q, str) and q for q in queues)):
            raise BadRequest(f"queues must be a list of 1-{MAX_QUEUES} queue names")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= RATE_MAX:
            raise BadRequest(f"max must be an integer in [1, {RATE_MAX}] or null")
        if (not isinstance(per_ms, int) or isinstance(per_ms, bool)
                or not 1 <= per_ms <= PER_MS_MAX):
            raise BadRequest(f"per_ms must be an integer in [1, {PER_MS_MAX}]")
        t = self.tenants.get(name)
        if t is None:
            t = self.tenants[name] = Tenant(list(dict.fromkeys(queues)), limit, per_ms)
        else:
            if limit < t.max or per_ms != t.per_ms:
                # Shares of the old limit may be in use: shrink them first.
                for g in t.grants.values():
                    g.prior = max(g.prior, g.share)
                    g.confirmed_ms = None
            t.queues, t.max, t.per_ms = list(dict.fromkeys(queues)), limit, per_ms
        t.targets_ms = float("-inf")
        self._save()
        return {"tenant": name, **t.config()}

    def view(self) -> dict[str, Any]:
        """`GET /tenants`: configs with each broker's share and demand."""
        return {name: {**t.config(),
                       "shares": {b: g.share for b, g in sorted(t.grants.items())},
                       "demand": dict(sorted(t.demand.items()))}
                for name, t in sorted(self.tenants.items())}

    def _save(self) -> None:
        if self._store is not None:
            self._store.save_tenants({n: t.config() for n, t in self.tenants.items()})

    # -- heartbeats ----------------------------------------------------------------
    def observe(self, broker: str, stats: Mapping[str, Any] | None) -> None:
        """A heartbeat's `tenants` stats: {tenant: {version, max, demand}}."""
        reported = (stats or {}).get("tenants")
        if not isinstance(reported, dict):
            reported = {}
        now = self._clock()
        first = broker not in self._heard
        self._heard.add(broker)
        for name, t in self.tenants.items():
            r = reported.get(name)
            if not isinstance(r, dict):
                t.demand.pop(broker, None)
                continue
            t.demand[broker] = max(0, int(r.get("demand", 0) or 0))
            g = t.grants.get(broker)
            version, share = int(r.get("version", 0) or 0), int(r.get("max", 0) or 0)
            if g is None and first:
                # Learned after a restart: the broker enforces this share.
                g = t.grants[broker] = Grant(share, version, now)
                self._version = max(self._version, version)
            elif g is not None and version == g.version and g.confirmed_ms is None:
                g.confirmed_ms = now

    def heartbeat(self, broker: str, stats: Mapping[str, Any] | None,
                  topo: Topology) -> dict[str, Any] | None:
        """Observe a heartbeat and return its answer's `leases`; None (no key)
        while neither the cluster nor that broker has any tenant limit."""
        self.observe(broker, stats)
        if not self.tenants and not (stats or {}).get("tenants"):
            return None
        return self.leases_for(broker, topo)

    def leases_for(self, broker: str, topo: Topology) -> dict[str, Any]:
        """The `leases` of a heartbeat answer to `broker`:
        {tenant: {queues, max, per_ms, ttl_ms, fallback, version}}."""
        now = self._clock()
        out: dict[str, Any] = {}
        for name, t in self.tenants.items():
            owners = _owners(t.queues, topo)
            if now - t.targets_ms >= REBALANCE_MS or set(t.targets) != owners:
                t.targets = _targets(t.max, owners, t.demand)
                t.targets_ms = now
            g = self._regrant(t, broker, now)
            if g is None:
                continue
            out[name] = {"queues": t.queues, "max": g.share, "per_ms": t.per_ms,
                         "ttl_ms": self.lease_ms, "version": g.version,
                         "fallback": t.max // max(1, len(owners))}
        return out

    def _regrant(self, t: Tenant, broker: str, now: float) -> Grant | None:
        target = t.targets.get(broker, 0)
        g = t.grants.get(broker)
        if g is None:
            if target == 0:
                return None
            g = t.grants[broker] = Grant()
        if target < g.share:
            g.prior = max(g.effective(now, t.per_ms), g.share)
            g.share = target
            g.confirmed_ms = None
            self._version += 1
            g.version = self._version
        elif target > g.share:
            others = sum(o.effective(now, t.per_ms) for b, o in t.grants.items() if b != broker)
            if now - self._started < self.lease_ms:
                # Owners not heard from since this start may hold any share.
                others += t.max * sum(1 for b in t.targets if b not in self._heard
                                      and b != broker)
            grant = min(target, t.max - others)
            if grant > g.share:
                g.share = grant
                g.confirmed_ms = None
                self._version += 1
                g.version = self._version
        if g.share == 0 and g.effective(now, t.per_ms) == 0 and broker not in t.targets:
            del t.grants[broker]  # no longer an owner, and its old share is spent
            return None
        return g


def _owners(queues: list[str], topo: Topology) -> set[str]:
    owners: set[str] = set()
    for q in queues:
        p = topo.partitions.get(q)
        for name in ([partition_name(q, i) for i in range(p)] if p else [q]):
            owner = topo.owner_of(name)
            if owner is not None:
                owners.add(owner)
    return owners


def _targets(limit: int, owners: set[str], demand: Mapping[str, int]) -> dict[str, int]:
    """A quarter of `limit` evenly, the rest by demand (evenly with none)."""
    if not owners:
        return {}
    order = sorted(owners)
    k = len(order)
    base = limit // (4 * k)
    rest = limit - base * k
    total = sum(demand.get(b, 0) for b in order)
    shares = {b: base + (rest * demand.get(b, 0) // total if total else rest // k)
              for b in order}
    left = limit - sum(shares.values())
    for b in sorted(order, key=lambda b: -demand.get(b, 0))[:left]:
        shares[b] += 1
    return shares
