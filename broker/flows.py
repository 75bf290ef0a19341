"""Flows across brokers: the wire handlers and the agent that delivers outboxes.

The per-queue state machine is broker/flowqueue.py (read its docstring
first). Here:

- handlers for FLOW_ADD_CHILDREN, FLOW_ADD_PARENT, FLOW_COMMIT (clients),
  FLOW_RESOLVE, FLOW_CHILD_DONE (broker to broker) and FLOW_CHILDREN (a
  parent's handler reading its children's results);
- `FlowAgent`, one task per broker: every second, or at once when an ack
  filled an outbox, it delivers the outbox entries of the queues this broker
  serves to each parent's current owner, and asks the parents' owners about
  flows still pending past their deadline.

Delivery is at least once and routes like a client: by the broker's
topology, patched by `MOVED` answers (held until the topology catches up),
`TRYAGAIN` retried on the next round (200 ms), an unreachable owner on the
next round (1 s). An entry is sent only once the commit holding it is
durable, and leaves the outbox only after the parent's owner answered -
which it does only once its own record of the child (op cD) is durable
(FLOW_CHILD_DONE is a write op). A parent whose queue lives here gets its
entries applied locally, in the same batch as their cX.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from shardq import failpoints
from shardq import protocol as p
from shardq.broker import validate as v
from shardq.broker.flowqueue import DUPLICATE
from shardq.broker.queue import QueueState
from shardq.broker.replies import Durability, OpSpec, table
from shardq.errors import (
    BadRequestError,
    MovedError,
    NotFoundError,
    ServerError,
    ShardqError,
    TryAgainError,
    error_from_wire,
)

if TYPE_CHECKING:
    from shardq.broker.commitlog import Sink
    from shardq.broker.engine import Broker

log = logging.getLogger("shardq.broker.flows")

ROUND_S = 1.0  # the agent's period when nothing asks for sooner
RETRY_SOON_S = 0.2  # after a TRYAGAIN or MOVED
REQUEST_TIMEOUT_S = 10.0
FLOWS_LANE = "flows"  # the flow agent's links, apart from handoff streams
DELIVER_FRAME_ITEMS = 1000
FLOW_ID_MAX = 128


# ---------------------------------------------------------------- validation
def _flow_id(args: Any) -> str:
    fid: str = v.arg(args, "flow", str)
    if not fid or len(fid) > FLOW_ID_MAX:
        raise BadRequestError(f"flow id must be 1-{FLOW_ID_MAX} characters")
    return fid


def _ref(val: Any, what: str) -> tuple[str, str]:
    """A `[queue, job id]` pair."""
    if (not isinstance(val, list) or len(val) != 2 or not isinstance(val[1], str)
            or not val[1] or len(val[1]) > v.ID_MAX):
        raise BadRequestError(f"{what} must be [queue, job id]")
    return v.queue_name(val[0]), val[1]


def _deadline(b: Broker, args: Any) -> int:
    deadline = v.non_neg_int(v.arg(args, "deadline", int), "deadline")
    if b.clock() > deadline:
        raise BadRequestError("the flow's creation deadline has passed; add the flow again")
    return deadline


# ---------------------------------------------------------------- handlers
def op_flow_add_children(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    flow = _flow_id(args)
    pq, pid = _ref(v.arg(args, "parent", list), "parent")
    jobs = v.arg(args, "jobs", list)
    deadline = _deadline(b, args)
    b.check_capacity(jobs)
    now = b.clock()
    out: list[Any] = []
    for item in jobs:
        try:
            if not isinstance(item, list) or len(item) != 5:
                raise BadRequestError("child must be [id, name, data, opts, ignore_failure]")
            jid, name, data, opts = v.job_item(item[:4], b.config.max_job_data)
        except ServerError as exc:
            out.append(exc.to_item())
            continue
        if q.add(jid, name, data, opts, now, parent=[pq, pid, flow, deadline, bool(item[4])]):
            b.total_jobs += 1
        out.append(jid)
    b.flows.kick()  # the agent learns the flow's deadline
    return out


def op_flow_add_parent(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    flow = _flow_id(args)
    n = v.non_neg_int(v.arg(args, "children", int), "children", 1)
    jid, name, data, opts = v.job_item(v.arg(args, "job", list), b.config.max_job_data)
    old = q.jobs.get(jid)
    if old is not None and old.children is not None and old.children[0] == flow:
        return jid  # a resend: the first one was written
    if failpoints.ACTIVE:
        failpoints.hit("broker.before_flow_parent")
    _deadline(b, args)
    b.check_capacity([[jid, name, data]])
    if not q.add(jid, name, data, opts, b.clock(), children=[flow, n, {}]):
        raise BadRequestError(f"job {jid!r} exists (or existed) in {q.name!r}; "
                              "a flow's parent needs an id of its own")
    b.total_jobs += 1
    return jid


def op_flow_commit(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    n = q.flow_release(_flow_id(args), b.clock())
    _released(b, q, n)
    return n


def _released(b: Broker, q: QueueState, n: int) -> None:
    if n:
        if q.n_delayed:
            b.arm(q)
        if q.name in b.waiters:
            b.serve_waiters(q.name)


def op_flow_resolve(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    deadline = v.non_neg_int(v.arg(args, "deadline", int), "deadline")
    return q.flow_status(v.arg(args, "id", str), _flow_id(args), deadline, b.clock())


def op_flow_child_done(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    return child_done_items(b, v.arg(args, "items", list))


def child_done_items(b: Broker, items: list[Any]) -> list[Any]:
    """Apply delivered outbox entries `[parent queue, parent id, flow, child
    key, ok, value, ignore_failure]`; one outcome (or `[code, body]`) each."""
    now = b.clock()
    out: list[Any] = []
    touched: set[QueueState] = set()
    for it in items:
        try:
            if (not isinstance(it, list) or len(it) != 7 or not isinstance(it[1], str)
                    or not isinstance(it[2], str) or not isinstance(it[3], str)
                    or not isinstance(it[4], bool)):
                raise BadRequestError(
                    "item must be [queue, id, flow, child key, ok, value, ignore_failure]")
            q = b.queue_for(v.queue_name(it[0]))
            out.append(q.flow_child_done(it[1], it[2], it[3], it[4], it[5], bool(it[6]), now))
            touched.add(q)
        except ServerError as exc:
            out.append(exc.to_item())
    for q in touched:
        if q.n_delayed:
            b.arm(q)
        if q.name in b.waiters:
            b.serve_waiters(q.name)
    return out


def op_flow_children(b: Broker, args: Any, sink: Sink, req_id: int) -> Any:
    q = b.queue_for(v.queue_name(v.arg(args, "queue", str)))
    jid = v.arg(args, "id", str)
    job = q.jobs.get(jid)
    if job is None:
        raise NotFoundError(f"no job {jid!r} in {q.name!r}")
    if job.children is None:
        raise BadRequestError(f"job {jid!r} is not a flow's parent")
    return dict(job.children[2])


# This module's part of the op table (broker/ops.py). Answered once durable:
# a "committed" FLOW_RESOLVE or a delivered child must not be forgotten by a
# crash of the broker that answered.
OPS: dict[str, OpSpec] = {
    **table(Durability.DURABLE, {
        p.FLOW_ADD_CHILDREN: op_flow_add_children, p.FLOW_ADD_PARENT: op_flow_add_parent,
        p.FLOW_COMMIT: op_flow_commit, p.FLOW_RESOLVE: op_flow_resolve,
        p.FLOW_CHILD_DONE: op_flow_child_done}),
    **table(Durability.READ, {p.FLOW_CHILDREN: op_flow_children}),
}


# ---------------------------------------------------------------- the agent
Entry = tuple[QueueState, str, list[Any]]  # (child's queue, child id, outbox entry)


class FlowAgent:
    """Delivers outboxes and resolves overdue flows (see the module docstring)."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker
        self._wake = asyncio.Event()
        # queue -> (owner, addr, epoch) from MOVED answers newer than our map
        self._redirects: dict[str, tuple[str, str, int]] = {}
        self._soon = False
        self.delivered = 0  # entries answered by a parent's owner (tests, stats)

    def kick(self) -> None:
        """Run a round now (an outbox or a pending flow appeared)."""
        self._wake.set()

    async def run(self) -> None:
        """Rounds until cancelled."""
        try:
            while True:
                self._wake.clear()
                self._soon = False
                try:
                    await self._round()
                except (OSError, ShardqError, TimeoutError) as exc:
                    log.debug("flow round: %r", exc)
                    self._soon = True
                except Exception:  # a bug costs this round, not the broker
                    log.exception("flow round failed")
                try:
                    async with asyncio.timeout(RETRY_SOON_S if self._soon else ROUND_S):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:  # the broker is stopping: no link of it outlives the agent
            await self.b.peers.aclose()

    async def _round(self) -> None:
        b = self.b
        now = b.clock()
        entries: list[Entry] = []
        due: list[tuple[QueueState, str, str, str, int]] = []
        for q in list(b.queues.values()):
            if not (q.outbox or q.flows_pending) or not b.serves(q):
                continue
            entries.extend((q, cid, e) for cid, e in q.outbox.items())
            due.extend((q, *d) for d in q.flows_due(now))
        if not entries and not due:
            return
        await b.commits.durable()  # an entry goes out only once its child's completion is on disk
        if entries and failpoints.ACTIVE:
            failpoints.hit("broker.before_flow_deliver")
        by_owner: dict[tuple[str, str], list[Entry]] = {}
        for ent in entries:
            route = self._route(ent[2][0])
            if route is None:
                self._soon = True
                continue
            by_owner.setdefault(route, []).append(ent)
        work = [self._deliver(route, ents[i:i + DELIVER_FRAME_ITEMS])
                for route, ents in by_owner.items()
                for i in range(0, len(ents), DELIVER_FRAME_ITEMS)]
        work += [self._resolve(*d) for d in due]
        await asyncio.gather(*work)
        if b.log:
            b.commits.flush_soon()

    def _route(self, queue: str) -> tuple[str, str] | None:
        b = self.b
        red = self._redirects.get(queue)
        if red is not None:
            if red[2] > b.epoch:
                return red[0], red[1]
            del self._redirects[queue]  # our map has caught up
        return b.topology.route(queue)

    def _still_mine(self, q: QueueState) -> bool:
        """A result is applied only to a queue this broker still serves: a
        frozen or handed-off queue's new owner delivers its outbox again."""
        return self.b.queues.get(q.name) is q and self.b.serves(q)

    async def _request(self, route: tuple[str, str], op: str, args: Any) -> Any:
        addr = route[1]
        pool = self.b.peers.pool
        conn = await pool.get(addr, addr, FLOWS_LANE)  # keyed by address: routed by it
        try:
            return await conn.request(op, args, timeout=REQUEST_TIMEOUT_S)
        except (OSError, TimeoutError):
            await pool.drop(addr, FLOWS_LANE)  # a timed-out link is in doubt: dial anew
            raise

    async def _deliver(self, route: tuple[str, str], ents: list[Entry]) -> None:
        items = [e[2] for e in ents]
        try:
            if route[0] == self.b.config.broker_id:
                results = child_done_items(self.b, items)
            else:
                results = await self._request(route, p.FLOW_CHILD_DONE, {"items": items})
                if failpoints.ACTIVE:
                    failpoints.hit("broker.after_flow_deliver")
        except (OSError, ShardqError, TimeoutError) as exc:
            log.info("flow delivery to %s failed: %r; retrying", route[0], exc)
            return
        for (q, cid, entry), res in zip(ents, results, strict=True):
            if isinstance(res, list):  # [code, body]
                self._failed(entry[0], error_from_wire(res[0], res[1]))
            elif self._still_mine(q):
                if res == DUPLICATE:
                    log.info("flow %s: %s was already recorded on its parent", entry[2], entry[3])
                q.outbox_done(cid)
                self.delivered += 1

    async def _resolve(self, q: QueueState, flow: str, pq: str, pid: str, deadline: int) -> None:
        args = {"queue": pq, "id": pid, "flow": flow, "deadline": deadline}
        route = self._route(pq)
        try:
            if route is None:
                raise TryAgainError("the parent's queue has no known owner")
            if route[0] == self.b.config.broker_id:
                answer = op_flow_resolve(self.b, args, _NO_SINK, 0)
            else:
                answer = await self._request(route, p.FLOW_RESOLVE, args)
        except ServerError as exc:
            self._failed(pq, exc)
            return
        except (OSError, ShardqError, TimeoutError) as exc:
            log.info("flow %s: parent's owner unreachable: %r", flow, exc)
            return
        if not self._still_mine(q):
            return
        now = self.b.clock()
        if answer == "committed":
            _released(self.b, q, q.flow_release(flow, now))
        elif answer == "aborted":
            n = q.flow_abort(flow, now)
            log.info("flow %s never finished its creation: %d pending children removed", flow, n)

    def _failed(self, queue: str, exc: ServerError) -> None:
        if isinstance(exc, MovedError):
            log.info("flow message for queue %s: MOVED to %s", queue, exc.owner)
            if exc.owner and exc.addr:
                self._redirects[queue] = (exc.owner, exc.addr, exc.epoch)
            self._soon = True
        elif isinstance(exc, TryAgainError):
            self._soon = True
        else:
            log.warning("flow message for queue %s refused: %s", queue, exc)


class _NoSink:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return True


_NO_SINK = _NoSink()
