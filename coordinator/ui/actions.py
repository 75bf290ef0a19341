"""The dashboard's actions (`POST /ui/api/action`, only with `--ui-actions`).

Each action is one entry of `ACTIONS`: the fields it needs and a coroutine
that runs it and returns a sentence for the page. Queue and job actions go
through the Python client, so they reach the queue's owner (every
partition of a partitioned queue); broker actions are the coordinator's own
(the same calls as `POST /brokers/{id}/drain`, `/undrain`, `/rebalance`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import BadRequest

if TYPE_CHECKING:
    from shardq.client import Queue

    from .dashboard import Dashboard

Runner = Callable[["Dashboard", dict[str, str]], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Action:
    fields: tuple[str, ...]
    run: Runner


async def _queue(d: Dashboard, f: dict[str, str]) -> Queue:
    client = await d.brokers.client()
    d.brokers.forget_flags(f["queue"])
    return client.queue(f["queue"])


async def _pause(d: Dashboard, f: dict[str, str]) -> str:
    await (await _queue(d, f)).pause()
    return f"queue {f['queue']} paused: workers get no more of its jobs"


async def _resume(d: Dashboard, f: dict[str, str]) -> str:
    await (await _queue(d, f)).resume()
    return f"queue {f['queue']} resumed"


async def _dlq_retry(d: Dashboard, f: dict[str, str]) -> str:
    n = await (await _queue(d, f)).dlq_retry()
    return f"{n} dead-lettered jobs of {f['queue']} back to waiting"


async def _dlq_purge(d: Dashboard, f: dict[str, str]) -> str:
    n = await (await _queue(d, f)).dlq_purge()
    return f"{n} dead-lettered jobs of {f['queue']} removed"


async def _retry_job(d: Dashboard, f: dict[str, str]) -> str:
    await (await _queue(d, f)).retry_job(f["job_id"])
    return f"job {f['job_id']} of {f['queue']} back to waiting"


async def _remove_job(d: Dashboard, f: dict[str, str]) -> str:
    await (await _queue(d, f)).remove_job(f["job_id"])
    return f"job {f['job_id']} of {f['queue']} removed"


async def _promote_job(d: Dashboard, f: dict[str, str]) -> str:
    await (await _queue(d, f)).promote_job(f["job_id"])
    return f"job {f['job_id']} of {f['queue']} promoted to waiting"


async def _retry_failed(d: Dashboard, f: dict[str, str]) -> str:
    n = await (await _queue(d, f)).retry_jobs(state="failed")
    return f"{n} failed jobs of {f['queue']} back to waiting"


CLEANABLE = ("completed", "failed", "waiting", "prioritized", "delayed")


async def _clean(d: Dashboard, f: dict[str, str]) -> str:
    state = f.get("state") or "completed"
    if state not in CLEANABLE:
        raise BadRequest(f"clean takes one of {', '.join(CLEANABLE)}, got {state!r}")
    n = await (await _queue(d, f)).clean(0, None, state)
    return f"{n} {state} jobs of {f['queue']} removed"


async def _drain(d: Dashboard, f: dict[str, str]) -> str:
    answer = d.rb.drain(f["broker"], False)
    return f"broker {f['broker']} drains: {answer.get('state')}, {answer.get('moves', 0)} moves"


async def _undrain(d: Dashboard, f: dict[str, str]) -> str:
    answer = d.rb.undrain(f["broker"])
    return f"broker {f['broker']} undrained: {answer.get('state')}"


async def _rebalance(d: Dashboard, f: dict[str, str]) -> str:
    plan = d.rb.start("dashboard")
    return f"rebalance started: {len(plan.get('moves', []))} moves, {plan.get('slots', 0)} slots"


ACTIONS: dict[str, Action] = {
    "pause": Action(("queue",), _pause),
    "resume": Action(("queue",), _resume),
    "retry_failed": Action(("queue",), _retry_failed),
    "clean": Action(("queue",), _clean),
    "dlq_retry": Action(("queue",), _dlq_retry),
    "dlq_purge": Action(("queue",), _dlq_purge),
    "retry_job": Action(("queue", "job_id"), _retry_job),
    "remove_job": Action(("queue", "job_id"), _remove_job),
    "promote_job": Action(("queue", "job_id"), _promote_job),
    "drain": Action(("broker",), _drain),
    "undrain": Action(("broker",), _undrain),
    "rebalance": Action((), _rebalance),
}


async def run(d: Dashboard, body: dict[str, Any]) -> str:
    """Check the body against the action's fields and run it.

    Raises:
        BadRequest: unknown action, or a field missing or not a string.
    """
    name = body.get("action")
    action = ACTIONS.get(name) if isinstance(name, str) else None
    if action is None:
        raise BadRequest(f"unknown action {name!r}; one of {', '.join(sorted(ACTIONS))}")
    fields: dict[str, str] = {}
    for key in (*action.fields, "state"):
        value = body.get(key)
        if value is None and key == "state":
            continue
        if not isinstance(value, str) or not value:
            raise BadRequest(f"action {name} needs a non-empty string {key!r}")
        fields[key] = value
    return await action.run(d, fields)
