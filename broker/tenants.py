"""The broker's side of cluster-wide tenant rate limits (docs/design.md §11).

The coordinator (coordinator/tenants.py) leases this broker a share of a
tenant's limit in each heartbeat answer: `{tenant: {queues, max, per_ms,
ttl_ms, fallback, version}}`. Here the tenant's queues that this broker
serves are tagged (`bT`, in the queue's meta, so the tag moves with the
queue), each lease is renewed for `ttl_ms` on this broker's clock and
persisted (`bL`, broker state), and the demand the coordinator divides the
limit by is reported back with the heartbeat's stats.

A tenant's share is enforced across its queues here by one sliding window
(`TenantShare.window`, broker/limits.py), fed by every start of a tagged
queue; each queue also keeps its own tenant window in its meta, so after a
restart or a handoff the starts of the last `per_ms` still count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shardq.broker.limits import TenantShare, Window
from shardq.broker.queue import QueueState
from shardq.errors import MovedError, TryAgainError
from shardq.router import partition_name, slot_of

if TYPE_CHECKING:
    from shardq.broker.engine import Broker


def adopt_window(shares: dict[str, TenantShare], q: QueueState) -> None:
    """Merge a tagged queue's recent tenant starts into the broker's window
    (the queue's previous owner keeps counting them too: no overshoot)."""
    assert q.tenant is not None
    ts = shares.get(q.tenant)
    if ts is None:
        ts = shares[q.tenant] = TenantShare()  # no lease yet: the queue waits for one
    if ts.window is None:
        ts.window = Window()
    w = q.windows.get("t")
    if w is not None:
        ts.window.merge(w.runs)


def _renew(b: Broker, leases: dict[str, Any]) -> dict[str, str]:
    """Take the leases; return {stored queue name: tenant}."""
    now = b.clock()
    shares = b.defaults.tenants
    members: dict[str, str] = {}
    for name, lease in leases.items():
        ts = shares.get(name)
        if ts is None:
            ts = shares[name] = TenantShare(window=Window())
        ts.max, ts.per_ms = int(lease["max"]), int(lease["per_ms"])
        ts.fallback, ts.version = int(lease["fallback"]), int(lease["version"])
        ts.until = now + int(lease["ttl_ms"])
        for qn in lease["queues"]:
            p = b.topology.partitions.get(qn)
            for stored in [partition_name(qn, i) for i in range(p)] if p else [qn]:
                members[stored] = name
    for name in [t for t in shares if t not in leases]:
        del shares[name]  # the coordinator dropped the tenant (or our last queue of it)
    return members


def apply_leases(b: Broker, leases: dict[str, Any]) -> None:
    """Apply a heartbeat answer's leases: renew, tag queues, persist, wake."""
    if not leases and not b.defaults.tenants:
        return
    members = _renew(b, leases)
    for qn in members:
        if qn not in b.queues and b.owned[slot_of(qn)]:
            try:
                b.queue_for(qn)  # tagged before its first job arrives
            except (MovedError, TryAgainError):
                pass
    for q in b.queues.values():
        if b.serves(q) and q.set_tenant(members.get(q.name)) and q.tenant is not None:
            adopt_window(b.defaults.tenants, q)
    b.log.append(("bL", None, {n: ts.to_dict() for n, ts in b.defaults.tenants.items()}))
    b.commits.flush_soon()
    for qn in members:  # a share may have grown
        if qn in b.waiters:
            b.serve_waiters(qn)


def demand(b: Broker) -> dict[str, Any]:
    """Per tenant, for the heartbeat: the lease version applied, its share, and
    this broker's demand (waiting jobs + starts in the window)."""
    shares = b.defaults.tenants
    if not shares:
        return {}
    now = b.clock()
    out: dict[str, Any] = {name: {"version": ts.version, "max": ts.max, "demand": 0}
                           for name, ts in shares.items()}
    for q in b.queues.values():
        if q.tenant in out and b.serves(q):
            w = q.windows.get("t")
            used = w.used(now, shares[q.tenant].per_ms) if w is not None else 0
            out[q.tenant]["demand"] += q.n_waiting + used
    return out
