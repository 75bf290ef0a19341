"""Checks on request arguments: every bad input becomes a BadRequestError
naming what is wrong, before any state changes (docs/design.md §9.7)."""

from __future__ import annotations

from typing import Any

from shardq.errors import BadRequestError, TooLargeError
from shardq.protocol import QUEUE_NAME_MAX

ID_MAX = 256
NAME_MAX = 256


def arg(args: Any, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if not isinstance(args, dict):
        raise BadRequestError("args must be a map")
    val = args.get(key, default)
    if val is ...:
        raise BadRequestError(f"missing argument {key!r}")
    if val is default and default is not ...:
        return val
    if not isinstance(val, kind) or (isinstance(val, bool) and kind is int):
        raise BadRequestError(f"argument {key!r} has the wrong type")
    return val


def queue_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise BadRequestError("queue name must be a non-empty string")
    if len(name) > QUEUE_NAME_MAX:
        raise BadRequestError(f"queue name longer than {QUEUE_NAME_MAX}")
    return name


def non_neg_int(v: Any, what: str, minimum: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise BadRequestError(f"{what} must be an integer >= {minimum}")
    return v


def _keep(v: Any, what: str) -> int:
    """remove_on_complete/fail: True removes at once, False/None keeps the
    queue default, n keeps the last n."""
    if v is None or v is False:
        return -1
    if v is True:
        return 0
    return non_neg_int(v, what)


def _backoff(v: Any) -> list[Any] | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return ["fixed", non_neg_int(v, "backoff")]
    if (not isinstance(v, dict) or v.get("type") not in ("fixed", "exponential")
            or not set(v) <= {"type", "delay_ms"}):
        raise BadRequestError('backoff must be {"type": "fixed"|"exponential", "delay_ms": n}')
    return [v["type"], non_neg_int(v.get("delay_ms", 0), "backoff.delay_ms")]


_OPT_KEYS = frozenset({"priority", "delay_ms", "attempts", "backoff", "remove_on_complete",
                       "remove_on_fail", "timestamp", "group"})
_OPT_KEYS |= {"timeout_ms", "ttl_ms"}  # docs/design.md §11 (docs/features-jobs.md)
_OPT_KEYS |= {"trace"}  # a trace context carrier (client/tracing.py), stored and delivered
TRACE_MAX = 1024  # characters of a trace carrier's keys and values together
GROUP_MAX = 256
RATE_MAX = 10_000_000  # starts per window
PER_MS_MAX = 86_400_000  # one day


def job_opts(o: Any) -> dict[str, Any] | None:
    """Validate and normalise ADD options."""
    if o is None:
        return None
    if not isinstance(o, dict):
        raise BadRequestError("job opts must be a map or nil")
    unknown = set(o) - _OPT_KEYS
    if unknown:
        raise BadRequestError(f"unknown job option(s): {', '.join(sorted(map(str, unknown)))}")
    out: dict[str, Any] = {}
    if "priority" in o:
        out["priority"] = non_neg_int(o["priority"], "priority")
    if "delay_ms" in o:
        out["delay_ms"] = non_neg_int(o["delay_ms"], "delay_ms")
    if "attempts" in o:
        out["attempts"] = non_neg_int(o["attempts"], "attempts", 1)
    if o.get("backoff") is not None:
        out["backoff"] = _backoff(o["backoff"])
    if "remove_on_complete" in o:
        out["remove_on_complete"] = _keep(o["remove_on_complete"], "remove_on_complete")
    if "remove_on_fail" in o:
        out["remove_on_fail"] = _keep(o["remove_on_fail"], "remove_on_fail")
    if "timestamp" in o:
        out["timestamp"] = non_neg_int(o["timestamp"], "timestamp")
    _time_limits(o, out)
    _tags(o, out)
    return out


def _tags(o: dict[str, Any], out: dict[str, Any]) -> None:
    """Options stored on the job as given: group, trace."""
    if o.get("group") is not None:
        out["group"] = group(o["group"])
    if o.get("trace") is not None:
        out["trace"] = trace(o["trace"])


def trace(v: Any) -> dict[str, str]:
    """A trace context carrier ({"traceparent": ..., "tracestate"?: ...})."""
    if (not isinstance(v, dict) or not v
            or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
            or sum(len(k) + len(x) for k, x in v.items()) > TRACE_MAX):
        raise BadRequestError(f"trace must be a map of strings of at most {TRACE_MAX} chars")
    return v


def group(v: Any) -> str:
    if not isinstance(v, str) or not v or len(v) > GROUP_MAX:
        raise BadRequestError(f"group must be a non-empty string of at most {GROUP_MAX} chars")
    return v


def rate(limit: Any, per_ms: Any) -> list[int] | None:
    """A rate limit `[max, per_ms]`, or None when `max` is nil (cleared)."""
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= RATE_MAX:
        raise BadRequestError(f"rate limit max must be an integer in [1, {RATE_MAX}] or nil")
    if not isinstance(per_ms, int) or isinstance(per_ms, bool) or not 1 <= per_ms <= PER_MS_MAX:
        raise BadRequestError(f"rate limit per_ms must be an integer in [1, {PER_MS_MAX}]")
    return [limit, per_ms]


def group_changes(args: dict[str, Any]) -> dict[str, Any]:
    """GROUP_SET's changes: only the keys given; nil clears one."""
    changes: dict[str, Any] = {}
    if "concurrency" in args:
        c = args["concurrency"]
        changes["concurrency"] = None if c is None else non_neg_int(c, "concurrency", 1)
    if "paused" in args:
        if not isinstance(args["paused"], bool):
            raise BadRequestError("paused must be a bool")
        changes["paused"] = args["paused"]
    if "rate" in args:
        r = args["rate"]
        if r is not None and (not isinstance(r, list) or len(r) != 2):
            raise BadRequestError("rate must be [max, per_ms] or nil")
        changes["rate"] = None if r is None else rate(r[0], r[1])
    if not changes:
        raise BadRequestError("nothing to change: give concurrency, paused or rate")
    return changes


def _time_limits(o: dict[str, Any], out: dict[str, Any]) -> None:
    """timeout_ms / ttl_ms: positive ms, or absent/nil for none."""
    for key in ("timeout_ms", "ttl_ms"):
        if o.get(key) is not None:
            out[key] = non_neg_int(o[key], key, 1)


def job_item(item: Any, max_data: int) -> tuple[str, str, bytes, dict[str, Any] | None]:
    """One ADD item `[id, name, data, opts]`."""
    if not isinstance(item, list) or len(item) != 4:
        raise BadRequestError("job must be [id, name, data, opts]")
    jid, name, data, opts = item
    if not isinstance(jid, str) or not jid or len(jid) > ID_MAX:
        raise BadRequestError(f"job id must be a non-empty string of at most {ID_MAX} chars")
    if not isinstance(name, str) or len(name) > NAME_MAX:
        raise BadRequestError(f"job name must be a string of at most {NAME_MAX} chars")
    if not isinstance(data, bytes):
        raise BadRequestError("job data must be msgpack bytes")
    if len(data) > max_data:
        raise TooLargeError(f"job data of {len(data)} bytes exceeds limit {max_data}")
    return jid, name, data, job_opts(opts) if opts is not None else None


def token(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequestError("lock token must be an integer")
    return v


def item_list(args: Any, key: str = "items") -> list[Any]:
    items: list[Any] = arg(args, key, list)
    for it in items:
        if not isinstance(it, list) or len(it) < 3:
            raise BadRequestError(f"each of {key!r} must be a list [queue, id, token, ...]")
    return items
