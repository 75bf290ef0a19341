"""`Client.add_flow`: a parent job and its children, written all or nothing.

The three steps (docs/design.md §11; the broker side is broker/flowqueue.py):

1. the children, `pending`, one FLOW_ADD_CHILDREN per queue, in parallel;
2. the parent, `waiting-children` - the commit point;
3. FLOW_COMMIT per child queue, in parallel: the children become waiting.

Every request is idempotent (ids are made here, once), so the usual
retries are safe. A failure in 1 or 2 raises, and the brokers remove the
pending children after the deadline. A failure in 3 does not: the flow is
committed, and the children's brokers commit them themselves once the
deadline is past (they ask the parent's owner).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from shardq import protocol

from .ids import uuid7

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("shardq.client")

_NODE_KEYS = frozenset({"queue", "name", "data", "opts", "children"})


def _node(client: Client, spec: Any, what: str) -> tuple[str, list[Any], bool]:
    """(stored queue, wire job [id, name, data, opts], ignore_failure) of one node."""
    if not isinstance(spec, dict) or not isinstance(spec.get("queue"), str) \
            or not spec["queue"] or not isinstance(spec.get("name", ""), str):
        raise ValueError(f"{what} must be a dict with a queue name and a job name")
    unknown = set(spec) - _NODE_KEYS
    if unknown:
        raise ValueError(f"{what} has unknown keys {sorted(unknown)}")
    opts = dict(spec.get("opts") or {})
    ignore = bool(opts.pop("ignore_failure", False))
    opts.setdefault("job_id", uuid7())
    q = client.queue(spec["queue"])
    item, key = q._bulk_item((spec.get("name", ""), spec.get("data"), opts))
    stored = q._target(item[0], key) if q.name in client.topology.partitions else q.name
    return stored, item, ignore


async def add_flow(client: Client, flow: dict[str, Any], timeout_ms: int) -> str:
    """See `Client.add_flow`."""
    if timeout_ms < 1:
        raise ValueError("timeout_ms must be >= 1")
    pq, parent, _ = _node(client, flow, "the flow")
    children = flow.get("children")
    if not isinstance(children, list) or not children:
        raise ValueError("a flow needs a non-empty list of children")
    by_queue: dict[str, list[list[Any]]] = {}
    for i, spec in enumerate(children):
        if isinstance(spec, dict) and spec.get("children"):
            raise ValueError("flows have one level: a child cannot have children")
        cq, item, ignore = _node(client, spec, f"child {i}")
        by_queue.setdefault(cq, []).append([*item, ignore])
    flow_id = uuid7()
    deadline = int(time.time() * 1000) + timeout_ms
    base = {"flow": flow_id, "deadline": deadline}

    replies = await asyncio.gather(*(
        client._call(cq, protocol.FLOW_ADD_CHILDREN,
                     {**base, "queue": cq, "parent": [pq, parent[0]], "jobs": jobs})
        for cq, jobs in by_queue.items()))
    from shardq.errors import error_from_wire

    for reply in replies:
        for item in reply:
            if isinstance(item, list):
                raise error_from_wire(item[0], item[1])
    n = sum(len(jobs) for jobs in by_queue.values())
    pid: str = await client._call(pq, protocol.FLOW_ADD_PARENT,
                                  {**base, "queue": pq, "children": n, "job": parent})
    commits = await asyncio.gather(*(
        client._call(cq, protocol.FLOW_COMMIT, {"queue": cq, "flow": flow_id})
        for cq in by_queue), return_exceptions=True)
    for cq, res in zip(by_queue, commits, strict=True):
        if isinstance(res, BaseException):
            if isinstance(res, asyncio.CancelledError):
                raise res
            log.warning("flow %s: commit in %s failed (%s); its broker commits it after "
                        "the deadline", flow_id, cq, res)
    return pid
