"""A handoff's target indexes the imported jobs as the copy's chunks arrive
and then re-indexes only the jobs each catch-up op touches (docs/design.md §6 step 4,
broker/handoff.py `apply_ops_live`), so activation does not grow with queue size.

The property: whatever the source did while its snapshot was being read, the
queue built that way is indistinguishable from one rebuilt from scratch over
the same image, and from the source itself: same export, same counts, and the
same jobs handed out in the same order afterwards.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardq.broker.handoff import apply_chunks_live, apply_ops_live, build_queue
from shardq.broker.queue import QueueDefaults, QueueState
from shardq.broker.replay import Images, QueueImage, apply_chunk, apply_op
from shardq.router import slot_of
from tests.props import examples

from .test_replay import export, wire

PROPS = settings(
    max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEFAULTS = QueueDefaults(keep_completed=3, keep_failed=2, max_stalled_count=1, dedup_ttl_ms=60)

ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.sampled_from([0, 0, 30]),
              st.sampled_from([1, 2]), st.sampled_from([-1, -1, 0, 1])),
    st.tuples(st.just("pull"), st.integers(1, 3)),
    st.tuples(st.just("ack")), st.tuples(st.just("fail")), st.tuples(st.just("extend")),
    st.tuples(st.just("tick")), st.tuples(st.just("chunk")), st.tuples(st.just("chunk")),
    st.tuples(st.just("pause"), st.booleans()), st.tuples(st.just("drain")),
    st.tuples(st.just("progress")), st.tuples(st.just("obliterate")),
    st.tuples(st.just("addttl"), st.sampled_from([30, 100]), st.sampled_from([0, 30])),
    st.tuples(st.just("log")), st.tuples(st.just("dlq"), st.integers(0, 2)),
    # flows (broker/flowqueue.py): pending children of flows f0..f2 whose
    # parents P0..P2 live in this queue too; commit/abort; deliveries.
    st.tuples(st.just("fchild"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("fparent"), st.integers(0, 2), st.integers(1, 3)),
    st.tuples(st.just("frelease"), st.integers(0, 2)),
    st.tuples(st.just("fabort"), st.integers(0, 2)),
    st.tuples(st.just("fdeliver")), st.tuples(st.just("fdeliver")),
    st.tuples(st.just("fflow"), st.integers(0, 2)), st.tuples(st.just("frun"), st.booleans()),
    st.tuples(st.just("gadd"), st.sampled_from(["ga", "gb"]), st.integers(0, 1)),
    st.tuples(st.just("rate"), st.sampled_from([None, [1, 50], [2, 100]])),
    st.tuples(st.just("group"), st.sampled_from(["ga", "gb"]), st.sampled_from([None, 1]),
              st.booleans(), st.sampled_from([None, [1, 60]])),
), min_size=5, max_size=60)


def build(name: str, img: QueueImage) -> QueueState:
    return build_queue(name, img, [], DEFAULTS)


class Source:
    """A live queue driven by a program, with a snapshot read in between."""

    def __init__(self) -> None:
        self.log: list[Any] = []
        self.q = QueueState("qa", slot_of("qa"), self.log, DEFAULTS)
        self.now = 0
        self.n = 0
        self.held: list[tuple[str, int]] = []

    def run(self, action: tuple[Any, ...]) -> None:
        kind, q = action[0], self.q
        if kind == "add":
            _, prio, delay, attempts, roc = action
            self.n += 1
            q.add(f"j{self.n}", "n", b"x", {"priority": prio, "delay_ms": delay,
                                              "attempts": attempts, "backoff": ["fixed", 20],
                                              "remove_on_complete": roc}, self.now)
        elif kind == "pull":
            out: list[list[Any]] = []
            q.pull(action[1], 100, self.now, out)
            self.held += [(row[1], row[4]) for row in out]
        elif kind in ("addttl", "dlq"):
            self.run_jobs_feature(action)
        elif kind in ("ack", "fail", "extend", "progress", "log") and self.held:
            self.run_held(kind)
        elif kind == "tick":
            self.now += 40
            q.promote(self.now)
            q.expire_locks(self.now)
            q.expire_ttls(self.now)
            q.expire_tombstones(self.now)
        elif kind == "pause":
            q.set_paused(action[1])
        elif kind == "drain":
            q.drain(True, self.now)
        elif kind == "obliterate" and self.n % 5 == 0:  # rare
            q.obliterate()
        elif kind.startswith("f"):
            self.run_flow(action)
        elif kind in ("gadd", "rate", "group"):
            self.run_sched(action)

    def run_flow(self, action: tuple[Any, ...]) -> None:
        kind, q = action[0], self.q
        if kind == "fchild":
            self.n += 1
            f = action[1]
            q.add(f"c{self.n}", "n", b"x", {"attempts": 1}, self.now,
                  parent=["qa", f"P{f}", f"f{f}", self.now + 50, action[2]])
        elif kind == "fparent":
            q.add(f"P{action[1]}", "n", b"p", None, self.now,
                  children=[f"f{action[1]}", action[2], {}])
        elif kind == "frelease":
            q.flow_release(f"f{action[1]}", self.now)
        elif kind == "fabort":
            q.flow_abort(f"f{action[1]}", self.now)
        elif kind == "fflow":  # a whole flow: two children, the parent, the commit
            f = action[1]
            for _ in range(2):
                self.run_flow(("fchild", f, False))
            self.run_flow(("fparent", f, 2))
            self.run_flow(("frelease", f))
        elif kind == "frun":  # run two jobs at once: complete (or fail) them
            out: list[list[Any]] = []
            q.pull(2, 100, self.now, out)
            for row in out:
                if action[1]:
                    q.ack(row[1], row[4], b"r", self.now)
                else:
                    q.fail(row[1], row[4], "boom", self.now)
        elif kind == "fdeliver" and q.outbox:  # the oldest entry reaches its parent
            cid, e = next(iter(q.outbox.items()))
            q.flow_child_done(e[1], e[2], e[3], e[4], e[5], e[6], self.now)
            q.outbox_done(cid)


    def run_held(self, kind: str) -> None:
        """Finish or touch the oldest job this program holds the lock of."""
        q = self.q
        jid, token = self.held.pop(0)
        if kind == "ack":
            q.ack(jid, token, b"r", self.now)
        elif kind == "fail":
            q.fail(jid, token, "boom", self.now)
        else:
            if kind == "extend":
                q.extend(jid, token, 150, self.now)
            elif kind == "log":
                q.add_log(jid, token, f"line@{self.now}")
            else:
                q.progress(jid, token, 50)
            self.held.append((jid, token))

    def run_jobs_feature(self, action: tuple[Any, ...]) -> None:
        q = self.q
        if action[0] == "addttl":
            self.n += 1
            q.add(f"j{self.n}", "n", b"x", {"ttl_ms": action[1], "delay_ms": action[2],
                                              "timeout_ms": 50}, self.now)
        elif action[1] == 0:
            q.dlq_retry(None, self.now)
        elif action[1] == 1:
            q.dlq_retry([f"j{self.n}"], self.now)
        else:
            q.dlq_purge(self.now)

    def run_sched(self, action: tuple[Any, ...]) -> None:
        """Grouped jobs, rate limits and group settings (docs/design.md §11)."""
        kind, q = action[0], self.q
        if kind == "gadd":
            self.n += 1
            q.add(f"j{self.n}", "n", b"x", {"group": action[1], "priority": action[2]},
                  self.now)
        elif kind == "rate":
            q.set_rate_limit(action[1])
        else:
            q.set_group(action[1], {"concurrency": action[2], "paused": action[3],
                                    "rate": action[4]})


def observe(q: QueueState, now: int) -> tuple[Any, ...]:
    """Everything a client could see next: export, counts, then the order in
    which every job would be handed out once all timers fire."""
    seen = (export(q, sort_tombstones=True), q.counts())  # (next_timer may be early: lazy heaps)
    flows = sorted((fid, sorted(e[3])) for fid, e in q.flows_pending.items())
    later = now + 10**7
    q.set_paused(False)
    q.reset_rotation()  # the round-robin position is not part of the state (docs/design.md §11)
    q.promote(later)
    q.expire_locks(later)
    out: list[list[Any]] = []
    q.pull(10**6, 100, later, out)
    return (*seen, [row[1] for row in out], q.counts(), flows)


def copy_live(src: Source, during: list[tuple[Any, ...]], split: float, chunk_size: int = 2,
              events: bool = False) -> tuple[QueueState, list[Any], list[Any]]:
    """Copy the source's queue while `during` runs on it; return the target's
    queue built the fast way, and the ops and chunks it was built from."""
    # The copy: the tap starts and the meta is taken in one step; job records
    # are read chunk by chunk while the program goes on.
    skip, meta = len(src.log), src.q.meta(events=events)
    chunks_iter = src.q.export_chunks(chunk_size=chunk_size)
    chunks = [next(chunks_iter)]
    chunks[0]["meta"] = meta
    for action in during:
        if action[0] == "chunk":
            chunks += [copy.deepcopy(c) for c in [next(chunks_iter, None)] if c is not None]
        else:
            src.run(action)
    chunks += [copy.deepcopy(c) for c in chunks_iter]
    ops = wire(src.log[skip:])
    chunks = wire(chunks)

    # Indexes built chunk by chunk as the copy arrives (frames of two
    # chunks), ops replayed in two rounds (before and after the freeze).
    staging: Images = {}
    live: dict[str, QueueState] = {}
    for i in range(0, len(chunks), 2):
        apply_chunks_live(staging, live, chunks[i:i + 2], build)
    cut = int(len(ops) * split)
    apply_ops_live(staging, live, ops[:cut], build)
    apply_ops_live(staging, live, ops[cut:], build)
    fast = live["qa"]
    fast.adopt_meta(staging["qa"].meta)
    return fast, ops, chunks


def handoff(before: list[tuple[Any, ...]], during: list[tuple[Any, ...]], split: float,
            chunk_size: int = 2) -> tuple[QueueState, QueueState, Source]:
    """Run the program on a source, copying its queue in the middle; return the
    target's queue built the fast way, the slow way, and the source."""
    src = Source()
    for action in before:
        src.run(action)
    fast, ops, chunks = copy_live(src, during, split, chunk_size)

    # Slow: everything applied to the image, then one rebuild.
    images: Images = {}
    for ch in chunks:
        apply_chunk(images, ch)
    for op in ops:
        apply_op(images, op)
    slow = build_queue("qa", images["qa"], [], DEFAULTS)
    return fast, slow, src


