"""uuid7: format, uniqueness, monotonic order (also when the clock steps back)."""

from __future__ import annotations

import os
import re
import uuid

import pytest

from shardq.client import ids as uuid7_mod
from shardq.client.ids import uuid7


@pytest.fixture(autouse=True, params=["uuid-utils", "fallback"])
def generator(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs against both generators behind `uuid7()`."""
    if request.param == "fallback":
        monkeypatch.setattr(uuid7_mod, "_fast", None)
    elif uuid7_mod._fast is None:
        pytest.skip("uuid-utils is not installed")
    return str(request.param)

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
    monkeypatch.setattr(uuid7_mod, "_fast", None)  # the fallback's own clock handling
    now = [2_000_000_000_000 * 1_000_000]
    monkeypatch.setattr(uuid7_mod.time, "time_ns", lambda: now[0])
    a = uuid7()
    now[0] -= 5_000 * 1_000_000  # 5 s back
    b = uuid7()
    assert b > a


def test_uuid7_counter_overflow_borrows_the_next_millisecond(monkeypatch) -> None:
    monkeypatch.setattr(uuid7_mod, "_fast", None)
    monkeypatch.setattr(uuid7_mod.time, "time_ns", lambda: 3_000_000_000_000 * 1_000_000)
    ids = [uuid7() for _ in range(10_000)]  # > 4096 in one frozen millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_makes_its_ids_with_the_reseeded_fallback() -> None:
    """uuid-utils' generator is copied as is into a forked child (parent and
    child would repeat ids within a millisecond); Python's random is reseeded."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        os.write(w, b"fallback" if uuid7_mod._fast is None else b"fast")
        os._exit(0)
    os.close(w)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.read(r, 100) == b"fallback"
    finally:
        os.close(r)
    assert status == 0
