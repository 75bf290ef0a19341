"""Wire handlers of replication (docs/design.md §12; ops in shardq.protocol).

REPL_APPEND (primary -> follower) is answered by the replica's own commit
log once the follower's disk has it; REPL_FENCE and REPL_PROMOTE
(coordinator -> follower) run as tasks and answer when done, durably.
"""

from __future__ import annotations

from typing import Any

from shardq import protocol as p
from shardq.broker.commitlog import Sink
from shardq.broker.engine import Broker
from shardq.broker.replies import Durability, OpSpec, table
from shardq.errors import BadRequestError


def op_repl_append(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    from shardq.broker.ops import PARKED

    if not isinstance(args, dict):
        raise BadRequestError("args must be a map")
    b.replication.followers.on_append(args, sink, req_id)
    return PARKED


def op_repl_fence(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    from shardq.broker.ops import _spawn

    if not isinstance(args, dict):
        raise BadRequestError("args must be a map")
    return _spawn(b, sink, req_id, "repl_fence", lambda: b.replication.followers.fence(args))


def op_repl_promote(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    from shardq.broker.ops import _spawn

    if not isinstance(args, dict):
        raise BadRequestError("args must be a map")
    return _spawn(b, sink, req_id, "repl_promote",
                  lambda: b.replication.followers.promote(args))


# This module's part of the op table (broker/ops.py): each op answers when its
# own work decides (a stream batch once on this disk, a fence or a promotion
# once durable), so the table adds no wait of its own.
OPS: dict[str, OpSpec] = table(Durability.READ, {
    p.REPL_APPEND: op_repl_append, p.REPL_FENCE: op_repl_fence,
    p.REPL_PROMOTE: op_repl_promote})
