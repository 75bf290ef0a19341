"""shardq.router: golden hash vectors, slot math and the consistent-hash ring (docs/design.md §5).

Topology and planner tests live in test_router_topology.py and
test_router_planner.py.
"""

from __future__ import annotations

import inspect
import statistics
from collections import Counter

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shardq.router as router
from shardq.router import (
    NUM_SLOTS,
    Ring,
    hash64,
    partition_for,
    partition_name,
    slot_of,
)
from shardq.router import slots as slots_module
from tests.props import examples

# Computed once with mmh3 5.3.1 as
# mmh3.hash64(s.encode(), seed=0, x64arch=True, signed=False)[0]; never edit
# them to make a test pass: every broker and client must agree on them.
GOLDEN_HASH64 = [
    ("", 0),
    ("emails", 5755870324934700989),
    ("tenant-42:send", 11329148923479612259),  # >= 2**63: catches a signed result
    ("b1#0", 5442397363395149178),
    ("b2#159", 5843545859985628411),
    ("slot:0", 16133908092357959029),
    ("slot:4095", 15001355333036902710),
    ("emails~0", 17062721861555343224),
    ("é漢", 3589047915112368588),
    ("a" * 100, 2508270112733394994),
]

GOLDEN_SLOTS = [
    ("", 0),
    ("emails", 4029),
    ("tenant-42:send", 2915),
    ("emails~0", 3960),
    ("é漢", 2508),
]

BROKERS_10 = {f"b{i}": 1 for i in range(1, 11)}


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 order: CONSTANTS, then Classes, then functions.
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


# -- hashes and slots ---------------------------------------------------------


@pytest.mark.parametrize(("s", "expected"), GOLDEN_HASH64)
def test_hash64_matches_golden_vector(s: str, expected: int) -> None:
    assert hash64(s) == expected


@pytest.mark.parametrize(("queue", "expected"), GOLDEN_SLOTS)
def test_slot_of_matches_golden_vector(queue: str, expected: int) -> None:
    assert slot_of(queue) == expected
    assert slot_of(queue) == expected  # second call answers from the cache


@given(st.text())
def test_hash64_is_the_unsigned_first_half_of_murmur3_x64_128(s: str) -> None:
    # st.text() draws no lone surrogates; those are tested below.
    expected = int.from_bytes(mmh3.hash_bytes(s.encode(), 0, True)[:8], "little")
    assert hash64(s) == expected
    assert 0 <= hash64(s) < 2**64
    assert slot_of(s) == expected % NUM_SLOTS


def test_positional_signed_flag_is_not_trusted() -> None:
    # mmh3 5.3.1 ignores a positional `signed=False`; slots.py masks instead.
    raw = mmh3.hash64(b"tenant-42:send", 0, True, False)[0]
    assert hash64("tenant-42:send") == raw & (2**64 - 1)


@pytest.mark.parametrize("fn", [hash64, slot_of])
def test_lone_surrogate_raises_instead_of_crashing(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnicodeEncodeError):
        fn("bad\ud800")


def test_slot_cache_stays_bounded_and_correct() -> None:
    limit = slots_module._CACHE_MAX
    for i in range(limit + 10):
        slot_of(f"cache-{i}")
    assert len(slots_module._slot_cache) <= limit
    assert slot_of("emails") == 4029
    assert slot_of("cache-3") == hash64("cache-3") % NUM_SLOTS


@pytest.mark.parametrize(
    ("name", "i", "expected"),
    [("emails", 0, "emails~0"), ("emails", 15, "emails~15"), ("", 3, "~3")],
)
def test_partition_name(name: str, i: int, expected: str) -> None:
    assert partition_name(name, i) == expected


@pytest.mark.parametrize(
    ("key", "p", "expected"),
    [
        ("tenant-42:send", 3, 1),  # a signed hash would give 0
        ("tenant-42:send", 1, 0),
        ("", 5, 0),
        ("emails", 4096, 4029),
    ],
)
def test_partition_for_matches_golden_vector(key: str, p: int, expected: int) -> None:
    assert partition_for(key, p) == expected


@given(st.text(max_size=30), st.integers(min_value=1, max_value=1000))
def test_partition_for_is_in_range(key: str, p: int) -> None:
    assert 0 <= partition_for(key, p) < p


@pytest.mark.parametrize("p", [0, -1])
def test_partition_for_refuses_no_partitions(p: int) -> None:
    with pytest.raises(ValueError, match="at least 1 partition"):
        partition_for("k", p)


# -- ring -----------------------------------------------------------------------


def _brute_force_target(brokers: dict[str, int], vnodes: int, slot: int) -> str:
    points = sorted(
        (hash64(f"{b}#{i}"), b) for b, w in brokers.items() for i in range(vnodes * w)
    )
    h = hash64(f"slot:{slot}")
    for point, owner in points:
        if point >= h:
            return owner
    return points[0][1]


