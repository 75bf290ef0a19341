"""Top-level sync handlers for process-pool workers (importable by spawned processes)."""

from __future__ import annotations

import os
from typing import Any


def burn(job: Any) -> dict[str, Any]:
    """CPU-bound: ~0.1-0.3 s of pure Python arithmetic, holding its process's GIL."""
    n = int(job.data["n"])
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return {"total": total, "pid": os.getpid()}


def explode(job: Any) -> None:
    raise ValueError(f"bad input {job.data['n']}")


def dispatch(job: Any) -> Any:
    return explode(job) if job.name == "explode" else burn(job)
