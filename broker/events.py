"""Job events: derived from the redo ops a queue emits, kept in a bounded
ring per queue on its owner, and pushed to subscribers after the commit
holding them (docs/design.md §11: `client.events(queue)`).

An event is `[seq, type, job_id, data]`, where `seq` is the queue's op
sequence number after the op that made it (`QueueState.seq`). The seq
travels with the queue in a handoff, so a subscriber that saw events up to
`seq` at the old owner resumes at the new one with `after_seq=seq`.

    op  -> type       data
    A   -> added      {"name": job name}
    L   -> active     {"attempts_started": n}
    P   -> progress   the progress value
    C   -> completed  the result (msgpack bytes; None when over MAX_EVENT_DATA)
    F   -> failed     {"reason": str, "final": True}
    W   -> failed     {"reason": str, "final": False}   (an attempt failed, retrying)
    S   -> stalled    None

The ring: every queue that ever had a subscriber on this broker keeps its
last RING_SIZE events, complete for every seq above `start` (events of
seqs <= start were evicted, or happened before the ring existed). A
handoff's copy carries the ring in the queue's meta chunk, and the target
notes the catch-up ops into it, so the ring arrives complete. The ring is
not persisted: after a restart it starts again empty, and a subscriber
that resumes from before then is told about the possible gap.

Pushes (shardq.protocol SUBSCRIBE): `[sub_req_id, "push", body, epoch]`
with body `{"queue", "events": [...]}` or `{"queue", "moved": MOVED body}`.
Delivery is at-least-once within the ring; clients drop repeats by seq.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from shardq.broker import replies
from shardq.errors import ServerError, TryAgainError
from shardq.protocol import PUSH

if TYPE_CHECKING:
    from shardq.broker.engine import Broker
    from shardq.broker.queue import QueueState

log = logging.getLogger("shardq.broker.events")

RING_SIZE = 5000
MAX_EVENT_DATA = 1024  # bytes of a result / progress string carried in an event
# A subscriber whose socket buffer grows past this is cut off; it resumes from
# its last seq (within the ring) on a new connection.
MAX_SUBSCRIBER_BUFFER = 8 * 1024 * 1024


def _small(v: Any) -> Any:
    if isinstance(v, bytes | str) and len(v) > MAX_EVENT_DATA:
        return None
    return v


def event_of(op: Any, seq: int) -> list[Any] | None:
    """The event a queue op makes, or None (ops users do not watch)."""
    code = op[0]
    if code == "A":
        return [seq, "added", op[2][0], {"name": op[2][1]}]
    if code == "L":
        return [seq, "active", op[2], {"attempts_started": op[5]}]
    if code == "C":
        return [seq, "completed", op[2], _small(op[3])]
    if code == "F":
        return [seq, "failed", op[2], {"reason": op[3], "final": True}]
    if code == "W":
        return [seq, "failed", op[2], {"reason": op[8], "final": False}]
    if code == "P":
        return [seq, "progress", op[2], _small(op[3])]
    if code == "S":
        return [seq, "stalled", op[2], None]
    return None


class EventRing:
    """The last RING_SIZE events of one queue."""

    __slots__ = ("events", "start", "upto")

    def __init__(self, seq: int, events: list[list[Any]] | None = None,
                 size: int = RING_SIZE) -> None:
        self.events: deque[list[Any]] = deque(events or (), maxlen=size)
        self.start = seq  # every event with seq > start is held
        self.upto = seq   # ops noted through this seq

    def note(self, op: Any, seq: int) -> None:
        self.upto = seq
        ev = event_of(op, seq)
        if ev is not None:
            if len(self.events) == self.events.maxlen:
                self.start = self.events[0][0]
            self.events.append(ev)

    def between(self, after: int, upto: int) -> list[list[Any]]:
        """Events with after < seq <= upto, oldest first."""
        out = []
        for ev in reversed(self.events):
            if ev[0] <= after:
                break
            if ev[0] <= upto:
                out.append(ev)
        out.reverse()
        return out

    def to_meta(self) -> dict[str, Any]:
        return {"start": self.start, "upto": self.upto, "events": list(self.events)}

    @classmethod
    def from_meta(cls, meta: Any, seq: int) -> EventRing | None:
        """The ring a handoff's copy carried, if it is complete through `seq`
        (a copy replayed without noting its ops, after a restart, is not)."""
        if not isinstance(meta, dict) or meta.get("upto") != seq:
            return None
        ring = cls(int(meta.get("start", seq)), [list(e) for e in meta.get("events", ())])
        ring.upto = seq
        return ring


class PushSink(Protocol):
    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...


class Subscription:
    __slots__ = ("live", "queue", "req_id", "sent", "sink")

    def __init__(self, sink: PushSink, req_id: int, queue: str, sent: int) -> None:
        self.sink = sink
        self.req_id = req_id
        self.queue = queue
        self.sent = sent  # events up to this seq were sent
        self.live = False  # the SUBSCRIBE reply went out; pushes may follow


class EventHub:
    """The broker's subscriptions, by queue."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker
        self.subs: dict[str, list[Subscription]] = {}
        self.committed: dict[str, int] = {}  # queue -> seq known committed

    def marks(self) -> dict[str, int]:
        """Each subscribed queue's seq now: a batch being flushed holds its ops."""
        queues = self.b.queues
        return {name: q.seq for name in self.subs if (q := queues.get(name)) is not None}

    def subscribe(self, sink: PushSink, req_id: int, q: QueueState,
                  after: int | None) -> None:
        """Register a subscription; its reply goes out once what the queue
        logged so far is durable (events are only ever sent committed)."""
        if q.ring is None:
            q.ring = EventRing(q.seq)
        target = q.seq
        start = target if after is None or after > target else after
        sub = Subscription(sink, req_id, q.name, start)
        self.subs.setdefault(q.name, []).append(sub)

        async def go_live() -> None:
            await self.b.commits.durable()
            self._go_live(sub, q, target)

        self.b.spawn(go_live())

    def _go_live(self, sub: Subscription, q: QueueState, target: int) -> None:
        b = self.b
        if sub.sink.is_closing():
            self._drop(sub)
            return
        registered = sub in self.subs.get(q.name, ())
        if not registered or b.queues.get(q.name) is not q or not b.serves(q):
            # Moved, frozen or dropped meanwhile: answer what a request for the
            # queue gets now, and the client follows it.
            self._drop(sub)
            err: ServerError = TryAgainError("the queue changed hands; subscribe again", 50)
            try:
                b.queue_for(q.name)
            except ServerError as exc:
                err = exc
            sub.sink.write(replies.error_of(sub.req_id, err, b.epoch))
            return
        ring = q.ring
        assert ring is not None
        upto = max(target, self.committed.get(q.name, 0))
        gap = sub.sent < ring.start
        events = ring.between(sub.sent, upto)
        sub.sent = max(sub.sent, upto)
        sub.live = True
        sub.sink.write(replies.frame(sub.req_id, {"seq": sub.sent, "events": events,
                                                  "gap": gap}, b.epoch))

    def publish(self, marks: dict[str, int]) -> None:
        """A batch committed: push each subscribed queue's events up to its mark."""
        queues = self.b.queues
        epoch = self.b.epoch
        for name, mark in marks.items():
            if mark > self.committed.get(name, 0):
                self.committed[name] = mark
            subs = self.subs.get(name)
            q = queues.get(name)
            if not subs or q is None or q.ring is None:
                continue
            for sub in list(subs):
                if not sub.live or sub.sent >= mark:
                    continue
                if sub.sink.is_closing():
                    self._drop(sub)
                    continue
                events = q.ring.between(sub.sent, mark)
                sub.sent = mark
                if events:
                    sub.sink.write(replies.error_frame(sub.req_id, PUSH,
                                                       {"queue": name, "events": events}, epoch))
                    self._check_backlog(sub)

    def _check_backlog(self, sub: Subscription) -> None:
        size = getattr(sub.sink, "write_buffer_size", None)
        if size is not None and size() > MAX_SUBSCRIBER_BUFFER:
            log.warning("subscriber of %s is too slow; dropping its connection", sub.queue)
            self._drop(sub)
            abort = getattr(sub.sink, "abort", None)
            if abort is not None:
                abort()

    def moved(self, names: list[str], body: dict[str, Any]) -> None:
        """Queues handed off: tell their subscribers where they went (after
        every event of theirs, which was pushed at its commit)."""
        epoch = self.b.epoch
        for name in names:
            self.committed.pop(name, None)
            for sub in self.subs.pop(name, ()):
                if sub.live and not sub.sink.is_closing():
                    sub.sink.write(replies.error_frame(sub.req_id, PUSH,
                                                       {"queue": name, "moved": body}, epoch))

    def _drop(self, sub: Subscription) -> None:
        lst = self.subs.get(sub.queue)
        if lst is not None and sub in lst:
            lst.remove(sub)
            if not lst:
                del self.subs[sub.queue]

    def drop_sink(self, sink: PushSink) -> None:
        """A connection closed: forget its subscriptions."""
        for lst in list(self.subs.values()):
            for sub in [s for s in lst if s.sink is sink]:
                self._drop(sub)
