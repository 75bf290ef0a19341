"""RecentFinishes: what a resent ACK/FAIL is checked against, and its bounds."""

from __future__ import annotations

from shardq.broker.acks import RecentFinishes


def test_a_recorded_token_matches_only_its_own_job() -> None:
    r = RecentFinishes()
    r.record("q", "j1", 42)
    assert r.finished("q", "j1", 42)
    assert not r.finished("q", "j2", 42) and not r.finished("other", "j1", 42)
    assert not r.finished("q", "j1", 43)


def test_capacity_and_age_bound_what_is_remembered() -> None:
    now = [0.0]
    r = RecentFinishes(capacity=3, ttl_ms=1000, clock=lambda: now[0])
    for t in range(5):
        r.record("q", f"j{t}", t)
    assert len(r) == 3 and not r.finished("q", "j0", 0) and r.finished("q", "j4", 4)
    now[0] = 1.5  # past the age
    assert not r.finished("q", "j4", 4)


def test_expired_entries_go_a_few_per_record() -> None:
    now = [0.0]
    r = RecentFinishes(capacity=100, ttl_ms=1000, clock=lambda: now[0])
    for t in range(5):
        r.record("q", f"j{t}", t)
    now[0] = 1.5
    r.record("q", "late", 99)
    assert len(r) == 4  # two of the five expired ones dropped (amortized O(1))
    r.record("q", "later", 100)
    r.record("q", "latest", 101)
    assert len(r) == 3 and r.finished("q", "late", 99) and r.finished("q", "latest", 101)
