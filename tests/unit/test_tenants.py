"""coordinator/tenants.py: tenant limit shares leased to brokers (docs/design.md §11).

The bound: whatever the demand does, the shares brokers may be enforcing
within any window of `per_ms` add up to at most `max`.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardq.coordinator.errors import BadRequest
from shardq.coordinator.tenants import LEASE_MS, TenantBook, _targets
from tests.props import examples

PROPS = settings(
    max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Topo:
    """The two things TenantBook reads of a topology."""

    def __init__(self, owners: dict[str, str]) -> None:
        self.owners = owners
        self.partitions: dict[str, int] = {}

    def owner_of(self, queue: str) -> str | None:
        return self.owners.get(queue)


class MemStore:
    def __init__(self) -> None:
        self.saved: dict[str, Any] = {}

    def load_tenants(self) -> dict[str, Any]:
        return dict(self.saved)

    def save_tenants(self, tenants: dict[str, Any]) -> None:
        self.saved = dict(tenants)


class Sim:
    """Brokers heartbeating a TenantBook; records each broker's enforced share."""

    def __init__(self, limit: int, per_ms: int, brokers: list[str]) -> None:
        self.now = 10_000.0
        self.book = TenantBook(MemStore(), term=1, clock=lambda: self.now)
        self.limit, self.per_ms = limit, per_ms
        self.applied: dict[str, dict[str, int]] = {b: {"version": 0, "max": 0} for b in brokers}
        self.timeline: list[tuple[float, str, int]] = []  # (time, broker, share from then)
        self.demand = dict.fromkeys(brokers, 0)

    def beat(self, broker: str, topo: Topo) -> dict[str, Any]:
        a = self.applied[broker]
        self.book.observe(broker, {"tenants": {"t": {**a, "demand": self.demand[broker]}}})
        lease = self.book.leases_for(broker, topo).get("t")
        share = lease["max"] if lease else 0
        if share != a["max"] or not lease:
            self.timeline.append((self.now, broker, share))
        self.applied[broker] = {"version": lease["version"] if lease else 0, "max": share}
        return lease or {}

    def worst_window(self) -> int:
        """Max over windows [t - per_ms, t] of the sum of each broker's largest
        share in force at some point of the window."""
        events = sorted(self.timeline)
        brokers = {b for _, b, _ in events}
        worst = 0
        for t, _, _ in events:
            total = 0
            for b in brokers:
                before = [s for (u, bb, s) in events if bb == b and u <= t - self.per_ms]
                inside = [s for (u, bb, s) in events if bb == b and t - self.per_ms < u <= t]
                total += max([*before[-1:], *inside, 0])
            worst = max(worst, total)
        return worst


def test_shares_split_a_quarter_evenly_and_the_rest_by_demand() -> None:
    assert _targets(100, {"a", "b"}, {}) == {"a": 50, "b": 50}
    assert _targets(100, {"a", "b"}, {"a": 30, "b": 10}) == {"a": 69, "b": 31}
    assert sum(_targets(7, {"a", "b", "c"}, {"a": 1}).values()) == 7
    assert _targets(10, set(), {}) == {}


@PROPS
@given(limit=st.integers(1, 200), per_ms=st.sampled_from([100, 1000, 3000]),
       steps=st.lists(st.tuples(st.sampled_from(["b1", "b2", "b3"]), st.integers(0, 500),
                                st.integers(0, 1500), st.booleans()),
                      min_size=1, max_size=60))
def test_shares_never_add_up_to_more_than_the_limit_in_any_window(
        limit: int, per_ms: int, steps: list[tuple[str, int, int, bool]]) -> None:
    sim = Sim(limit, per_ms, ["b1", "b2", "b3"])
    sim.book.set("t", ["q1", "q2", "q3"], limit, per_ms)
    topo = Topo({"q1": "b1", "q2": "b2", "q3": "b3"})
    for broker, demand, dt, move in steps:
        sim.now += dt
        sim.demand[broker] = demand
        if move:  # a handoff: q3 changes owner
            topo.owners["q3"] = "b1" if topo.owners["q3"] != "b1" else "b3"
        sim.beat(broker, topo)
    assert sim.worst_window() <= limit


def test_shares_follow_demand_once_decreases_are_confirmed() -> None:
    sim = Sim(100, 1000, ["b1", "b2"])
    sim.book.set("t", ["q1", "q2"], 100, 1000)
    topo = Topo({"q1": "b1", "q2": "b2"})
    sim.now += LEASE_MS  # past the restart caution
    assert sim.beat("b1", topo)["max"] == 50
    assert sim.beat("b2", topo)["max"] == 50
    sim.demand = {"b1": 900, "b2": 0}
    sim.now += 1000
    assert sim.beat("b1", topo)["max"] == 50  # up only once b2 confirmed + per_ms
    assert sim.beat("b2", topo)["max"] == 12  # down at once
    sim.now += 500
    sim.beat("b2", topo)  # confirms
    sim.now += 999
    assert sim.beat("b1", topo)["max"] == 50
    sim.now += 1
    assert sim.beat("b1", topo)["max"] == 88
    assert sim.worst_window() <= 100


def test_a_restarted_coordinator_grows_no_share_before_hearing_every_owner() -> None:
    store = MemStore()
    now = [0.0]
    book = TenantBook(store, term=1, clock=lambda: now[0])
    book.set("t", ["q1", "q2"], 100, 1000)
    topo = Topo({"q1": "b1", "q2": "b2"})
    now[0] = 100_000
    again = TenantBook(store, term=2, clock=lambda: now[0])
    assert again.tenants["t"].max == 100  # the config was persisted
    # b2 still enforces 90 from the old term; b1 asks first.
    again.observe("b1", {"tenants": {"t": {"version": 1, "max": 10, "demand": 5}}})
    assert again.leases_for("b1", topo)["t"]["max"] == 10
    again.observe("b2", {"tenants": {"t": {"version": 2, "max": 90, "demand": 5}}})
    lease = again.leases_for("b2", topo)["t"]
    assert lease["max"] == 12 and lease["version"] > 2_000_000  # down at once, new term
    assert lease["fallback"] == 50 and lease["ttl_ms"] == LEASE_MS


def test_bad_tenant_settings_are_refused_and_removal_persists() -> None:
    store = MemStore()
    book = TenantBook(store, clock=lambda: 0.0)
    for queues, limit, per_ms in [([], 5, 1000), (["q"], 0, 1000), (["q"], 5, 0),
                                  ("q", 5, 1000), ([3], 5, 1000)]:
        with pytest.raises(BadRequest):
            book.set("t", queues, limit, per_ms)
    book.set("t", ["q"], 5, 1000)
    assert store.saved == {"t": {"queues": ["q"], "max": 5, "per_ms": 1000}}
    book.set("t", None, None, None)
    assert store.saved == {} and book.view() == {}