@PROPS
@given(before=ACTIONS, during=ACTIONS, split=st.floats(0, 1))
def test_catch_up_onto_built_indexes_matches_a_full_rebuild(
        before: list[tuple[Any, ...]], during: list[tuple[Any, ...]], split: float) -> None:
    fast, slow, src = handoff(before, during, split)
    assert observe(fast, src.now) == observe(slow, src.now) == observe(src.q, src.now)


def test_a_job_requeued_during_the_copy_keeps_its_place_in_line() -> None:
    # j1 is read waiting, then j1 and j2 are pulled and stall (requeued with
    # orders 4 and 5), then j2 and j3 are read: j1's replayed requeue must go
    # before j2's entry from the snapshot, not at the end of the line.
    add = ("add", 0, 0, 1, -1)
    fast, slow, src = handoff([add, add, add],
                              [("chunk",), ("pull", 2), ("tick",), ("tick",), ("tick",)],
                              split=0.5, chunk_size=1)
    seen = observe(fast, src.now)
    assert seen[2] == ["j3", "j1", "j2"]
    assert seen == observe(slow, src.now) == observe(src.q, src.now)


def test_a_job_replaced_by_a_replayed_add_is_never_handed_out_twice() -> None:
    # The snapshot saw j1 waiting; the catch-up re-adds it (an add the tap
    # recorded before the snapshot read it) and then locks it.
    src = Source()
    src.run(("add", 0, 0, 1, -1))
    ops = wire(src.log)
    src.run(("pull", 1))
    ops += wire(src.log[len(ops):])
    staging: Images = {"qa": QueueImage()}
    for ch in wire(list(Source().q.export_chunks())):
        apply_chunk(staging, {**ch, "queue": "qa"})
    live = {"qa": build("qa", staging["qa"])}
    apply_ops_live(staging, live, ops[:1], build)
    apply_ops_live(staging, live, ops, build)
    q = live["qa"]
    q.adopt_meta(staging["qa"].meta)
    out: list[list[Any]] = []
    q.pull(10, 100, 1000, out)
    assert out == [] and q.counts()["waiting"] == 0 and q.counts()["active"] == 1


def test_a_handed_off_queue_is_freed_in_bounded_steps() -> None:
    src = Source()
    for _ in range(30):
        src.run(("add", 0, 0, 1, -1))
    src.run(("pull", 5))
    q = src.q
    steps = sum(1 for _ in q.free_in_steps(step=4))
    assert steps >= 30 // 4
    assert not q.jobs and not q.active and q.counts()["active"] == 0
