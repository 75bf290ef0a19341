"""shardq.broker.replay: recovery applies redo-log ops to queue images (docs/design.md §3).

The key property: replaying every op a live `QueueState` emitted rebuilds the
same queue. And because ops carry absolute values, replaying from a
checkpoint seq `k` over job rows read at any later point still converges
(the checkpoint argument in broker/store.py's docstring).
"""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardq.broker.job import ACTIVE, COMPLETED, FAILED, WAITING, Job
from shardq.broker.queue import QueueDefaults, QueueState
from shardq.broker.replay import QUEUE_OPS, Images, QueueImage, apply_op
from tests.props import examples

PROPS = settings(max_examples=examples(150), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
SLOTS = {"qa": 11, "qb": 22}


def wire(op: Any) -> list[Any]:
    """An op as recovery sees it: through msgpack, as the store writes it."""
    return msgpack.unpackb(msgpack.packb(op, use_bin_type=True), raw=False)


def replay(ops: list[Any], images: Images | None = None) -> Images:
    images = {} if images is None else images
    for op in ops:
        apply_op(images, wire(op))
    return images


def restore(images: Images, defaults: QueueDefaults) -> dict[str, QueueState]:
    out = {}
    for name, img in images.items():
        q = QueueState(name, SLOTS.get(name, 0), [], defaults)
        q.restore(img.meta, img.jobs, img.tombstones)
        out[name] = q
    return out


def export(q: QueueState, sort_tombstones: bool = False) -> list[dict[str, Any]]:
    chunks = copy.deepcopy(list(q.export_chunks()))
    if sort_tombstones:  # ties in removal time have no defined order after a restore
        for ch in chunks:
            if ch["kind"] == "tombstones":
                ch["tombstones"].sort(key=lambda t: (t[1], t[0]))
    return wire(chunks)


def single(**defaults: Any) -> tuple[QueueState, list[Any]]:
    log: list[Any] = []
    return QueueState("qa", SLOTS["qa"], log, QueueDefaults(**defaults)), log


def pull_one(q: QueueState, now: int, lock_ms: int = 1000) -> tuple[str, int]:
    out: list[list[Any]] = []
    q.pull(1, lock_ms, now, out)
    return out[0][1], out[0][4]


def assert_replay_matches(q: QueueState, log: list[Any]) -> None:
    restored = restore(replay(log), q.defaults)
    assert export(restored[q.name]) == export(q)


# ======================================================================== single op codes
def test_apply_op_creates_an_image_for_a_new_queue_and_counts_seq() -> None:
    images: Images = {}
    apply_op(images, ["M", "fresh", {"paused": True}])
    img = images["fresh"]
    assert img.meta["paused"] is True
    assert img.meta["seq"] == 1
    assert img.jobs == {} and img.tombstones == {}


def test_every_queue_op_code_has_a_handler() -> None:
    assert frozenset("ALECFWSDPRTMX") | {"SU", "SR", "SN", "aL", "aQ", "aR",
                                         "cO", "cX", "cD", "cR",
                                         "bR", "bG", "bS", "bT", "jU", "jK"} == QUEUE_OPS


def test_unknown_op_code_is_refused() -> None:
    with pytest.raises(KeyError):
        apply_op({}, ["Z", "q"])


def test_fresh_image_meta_has_zero_counters() -> None:
    meta = QueueImage().meta
    assert meta["seq"] == 0 and meta["paused"] is False
    assert set(meta["counters"].values()) == {0}


def _pulled(q: QueueState) -> tuple[str, int]:
    return pull_one(q, now=10)


def _fail_twice(q: QueueState, stack: bool = False) -> None:
    jid, tok = _pulled(q)
    q.fail(jid, tok, "boom", now=20)
    if stack:
        q.note_stacktrace(jid, "Traceback: boom")
    q.promote(70)
    jid, tok = pull_one(q, now=70)
    q.fail(jid, tok, "boom again", now=80)
    if stack:
        q.note_stacktrace(jid, "Traceback: boom again")


def _removed(q: QueueState) -> None:
    q.add("r", "n", b"", {"remove_on_complete": 0}, now=1)
    jid, tok = pull_one(q, now=2)
    q.ack(jid, tok, b"done", now=3)


def _expired(q: QueueState) -> None:
    _removed(q)
    q.expire_tombstones(500)


SCENARIOS: dict[str, Any] = {
    "add": lambda q: None,
    "delayed": lambda q: q.add("c", "n", b"", {"delay_ms": 5, "remove_on_fail": 1}, now=1),
    "promote": lambda q: q.promote(500),
    "pause": lambda q: q.set_paused(True),
    "drain": lambda q: q.drain(True, now=5),
    "remove": _removed,
    "expire_tombstones": _expired,
    "pull": _pulled,
    "ack": lambda q: q.ack(*_pulled(q), b"\xa2ok", now=20),
    "fail_retry": lambda q: q.fail(*_pulled(q), "boom", now=20),
    "fail_final": _fail_twice,
    "stacktrace": lambda q: _fail_twice(q, stack=True),
    "extend": lambda q: q.extend(*_pulled(q), 9000, now=20),
    "progress": lambda q: q.progress(*_pulled(q), {"pct": 40}),
    "stall": lambda q: (_pulled(q), q.expire_locks(2000)),
    "obliterate": lambda q: (_pulled(q), q.obliterate()),
    "log": lambda q: _logged(q),
    "dlq": lambda q: (_fail_twice(q), _stalled_out(q)),
    "dlq_retry": lambda q: (_fail_twice(q), q.dlq_retry(None, now=90)),
    "dlq_retry_some": lambda q: (_fail_twice(q), _stalled_out(q), q.dlq_retry(["a"], now=90)),
    "dlq_purge": lambda q: (_fail_twice(q), q.dlq_purge(now=90)),
    "ttl_expired_at_pull": lambda q: _ttl(q, by_timer=False),
    "ttl_expired_by_timer": lambda q: _ttl(q, by_timer=True),
}


def _logged(q: QueueState) -> None:
    jid, tok = _pulled(q)
    for i in range(3):
        q.add_log(jid, tok, f"line {i}")
    q.fail(jid, tok, "boom", now=20)


def _stalled_out(q: QueueState) -> None:
    q.add("s", "n", b"", None, now=1)
    for now in (100, 200):
        q.promote(now)
        out: list[list[Any]] = []
        q.pull(10, 10, now, out)
        q.expire_locks(now + 10)


def _ttl(q: QueueState, by_timer: bool) -> None:
    q.add("t", "n", b"", {"ttl_ms": 30, "timeout_ms": 5}, now=1)
    q.add("u", "n", b"", {"ttl_ms": 10_000, "delay_ms": 5}, now=1)
    if by_timer:
        q.expire_ttls(40)
    out: list[list[Any]] = []
    q.pull(10, 100, 40, out)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_replaying_each_kind_of_op_rebuilds_the_live_queue(scenario: str) -> None:
    q, log = single(dedup_ttl_ms=100)
    q.add("a", "n", b"\x01", {"attempts": 2, "backoff": ["fixed", 50], "priority": 3}, now=0)
    q.add("b", "n", b"\x02", {"delay_ms": 500}, now=0)
    SCENARIOS[scenario](q)
    assert_replay_matches(q, log)
    assert {op[0] for op in log} >= {"A"}


def test_replay_recomputes_counters_from_op_codes() -> None:
    q, log = single(max_stalled_count=5)
    q.add("a", "n", b"", {"attempts": 3}, now=0)
    q.add("b", "n", b"", None, now=0)
    jid, tok = pull_one(q, now=1)
    q.fail(jid, tok, "x", now=2)          # retried
    jid, tok = pull_one(q, now=3)         # b
    q.ack(jid, tok, None, now=4)          # completed
    pull_one(q, now=5, lock_ms=10)
    q.expire_locks(15)                    # stalled
    img = replay(log)["qa"]
    assert img.meta["counters"] == q.counters == {
        "added": 2, "completed": 1, "failed": 0, "retried": 1, "stalled": 1}
    assert img.meta["seq"] == q.seq == len(log)


def test_ops_on_jobs_missing_from_the_image_only_count() -> None:
    img = QueueImage()
    images = {"qa": img}
    apply_op(images, ["C", "qa", "ghost", None, 5, 1, 8])
    apply_op(images, ["L", "qa", "ghost", 7, 100, 1, 5])
    apply_op(images, ["W", "qa", "ghost", WAITING, 0, 1, 0, 9, "x"])
    assert img.jobs == {}
    assert img.meta["counters"]["completed"] == 1
    assert img.meta["counters"]["retried"] == 1
    assert img.meta["seq"] == 3


def test_add_op_clears_a_tombstone_for_the_same_id() -> None:
    images = {"qa": QueueImage(tombstones={"j": 5})}
    rec = Job("j", "n", b"", WAITING, 0, 1, None, 10, order=4).to_record()
    apply_op(images, ["A", "qa", rec])
    assert images["qa"].tombstones == {}
    assert images["qa"].jobs["j"].order == 4
    assert images["qa"].meta["order"] == 4


def test_obliterate_op_clears_everything_but_seq_and_order() -> None:
    q, log = single()
    q.add("a", "n", b"", None, now=0)
    q.set_paused(True)
    img = replay(log)["qa"]
    apply_op({"qa": img}, ["X", "qa"])
    assert img.jobs == {} and img.tombstones == {}
    assert img.meta["paused"] is False
    assert set(img.meta["counters"].values()) == {0}
    assert (img.meta["seq"], img.meta["order"]) == (3, 1)


def test_requeue_of_a_job_missing_from_the_image_still_advances_order() -> None:
    q, log = single()
    q.add("a", "n", b"", None, now=0)
    meta_k, split = copy.deepcopy(q.meta()), len(log)
    pull_one(q, now=1, lock_ms=10)
    q.expire_locks(11)          # S: the job gets a new order
    q.drain(False, now=12)      # R: and is removed before the checkpoint reads its row
    img = QueueImage(meta=meta_k, tombstones=dict(q.tombstones))
    replay(log[split:], {"qa": img})
    assert img.meta["order"] == q.meta()["order"]


def test_replayed_active_job_keeps_its_lock_token() -> None:
    q, log = single()
    q.add("a", "n", b"", None, now=0)
    jid, tok = pull_one(q, now=1)
    r = restore(replay(log), q.defaults)["qa"]
    assert r.jobs["a"].state == ACTIVE
    assert r.ack(jid, tok, None, now=2) is None


def test_replay_of_a_job_failed_for_stalling_keeps_its_stalled_count() -> None:
    q, log = single(max_stalled_count=1)
    q.add("a", "n", b"", None, now=0)
    for now in (0, 100):
        pull_one(q, now=now, lock_ms=100)
        q.expire_locks(now + 100)
    assert (q.jobs["a"].state, q.jobs["a"].stalled_count) == (FAILED, 2)
    r = restore(replay(log), q.defaults)["qa"]
    assert r.jobs["a"].stalled_count == 2


# ======================================================================== hypothesis driver
IDS = [f"j{i}" for i in range(12)]
# Weighted kinds, so jobs live long enough to stall, retry and be retained;
# drain and obliterate are rare because they wipe everything.
KINDS = (["add"] * 6 + ["pull"] * 5 + ["tick"] * 5 + ["ack"] * 2 + ["fail"] * 2
         + ["extend"] * 2 + ["progress"] * 2 + ["pause"] * 2 + ["wipe"]
         + ["log", "dlq"] + ["limit"] * 2)
GROUPS = (None, None, "ga", "gb")
# (kind, queue index, then small ints read per kind by run_op)
op_strategy = st.tuples(st.sampled_from(KINDS), st.integers(0, 1),
                        *[st.integers(0, 11) for _ in range(7)])
op_lists = st.lists(op_strategy, min_size=10, max_size=80)
# Small limits so retention, tombstone caps and tombstone expiry all happen.
# A job that stalls for good is left out here (max_stalled_count is high): see
# test_replay_of_a_job_failed_for_stalling_keeps_its_stalled_count.
DEFAULTS = {"keep_completed": 3, "keep_failed": 2, "dedup_ttl_ms": 60, "max_tombstones": 4,
            "max_stalled_count": 10**6}


def _add_op(q: QueueState, op: tuple[Any, ...], now: int) -> None:
    _, _, p1, p2, p3, p4, p5, p6, p7 = op
    jid = IDS[p1 % len(IDS)]
    opts: dict[str, Any] = {
        "priority": p2 % 3, "delay_ms": (0, 0, 5, 40)[p3 % 4], "attempts": 1 + p4 % 3,
        "backoff": (None, ["fixed", 7], ["exponential", 3])[p5 % 3],
        "remove_on_complete": (-1, 0, 1, 2)[p6 % 4], "remove_on_fail": (-1, 0, 1)[p7 % 3],
        "group": GROUPS[(p2 + p6) % 4],
    }
    ttl = (0, 0, 0, 20, 60)[(p2 + p5) % 5]
    if ttl:
        opts["ttl_ms"] = ttl
    q.add(jid, "n", jid.encode(), opts, now)


def _dlq_op(q: QueueState, p1: int, p2: int, now: int) -> None:
    """Retry all, retry one, or purge the DLQ."""
    if p1 % 3 == 0:
        q.dlq_retry(None, now)
    elif p1 % 3 == 1:
        q.dlq_retry([IDS[p2 % len(IDS)]], now)
    else:
        q.dlq_purge(now)


def run_op(q: QueueState, op: tuple[Any, ...], now: int) -> int:
    """Apply one generated operation at `now`; returns the clock after it."""
    kind, _, p1, p2 = op[:4]
    active = sorted(q.active)
    if kind == "add":
        _add_op(q, op, now)
    elif kind == "dlq":
        _dlq_op(q, p1, p2, now)
    elif kind == "pull":
        q.pull(1 + p1 % 3, (5, 60)[p2 % 2], now, [])
    elif kind == "tick":
        now += (1, 10, 30, 100)[p1 % 4]
        q.promote(now)
        q.expire_locks(now)
        q.expire_ttls(now)
        q.expire_tombstones(now)
    elif kind in ("pause", "limit"):
        run_settings(q, op)
    elif kind == "wipe":  # mostly a no-op: draining or obliterating often hides the rest
        if p1 % 4 == 3:
            q.obliterate()
        elif p1 % 4 == 2:
            q.drain(p2 % 2 == 0, now)
    elif active:
        _on_active(q, kind, active[p1 % len(active)], p2, now)
    return now


def _on_active(q: QueueState, kind: str, pick: str, p2: int, now: int) -> None:
    tok = q.jobs[pick].token
    if kind == "ack":
        q.ack(pick, tok, pick.encode(), now)
    elif kind == "fail":
        q.fail(pick, tok, f"err@{now}", now)
    elif kind == "extend":
        q.extend(pick, tok, (5, 30)[p2 % 2], now)
    elif kind == "log":
        q.add_log(pick, tok, f"l{p2}@{now}")
    else:
        q.progress(pick, tok, p2)


def run_settings(q: QueueState, op: tuple[Any, ...]) -> None:
    """Queue-level settings: pause, rate limits and group settings (docs/design.md §11)."""
    kind, _, p1, p2, p3, p4, p5, p6, _ = op
    if kind == "pause":  # one in three pauses, the rest resume
        q.set_paused(p1 % 3 == 2)
    elif p1 % 3 == 0:
        q.set_rate_limit(None if p2 % 3 == 0 else [1 + p3 % 3, (10, 50)[p4 % 2]])
    else:
        q.set_group(("ga", "gb")[p1 % 2], {
            "concurrency": (None, 1, 2)[p2 % 3], "paused": p3 % 4 == 0,
            "rate": None if p4 % 2 else [1 + p5 % 2, (10, 40)[p6 % 2]]})


def live_queues(**overrides: Any) -> tuple[dict[str, QueueState], list[Any]]:
    log: list[Any] = []
    defaults = QueueDefaults(**{**DEFAULTS, **overrides})
    return {n: QueueState(n, s, log, defaults) for n, s in SLOTS.items()}, log


Row = tuple[str, Any]  # ("job", record) or ("tomb", removed_at)


def snapshot(queues: dict[str, QueueState]) -> tuple[dict[str, Any], dict[tuple[str, str], Row]]:
    """What a checkpointer could read at this instant: metas, and every row."""
    metas = {n: copy.deepcopy(q.meta()) for n, q in queues.items() if q.seq}
    rows: dict[tuple[str, str], Row] = {}
    for n, q in queues.items():
        for jid, job in q.jobs.items():
            rows[(n, jid)] = ("job", wire(job.to_record()))
        for jid, ts in q.tombstones.items():
            rows[(n, jid)] = ("tomb", ts)
    return metas, rows


# ======================================================================== properties
@PROPS
@given(op_lists)
def test_replaying_every_op_from_empty_images_rebuilds_the_live_queues(
        ops: list[tuple[Any, ...]]) -> None:
    queues, log = live_queues()
    now = 0
    for op in ops:
        now = run_op(queues[("qa", "qb")[op[1]]], op, now + 1)
    restored = restore(replay(log), queues["qa"].defaults)
    assert set(restored) == {n for n, q in queues.items() if q.seq}
    for name, r in restored.items():
        assert export(r) == export(queues[name])
        assert r.counts() == queues[name].counts()


@PROPS
@given(op_lists, st.data())
def test_replay_from_a_checkpoint_over_newer_rows_converges(ops: list[tuple[Any, ...]],
                                                            data: st.DataObject) -> None:
    """Meta is taken at seq k; each job row at its own later point m >= k (a
    checkpoint that read memory while it kept changing, or that was cut
    short); replaying the ops after k must end in the live state."""
    queues, log = live_queues()
    snaps = [snapshot(queues)]
    log_at = [0]
    now = 0
    for op in ops:
        now = run_op(queues[("qa", "qb")[op[1]]], op, now + 1)
        snaps.append(snapshot(queues))
        log_at.append(len(log))
    k = data.draw(st.integers(0, len(snaps) - 1), label="k")
    metas_k = snaps[k][0]
    images: Images = {n: QueueImage(meta=copy.deepcopy(m)) for n, m in metas_k.items()}
    keys = sorted({key for _, rows in snaps[k:] for key in rows})
    for key in keys:
        m = data.draw(st.integers(k, len(snaps) - 1), label=f"m{key}")
        row = snaps[m][1].get(key)
        if row is None:
            continue
        img = images.setdefault(key[0], QueueImage())
        if row[0] == "job":
            img.jobs[key[1]] = Job.from_record(copy.deepcopy(row[1]))
        else:
            img.tombstones[key[1]] = row[1]
    replay(log[log_at[k]:], images)
    restored = restore(images, queues["qa"].defaults)
    for name, q in queues.items():
        if name not in restored:
            assert q.seq == 0
            continue
        got, want = export(restored[name], True), export(q, True)
        # The meta's order high-water mark may lag (see
        # test_requeue_of_a_job_missing_from_the_image_still_advances_order); it
        # only ever lags behind orders of jobs that are gone, so it is harmless.
        got_order, want_order = got[0]["meta"].pop("order"), want[0]["meta"].pop("order")
        assert max([0] + [j.order for j in q.jobs.values()]) <= got_order <= want_order
        assert got == want


@PROPS
@given(op_lists, st.data())
def test_replay_from_any_prefix_over_the_state_at_that_prefix_is_exact(
        ops: list[tuple[Any, ...]], data: st.DataObject) -> None:
    """The ordinary case: a completed checkpoint at k holds exactly the state at k."""
    queues, log = live_queues()
    k_op = data.draw(st.integers(0, len(ops)), label="k")
    now = 0
    for op in ops[:k_op]:
        now = run_op(queues[("qa", "qb")[op[1]]], op, now + 1)
    split = len(log)
    images = replay(log)
    for op in ops[k_op:]:
        now = run_op(queues[("qa", "qb")[op[1]]], op, now + 1)
    replay(log[split:], images)
    for name, r in restore(images, queues["qa"].defaults).items():
        assert export(r) == export(queues[name])


def test_hybrid_image_with_a_job_completed_after_the_checkpoint_converges() -> None:
    """A hand-written instance of the checkpoint argument: the job row was
    read after the job completed, but the meta and log start before."""
    queues, log = live_queues()
    q = queues["qa"]
    q.add("a", "n", b"", {"attempts": 2}, now=0)
    jid, tok = pull_one(q, now=1)
    meta_k, split = copy.deepcopy(q.meta()), len(log)
    q.fail(jid, tok, "once", now=2)
    jid, tok = pull_one(q, now=3)
    q.progress(jid, tok, 99)
    q.ack(jid, tok, b"r", now=4)
    img = QueueImage(meta=meta_k, jobs={"a": Job.from_record(q.jobs["a"].to_record())})
    replay(log[split:], {"qa": img})
    r = restore({"qa": img}, q.defaults)["qa"]
    assert export(r) == export(q)
    assert r.jobs["a"].state == COMPLETED
    assert r.counters == q.counters
