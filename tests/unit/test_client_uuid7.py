"""uuid7: format, uniqueness, monotonic order (also when the clock steps back)."""

from __future__ import annotations

import re
import uuid

from shardq.client import ids as uuid7_mod
from shardq.client.ids import uuid7

_FORMAT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_uuid7_has_the_canonical_format_version_and_variant() -> None:
    for _ in range(1000):
        s = uuid7()
        assert _FORMAT.match(s), s
        u = uuid.UUID(s)
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        assert str(u) == s


def test_uuid7_timestamp_is_unix_milliseconds() -> None:
    import time

    before = time.time_ns() // 1_000_000
    ms = uuid.UUID(uuid7()).int >> 80
    after = time.time_ns() // 1_000_000
    assert before <= ms <= after + 1


def test_uuid7_is_unique_and_sorts_in_creation_order() -> None:
    ids = [uuid7() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_uuid7_stays_monotonic_when_the_clock_steps_back(monkeypatch) -> None:
    now = [2_000_000_000_000 * 1_000_000]
    monkeypatch.setattr(uuid7_mod.time, "time_ns", lambda: now[0])
    a = uuid7()
    now[0] -= 5_000 * 1_000_000  # 5 s back
    b = uuid7()
    assert b > a


def test_uuid7_counter_overflow_borrows_the_next_millisecond(monkeypatch) -> None:
    monkeypatch.setattr(uuid7_mod.time, "time_ns", lambda: 3_000_000_000_000 * 1_000_000)
    ids = [uuid7() for _ in range(10_000)]  # > 4096 in one frozen millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
