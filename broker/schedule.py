"""Job schedulers' tick math (BullMQ's job schedulers / repeatable jobs).

A scheduler is `{"id", "every_ms" | "cron", "tz", "name", "data", "opts",
"next_tick_ms"}`. `every_ms` ticks fall on multiples of every_ms since the
Unix epoch; cron ticks on the cron times in `tz` (croniter parses them, and
zoneinfo gives the zone). Pure functions of the time passed in.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from shardq.errors import BadRequestError

MIN_EVERY_MS = 10


def validate(spec: dict[str, Any]) -> dict[str, Any]:
    """Check an upsert; returns the normalised scheduler (without next tick)."""
    every, cron = spec.get("every_ms"), spec.get("cron")
    if (every is None) == (cron is None):
        raise BadRequestError("a scheduler needs exactly one of every_ms or cron")
    tz = spec.get("tz") or "UTC"
    if not isinstance(tz, str):
        raise BadRequestError("tz must be a time zone name such as 'UTC' or 'Europe/Paris'")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise BadRequestError(f"unknown time zone {tz!r}") from exc
    if every is not None and (not isinstance(every, int) or isinstance(every, bool)
                              or every < MIN_EVERY_MS):
        raise BadRequestError(f"every_ms must be an integer >= {MIN_EVERY_MS}")
    if cron is not None and (not isinstance(cron, str) or len(cron.split()) != 5
                             or not croniter.is_valid(cron)):
        raise BadRequestError(f"invalid cron expression {cron!r}: expected 5 fields, "
                              "e.g. '0 9 * * *'")
    return {"every_ms": every, "cron": cron, "tz": tz}


def next_tick(sched: dict[str, Any], after_ms: int) -> int:
    """The first tick strictly after `after_ms`."""
    every = sched.get("every_ms")
    if every:
        return (after_ms // int(every) + 1) * int(every)
    zone = ZoneInfo(sched.get("tz") or "UTC")
    start = datetime.fromtimestamp(after_ms / 1000, tz=zone)
    it = croniter(sched["cron"], start)
    tick = int(it.get_next(float) * 1000)
    while tick <= after_ms:  # croniter works in whole seconds
        tick = int(it.get_next(float) * 1000)
    return tick


def latest_due(sched: dict[str, Any], now_ms: int) -> int | None:
    """The latest tick <= now that is not before the scheduler's next tick:
    after downtime one job for the latest missed tick, not a burst."""
    due = int(sched["next_tick_ms"])
    if due > now_ms:
        return None
    every = sched.get("every_ms")
    if every:
        return max(due, now_ms // int(every) * int(every))
    latest = due
    while True:
        nxt = next_tick(sched, latest)
        if nxt > now_ms:
            return latest
        latest = nxt