@pytest.mark.parametrize(
    ("brokers", "vnodes"),
    [
        ({"b1": 1}, 1),
        ({"b1": 1, "b2": 1}, 1),
        ({"a": 1, "b": 2, "c": 3}, 4),
        (BROKERS_10, 160),
    ],
)
def test_target_is_first_point_at_or_after_the_slot_wrapping(
    brokers: dict[str, int], vnodes: int
) -> None:
    ring = Ring(brokers, vnodes)
    targets = ring.targets()
    assert len(targets) == NUM_SLOTS
    assert targets == [ring.target(s) for s in range(NUM_SLOTS)]
    for slot in (0, 1, 2358, 3445, 4095):
        assert ring.target(slot) == _brute_force_target(brokers, vnodes, slot)


def test_a_tiny_ring_wraps_slots_past_the_last_point() -> None:
    ring = Ring({"b1": 1, "b2": 1}, vnodes=1)
    last_point = max(hash64("b1#0"), hash64("b2#0"))
    first_owner = "b1" if hash64("b1#0") < hash64("b2#0") else "b2"
    wrapped = [s for s in range(NUM_SLOTS) if hash64(f"slot:{s}") > last_point]
    assert wrapped, "the vectors should put some slot past the last point"
    assert all(ring.target(s) == first_owner for s in wrapped)


@pytest.mark.parametrize(
    ("brokers", "vnodes", "match"),
    [
        ({}, 160, "empty ring"),
        ({"b1": 0}, 160, "empty ring"),
        ({"b1": -1}, 160, "negative weight"),
        ({"b1": 1}, 0, "vnodes"),
    ],
)
def test_ring_refuses_bad_input(brokers: dict[str, int], vnodes: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Ring(brokers, vnodes)


@pytest.mark.parametrize("slot", [-1, NUM_SLOTS])
def test_target_refuses_out_of_range_slot(slot: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Ring({"b1": 1}).target(slot)


def test_ring_ignores_mapping_order() -> None:
    forward = Ring(BROKERS_10).targets()
    backward = Ring(dict(reversed(list(BROKERS_10.items())))).targets()
    assert forward == backward


@pytest.mark.parametrize("n", range(1, 10))
def test_adding_a_broker_moves_about_one_share_all_onto_it(n: int) -> None:
    before = Ring({f"b{i}": 1 for i in range(1, n + 1)}).targets()
    after = Ring({f"b{i}": 1 for i in range(1, n + 2)}).targets()
    moved = [s for s in range(NUM_SLOTS) if before[s] != after[s]]
    assert {after[s] for s in moved} == {f"b{n + 1}"}
    # Measured ratios to 1/(n+1) are 0.88..1.12 for these names.
    share = len(moved) / NUM_SLOTS
    assert abs(share * (n + 1) - 1) <= 0.25, share


broker_names = st.lists(
    st.text(alphabet="abcxyz0123456789-", min_size=1, max_size=6),
    min_size=2,
    max_size=6,
    unique=True,
)


@settings(max_examples=examples(25), deadline=None)
@given(broker_names)
def test_adding_a_broker_only_moves_slots_onto_it(names: list[str]) -> None:
    *old, new = names
    before = Ring(dict.fromkeys(old, 1), vnodes=20).targets()
    after = Ring(dict.fromkeys(names, 1), vnodes=20).targets()
    assert all(a == b or b == new for a, b in zip(before, after, strict=True))


@settings(max_examples=examples(25), deadline=None)
@given(broker_names, st.data())
def test_removing_a_broker_only_moves_its_slots(names: list[str], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(names))
    before = Ring(dict.fromkeys(names, 1), vnodes=20).targets()
    after = Ring({b: 1 for b in names if b != gone}, vnodes=20).targets()
    for a, b in zip(before, after, strict=True):
        assert a in (b, gone)
        assert b != gone


def test_ten_brokers_at_160_vnodes_are_balanced_within_15_percent() -> None:
    counts = Counter(Ring(BROKERS_10, vnodes=160).targets())
    avg = NUM_SLOTS / len(BROKERS_10)
    # Measured: min 379, max 448 -> max/avg 1.094, stddev 19.2.
    assert max(counts.values()) / avg <= 1.15
    assert min(counts.values()) / avg >= 0.85
    assert statistics.pstdev(counts.values()) / avg <= 0.08


def test_weights_are_honoured_roughly_proportionally() -> None:
    weights = {"small": 1, "medium": 2, "large": 3}
    counts = Counter(Ring(weights).targets())
    total = sum(weights.values())
    for broker, weight in weights.items():
        expected = NUM_SLOTS * weight / total
        assert abs(counts[broker] / expected - 1) <= 0.2, (broker, counts)
    assert counts["small"] < counts["medium"] < counts["large"]


def test_ring_reports_its_inputs() -> None:
    ring = Ring({"b1": 2, "b2": 1}, vnodes=10)
    assert ring.brokers == {"b1": 2, "b2": 1}
    assert ring.vnodes == 10
    assert len(ring) == 30


# -- package surface ------------------------------------------------------------


def test_all_is_sorted_and_complete() -> None:
    assert router.__all__ == sorted(router.__all__, key=_isort_key)
    for name in router.__all__:
        assert hasattr(router, name), name
    public = {
        name
        for module in (router.slots, router.ring, router.topology, router.planner, router.members)
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    }
    assert public <= set(router.__all__)
