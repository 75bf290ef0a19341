"""How many examples each hypothesis property tries.

`make test` runs the full counts written at each test; `make check` (the
quick tier, `SHARDQ_QUICK=1`) runs a fifth of them, at least 10, so the unit
tier stays under a minute while every property still runs.
"""

from __future__ import annotations

import os

QUICK = os.environ.get("SHARDQ_QUICK") == "1"


def examples(n: int) -> int:
    """`n` examples, or a fifth of them (at least 10) in the quick tier."""
    return max(10, n // 5) if QUICK else n
