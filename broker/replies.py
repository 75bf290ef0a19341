"""Reply frames and when they may go out (docs/design.md §4, §9.1).

Every reply the broker sends is built here, `[req_id, status, body,
epoch]`, and every op says once, in the op table, how its reply relates to
the disk:

    READ      answered at once: it changed nothing
    LAZY      answered at once, and what it logged is committed soon without
              anyone waiting (a pull or a lock extension: losing one only
              re-delivers a job, which at-least-once allows)
    DURABLE   held by the commit log until everything logged before it is on
              disk (broker/commitlog.py); `--fast` answers at once

The connection (broker/server.py) looks the op up, runs its handler and
hands the frame to the commit log or the socket by that one field; an
asynchronous step (a handoff) answers through `answer()` by the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

from shardq.codec import encode_frame
from shardq.errors import ServerError

if TYPE_CHECKING:
    from shardq.broker.commitlog import Sink
    from shardq.broker.engine import Broker

OK = "ok"


class Durability(Enum):
    READ = "read"
    LAZY = "lazy"
    DURABLE = "durable"


Handler = Callable[["Broker", Any, "Sink", int], Any]


class OpSpec(NamedTuple):
    handler: Handler
    durability: Durability


def table(durability: Durability, handlers: Mapping[str, Handler]) -> dict[str, OpSpec]:
    """Op table entries for `handlers`, all with the same durability."""
    return {op: OpSpec(h, durability) for op, h in handlers.items()}


def frame(req_id: int, body: Any, epoch: int) -> bytes:
    """An `ok` reply."""
    return encode_frame([req_id, OK, body, epoch])


def error_frame(req_id: int, code: str, body: Any, epoch: int) -> bytes:
    """A reply with another status (an error code, or `ok` given by name)."""
    return encode_frame([req_id, code, body, epoch])


def error_of(req_id: int, exc: ServerError, epoch: int) -> bytes:
    return encode_frame([req_id, exc.code, exc.to_body(), epoch])


def answer(b: Broker, sink: Sink, data: bytes, durability: Durability) -> None:
    """Send a reply produced outside the connection's read path (a task)."""
    if durability is Durability.DURABLE:
        b.commits.defer_reply(sink, data)
        return
    if not sink.is_closing():
        sink.write(data)
    if durability is Durability.LAZY:
        b.commits.flush_soon()
