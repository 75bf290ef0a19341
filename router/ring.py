"""The consistent-hash ring: where slots *should* live (docs/design.md §5).

Each broker puts ``vnodes * weight`` points ``h(f"{broker_id}#{i}")`` on a
64-bit circle; slot s belongs to the first point at or after
``h(f"slot:{s}")``, wrapping past the top. Adding a broker therefore only
takes arcs from others (every retargeted slot goes to it), and removing
one only hands its own arcs on. The ring never moves anything: the
planner compares it with the explicit per-slot ownership in the topology.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from functools import cache

from .slots import NUM_SLOTS, hash64

DEFAULT_VNODES = 160


@cache
def _slot_points() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Each slot's ring position, and the slots ordered by that position."""
    points = tuple(hash64(f"slot:{s}") for s in range(NUM_SLOTS))
    order = tuple(sorted(range(NUM_SLOTS), key=points.__getitem__))
    return points, order


class Ring:
    """An immutable ring over weighted brokers.

    Args:
        brokers: broker id -> integer weight (0 puts no points on the ring).
        vnodes: points per unit of weight.

    Raises:
        ValueError: a negative weight, `vnodes` < 1, or no point at all
            (no broker, or every weight 0).
    """

    __slots__ = ("_hashes", "_owners", "_weights", "vnodes")

    def __init__(self, brokers: Mapping[str, int], vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        for broker_id, weight in brokers.items():
            if weight < 0:
                raise ValueError(f"broker {broker_id!r} has negative weight {weight}")
        # Sorting (hash, id) pairs makes even a 64-bit collision resolve the
        # same way in every process, whatever the mapping's order.
        points = sorted(
            (hash64(f"{broker_id}#{i}"), broker_id)
            for broker_id, weight in brokers.items()
            for i in range(vnodes * weight)
        )
        if not points:
            raise ValueError(
                "empty ring: it needs at least one broker with weight >= 1 "
                f"(got {dict(brokers)!r})"
            )
        self.vnodes = vnodes
        self._weights = dict(brokers)
        self._hashes = [h for h, _ in points]
        self._owners = [b for _, b in points]

    @property
    def brokers(self) -> dict[str, int]:
        """A copy of the broker -> weight map the ring was built from."""
        return dict(self._weights)

    def __len__(self) -> int:
        """The number of points on the ring."""
        return len(self._hashes)

    def __repr__(self) -> str:
        return f"Ring({self._weights!r}, vnodes={self.vnodes})"

    def target(self, slot: int) -> str:
        """The broker slot `slot` should live on.

        Raises:
            ValueError: `slot` is not in ``[0, NUM_SLOTS)``.
        """
        if not 0 <= slot < NUM_SLOTS:
            raise ValueError(f"slot {slot} out of range [0, {NUM_SLOTS})")
        i = bisect_left(self._hashes, _slot_points()[0][slot])
        return self._owners[i if i < len(self._owners) else 0]

    def targets(self) -> list[str]:
        """Every slot's target, indexed by slot.

        One sweep over slots sorted by position (sorted once per process)
        and the points, instead of 4096 binary searches.
        """
        points, order = _slot_points()
        hashes, owners = self._hashes, self._owners
        n = len(hashes)
        out: list[str] = [owners[0]] * NUM_SLOTS  # slots past the last point wrap to 0
        i = 0
        for slot in order:
            h = points[slot]
            while i < n and hashes[i] < h:
                i += 1
            if i == n:
                break
            out[slot] = owners[i]
        return out
