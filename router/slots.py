"""Slot math: which of the 4096 slots a queue lives in (docs/design.md §5, §7).

Every hash in shardq is MurmurHash3 x64-128, seed 0, first 64-bit half,
read as *unsigned*::

    h(s) = mmh3.hash64(s.encode(), 0, True, False)[0]   # then & (2**64 - 1)

The mask is not decoration. mmh3 5.3.1 (the version pinned in the venv)
ignores the fourth positional argument (`signed`) and returns a signed
value unless `signed=False` is passed by keyword. `% 4096` is immune
(2**64 is a multiple of 4096), but ring point order and `% P` for
partitions are not, so masking is the one form that is right on every
mmh3 release. The golden vectors in tests/unit/test_router.py pin it.

Keys are encoded with `str.encode()` rather than handing `str` to mmh3:
a lone surrogate then raises `UnicodeEncodeError` instead of crashing the
interpreter (mmh3 5.3.1 segfaults on `hash64("\\ud800")`).
"""

from __future__ import annotations

from typing import Final

import mmh3

NUM_SLOTS: Final = 4096
PARTITION_SEP: Final = "~"

_MASK64: Final = (1 << 64) - 1
# slot_of is on every routed request. A hash costs ~140 ns here, a dict hit
# ~25 ns; queue names repeat (one queue per pipeline stage), so a cache
# pays. It is bounded: past _CACHE_MAX distinct names it is emptied and
# refilled, which keeps memory flat and, at worst, costs one hash per call.
_CACHE_MAX: Final = 1 << 15
_slot_cache: dict[str, int] = {}
_hash64 = mmh3.hash64


def hash64(s: str) -> int:
    """The unsigned 64-bit MurmurHash3 of `s` (UTF-8, seed 0).

    Args:
        s: any string.

    Returns:
        An int in ``[0, 2**64)``.

    Raises:
        UnicodeEncodeError: `s` holds a lone surrogate.
    """
    return _hash64(s.encode(), 0, True, False)[0] & _MASK64


def slot_of(queue: str) -> int:
    """The slot of a queue: ``hash64(queue) % NUM_SLOTS``.

    Args:
        queue: the queue name (a partition's own name, e.g. ``"q~3"``).

    Returns:
        An int in ``[0, NUM_SLOTS)``.
    """
    slot = _slot_cache.get(queue)
    if slot is None:
        slot = (_hash64(queue.encode(), 0, True, False)[0] & _MASK64) % NUM_SLOTS
        if len(_slot_cache) >= _CACHE_MAX:
            _slot_cache.clear()
        _slot_cache[queue] = slot
    return slot


def partition_name(name: str, i: int) -> str:
    """The stored name of partition `i` of a partitioned queue: ``f"{name}~{i}"``."""
    return f"{name}{PARTITION_SEP}{i}"


def partition_for(key: str, p: int) -> int:
    """Which of `p` partitions a partition key (or job id) goes to: ``hash64(key) % p``.

    Raises:
        ValueError: `p` < 1.
    """
    if p < 1:
        raise ValueError(f"a partitioned queue needs at least 1 partition, got {p}")
    return hash64(key) % p
