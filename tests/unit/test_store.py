"""shardq.broker.store: the SQLite redo log and its checkpointer (docs/design.md §3, §9.1).

A small harness plays the engine's part: queues share one op log, each
`commit()` writes the pending ops as one log row, and checkpoints read rows
straight from the live queues. "Crash" = close the store without finishing
what was in flight (every commit and checkpoint step is its own transaction,
so closing adds nothing a `kill -9` would not have kept), then reopen and
compare the recovered queues with the live ones.
"""

from __future__ import annotations

import copy
import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import msgpack
import pytest

from shardq.broker import store as store_module
from shardq.broker.engine import live_row
from shardq.broker.integrity import job_key, log_key, unseal
from shardq.broker.job import ACTIVE, COMPLETED, WAITING
from shardq.broker.queue import QueueDefaults, QueueState
from shardq.broker.store import Store
from shardq.router import slot_of

# A queue lives in slot_of(name), as in the broker (the store relies on it).
SLOTS = {name: slot_of(name) for name in ("emails", "sms", "webhooks")}
# A job that stalls for good is left out of random workloads: its replay is
# wrong (see test_replay.py::test_replay_of_a_job_failed_for_stalling_keeps_its_stalled_count).
DEFAULTS = QueueDefaults(keep_completed=4, keep_failed=3, dedup_ttl_ms=200, max_tombstones=6,
                         max_stalled_count=10**6)


class Broker:
    """The engine's use of Store, without the event loop and writer thread."""

    def __init__(self, path: str, defaults: QueueDefaults = DEFAULTS) -> None:
        self.store = Store(path)
        images, self.broker_state, self.staging, self.seq = self.store.open_and_recover()
        self.log: list[Any] = []
        self.defaults = defaults
        self.queues: dict[str, QueueState] = {}
        for name, img in images.items():
            q = QueueState(name, SLOTS[name], self.log, defaults)
            q.restore(img.meta, img.jobs, img.tombstones)
            self.queues[name] = q

    def q(self, name: str) -> QueueState:
        if name not in self.queues:
            self.queues[name] = QueueState(name, SLOTS[name], self.log, self.defaults)
        return self.queues[name]

    def commit(self) -> int:
        """Write the open batch as the next log row; returns its seq."""
        ops = self.log[:]
        self.log.clear()
        self.seq += 1
        self.store.commit(self.seq, ops)
        return self.seq

    def row_source(self, queue: str, jid: str) -> tuple[int, bytes | None] | None:
        # The broker's own: rows come from live memory, maybe newer than the seq.
        return live_row(self.queues, queue, jid)

    def checkpoint_begin(self) -> int:
        """Begin a checkpoint right after a commit, as the engine does."""
        assert not self.log, "memory must reflect exactly the ops <= seq"
        metas = {name: q.meta() for name, q in self.queues.items()}
        self.store.checkpoint_begin(self.seq, metas, copy.deepcopy(self.broker_state),
                                    self.row_source)
        return self.seq

    def checkpoint(self) -> int:
        """A whole checkpoint; returns how many steps it took."""
        self.checkpoint_begin()
        steps = 1
        while self.store.checkpoint_step():
            steps += 1
        return steps

    def close(self) -> None:
        self.store.close()


def export(q: QueueState) -> list[dict[str, Any]]:
    chunks = copy.deepcopy(list(q.export_chunks()))
    for ch in chunks:  # removals in the same ms have no defined order after recovery
        if ch["kind"] == "tombstones":
            ch["tombstones"].sort(key=lambda t: (t[1], t[0]))
    return msgpack.unpackb(msgpack.packb(chunks, use_bin_type=True), raw=False)


def assert_recovered(path: str, live: Broker, exact_order: bool = True) -> Broker:
    """Reopen `path` and check it holds exactly the live queues' state."""
    again = Broker(path)
    assert again.seq == live.seq
    assert set(again.queues) == {n for n, q in live.queues.items() if q.seq}
    for name, q in live.queues.items():
        if not q.seq:
            continue
        got, want = export(again.queues[name]), export(q)
        if not exact_order:
            # A checkpoint row read after its job was requeued and removed leaves
            # the order high-water mark behind (test_replay.py, harmless).
            got_order, want_order = got[0]["meta"].pop("order"), want[0]["meta"].pop("order")
            assert max([0] + [j.order for j in q.jobs.values()]) <= got_order <= want_order
        assert got == want, name
    return again


def sql(path: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


def log_seqs(path: str) -> list[int]:
    return [r[0] for r in sql(path, "SELECT seq FROM log ORDER BY seq")]


def checkpoint_seq(path: str) -> int | None:
    rows = sql(path, "SELECT value FROM state WHERE key = 'checkpoint_seq'")
    return msgpack.unpackb(rows[0][0]) if rows else None


def pull_one(q: QueueState, now: int, lock_ms: int = 1000) -> tuple[str, int]:
    out: list[list[Any]] = []
    q.pull(1, lock_ms, now, out)
    return out[0][1], out[0][4]


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "data" / "broker.db")


@pytest.fixture
def brokers() -> Any:
    """Every Broker a test opens is closed at teardown (stops the WAL thread)."""
    opened: list[Broker] = []

    def track(b: Broker) -> Broker:
        opened.append(b)
        return b

    yield track
    for b in opened:
        b.close()


def fill(b: Broker) -> None:
    """A bit of everything on two queues."""
    e, s = b.q("emails"), b.q("sms")
    e.add("w", "send", b"\x01", {"priority": 2}, now=0)
    e.add("d", "send", b"\x02", {"delay_ms": 500}, now=0)
    e.add("c", "send", b"\x03", None, now=0)
    e.add("r", "send", b"\x04", {"attempts": 3, "backoff": ["exponential", 10]}, now=0)
    e.add("gone", "send", b"", {"remove_on_complete": 0}, now=0)
    b.commit()
    tok = {}
    for _ in range(3):
        jid, t = pull_one(e, now=1)
        tok[jid] = t
    e.ack("c", tok["c"], b"\xa2ok", now=2)
    e.fail("r", tok["r"], "transient", now=3)
    e.ack("gone", tok["gone"], None, now=4)
    b.commit()
    s.add("s1", "text", b"", None, now=5)
    jid, t = pull_one(s, now=6)
    s.progress(jid, t, {"pct": 50})
    s.set_paused(True)
    b.commit()


# ======================================================================== opening
def test_fresh_file_recovers_nothing_and_creates_the_tables(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    assert (b.queues, b.broker_state, b.seq) == ({}, {}, 0)
    tables = {r[0] for r in sql(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"log", "jobs", "state"} <= tables


@pytest.mark.parametrize(("durable", "synchronous"), [(True, 2), (False, 0)])
def test_file_is_opened_in_wal_mode_with_fsync_only_when_durable(
        path: str, durable: bool, synchronous: int) -> None:
    st = Store(path, durable=durable)
    try:
        st.open_and_recover()
        assert st._db is not None
        assert st._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert st._db.execute("PRAGMA synchronous").fetchone()[0] == synchronous
        assert st._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    finally:
        st.close()


def test_close_twice_is_harmless(path: str) -> None:
    st = Store(path)
    st.open_and_recover()
    st.close()
    st.close()


# ======================================================================== redo log
def test_committed_ops_survive_a_reopen(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    fill(b)
    assert b.seq == 3
    assert log_seqs(path) == [1, 2, 3]
    b.close()
    again = brokers(assert_recovered(path, b))
    assert again.queues["sms"].paused is True
    assert again.queues["emails"].counters == b.queues["emails"].counters


def test_each_commit_is_one_log_row_holding_its_ops(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    q = b.q("emails")
    q.add("a", "n", b"", None, now=0)
    q.add("b", "n", b"", None, now=0)
    expected = msgpack.unpackb(msgpack.packb(b.log, use_bin_type=True), raw=False)
    b.commit()
    [(seq, blob)] = sql(path, "SELECT seq, ops FROM log")
    assert seq == 1
    assert blob[0] == 0xC1  # sealed (broker/integrity.py)
    assert msgpack.unpackb(unseal(log_key(seq), blob), raw=False) == expected
    assert (b.store.commits, b.store.log_rows) == (1, 1)


def test_empty_commit_is_a_harmless_log_row(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    b.commit()
    b.close()
    again = brokers(Broker(path))
    assert (again.seq, again.queues) == (1, {})


def test_broker_state_ops_in_the_log_are_recovered_in_order(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    b.log.append(("O", None, {"slots": [[0, 99, 3]], "term": 2}))
    b.commit()
    b.log.append(("O", None, {"term": 5}))
    b.q("emails").add("a", "n", b"", None, now=0)
    b.commit()
    b.close()
    again = brokers(Broker(path))
    assert again.broker_state == {"slots": [[0, 99, 3]], "term": 5}
    assert set(again.queues) == {"emails"}


def test_active_job_recovers_active_with_its_token_and_stalls_when_due(
        path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    q = b.q("emails")
    q.add("a", "n", b"", None, now=0)
    jid, tok = pull_one(q, now=10, lock_ms=100)
    b.commit()
    b.close()
    r = brokers(Broker(path)).queues["emails"]
    assert (r.jobs["a"].state, r.jobs["a"].token) == (ACTIVE, tok)
    assert r.expire_locks(109) == 0
    assert r.expire_locks(110) == 1
    assert r.jobs["a"].state == WAITING
    assert r.ack(jid, tok, None, now=111) == "LOCK_LOST"


# ======================================================================== checkpoints
def test_checkpoint_writes_rows_and_deletes_log_up_to_its_seq(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    fill(b)
    b.broker_state = {"slots": [[0, 4095, 1]], "term": 1}
    b.checkpoint()
    assert log_seqs(path) == []
    assert checkpoint_seq(path) == 3
    assert b.store.log_rows == 0
    assert not b.store.checkpointing
    live_rows = sum(len(q.jobs) + len(q.tombstones) for q in b.queues.values())
    assert sql(path, "SELECT count(*) FROM jobs")[0][0] == live_rows
    slots = {r[0]: r[1] for r in sql(path, "SELECT DISTINCT queue, slot FROM jobs")}
    assert slots == {"emails": SLOTS["emails"], "sms": SLOTS["sms"]}
    e = b.q("emails")
    e.promote(600)
    jid, tok = pull_one(e, now=600)
    e.ack(jid, tok, None, now=601)
    b.commit()
    b.q("webhooks").add("h", "n", b"", None, now=602)
    b.commit()
    assert log_seqs(path) == [4, 5]
    b.close()
    again = brokers(assert_recovered(path, b))
    assert again.broker_state == {"slots": [[0, 4095, 1]], "term": 1}


def test_checkpoint_then_reopen_recovers_without_any_log(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    fill(b)
    b.checkpoint()
    b.close()
    brokers(assert_recovered(path, b))


@pytest.mark.parametrize("chunk", [1, 2, 3, 1000])
def test_checkpoint_writes_in_bounded_chunks(path: str, brokers: Any, chunk: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", chunk)
    b = brokers(Broker(path))
    q = b.q("emails")
    for i in range(7):
        q.add(f"j{i}", "n", b"", None, now=i)
    b.commit()
    b.checkpoint_begin()
    assert b.store.checkpointing
    steps = 1
    while b.store.checkpoint_step():
        steps += 1
        assert b.store.checkpointing
        assert checkpoint_seq(path) is None  # nothing is final until the last chunk
        assert log_seqs(path) == [1]
    assert steps == max(1, -(-7 // chunk))
    assert not b.store.checkpointing
    assert checkpoint_seq(path) == 1
    b.close()
    brokers(assert_recovered(path, b))


def test_checkpoint_with_nothing_dirty_still_records_its_seq(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    b.q("emails").add("a", "n", b"", None, now=0)
    b.commit()
    b.checkpoint()
    b.q("emails").set_paused(True)  # meta only: no job row is dirty
    b.commit()
    assert b.checkpoint() == 1
    assert checkpoint_seq(path) == 2
    assert log_seqs(path) == []
    b.close()
    again = brokers(assert_recovered(path, b))
    assert again.queues["emails"].paused is True


def test_checkpoint_step_without_a_checkpoint_does_nothing(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    assert b.store.checkpoint_step() is False
    assert not b.store.checkpointing


def test_commits_during_a_checkpoint_stay_in_the_log(path: str, brokers: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", 2)
    b = brokers(Broker(path))
    q = b.q("emails")
    for i in range(6):
        q.add(f"j{i}", "n", b"", {"attempts": 2}, now=i)
    b.commit()
    seq = b.checkpoint_begin()
    now = 10
    while True:
        # The engine alternates commits with checkpoint steps; rows read from
        # now on are newer than `seq`.
        if q.n_waiting:
            jid, tok = pull_one(q, now)
            if now % 20:
                q.fail(jid, tok, "x", now + 1)
            else:
                q.ack(jid, tok, None, now + 1)
        q.add(f"late{now}", "n", b"", None, now + 2)
        b.commit()
        now += 10
        if not b.store.checkpoint_step():
            break
    assert checkpoint_seq(path) == seq
    assert log_seqs(path) == list(range(seq + 1, b.seq + 1))
    b.close()
    brokers(assert_recovered(path, b))


def test_rows_read_after_later_changes_still_recover_exactly(path: str, brokers: Any) -> None:
    """The checkpoint argument: meta at seq k, rows read after k changed them."""
    b = brokers(Broker(path))
    q = b.q("emails")
    q.add("done", "n", b"", {"attempts": 2}, now=0)
    q.add("removed", "n", b"", {"remove_on_complete": 0}, now=0)
    q.add("drained", "n", b"", {"priority": 5}, now=0)
    b.commit()
    b.checkpoint_begin()
    jid, tok = pull_one(q, now=1)
    q.fail(jid, tok, "first", now=2)
    jid, tok = pull_one(q, now=3)
    q.ack(jid, tok, None, now=4)       # "removed" completes and is removed
    jid, tok = pull_one(q, now=5)
    q.progress(jid, tok, 80)
    q.ack(jid, tok, b"r", now=6)       # "done" completes on its second attempt
    q.drain(False, now=7)              # "drained" is removed
    b.commit()
    while b.store.checkpoint_step():
        pass
    assert checkpoint_seq(path) == 1
    b.close()
    again = brokers(assert_recovered(path, b))
    r = again.queues["emails"]
    assert (r.jobs["done"].state, r.jobs["done"].attempts_made) == (COMPLETED, 2)
    assert set(r.tombstones) == {"removed", "drained"}


# ======================================================================== interrupted checkpoints
@pytest.mark.parametrize("steps_done", [0, 1, 2, 3, 4])
def test_interrupted_checkpoint_recovers_exactly(path: str, brokers: Any, steps_done: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", 2)
    b = brokers(Broker(path))
    fill(b)
    b.checkpoint()                     # an earlier, complete checkpoint at seq 3
    q = b.q("emails")
    for i in range(8):
        q.add(f"n{i}", "n", b"", {"remove_on_complete": i % 3}, now=10 + i)
    b.commit()
    q.add("after", "n", b"", None, now=30)
    b.commit()
    seq = b.checkpoint_begin()
    for _ in range(steps_done):
        assert b.store.checkpoint_step() is True  # never the last step
        for jid in sorted(q.active)[:1]:
            q.ack(jid, q.jobs[jid].token, None, now=40)
        if q.n_waiting:
            pull_one(q, now=41)
        b.commit()
    assert checkpoint_seq(path) == 3
    assert log_seqs(path) == list(range(4, b.seq + 1))
    assert b.seq >= seq
    b.close()  # the crash: the final step never ran
    brokers(assert_recovered(path, b))


def test_checkpoint_after_an_interrupted_one_completes_the_job(
        path: str, brokers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", 1)
    b = brokers(Broker(path))
    fill(b)
    b.checkpoint_begin()
    assert b.store.checkpoint_step() is True
    b.close()
    again = brokers(assert_recovered(path, b))
    again.close()
    brokers(assert_recovered(path, b))  # recovering twice changes nothing


def test_checkpoint_after_a_restart_keeps_jobs_only_in_the_old_log(
        path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    b.q("emails").add("before-crash", "n", b"", None, now=0)
    b.commit()
    b.close()  # kill -9 before any checkpoint
    b2 = brokers(Broker(path))
    assert "before-crash" in b2.queues["emails"].jobs
    b2.q("emails").add("after-restart", "n", b"", None, now=1)
    b2.commit()
    b2.checkpoint()
    b2.close()
    again = brokers(Broker(path))
    assert set(again.queues["emails"].jobs) == {"before-crash", "after-restart"}


def test_checkpoint_after_a_restart_mid_checkpoint_keeps_every_job(
        path: str, brokers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", 1)
    b = brokers(Broker(path))
    q = b.q("emails")
    for i in range(4):
        q.add(f"j{i}", "n", b"", None, now=i)
    b.commit()
    b.checkpoint_begin()
    assert b.store.checkpoint_step() is True
    b.close()
    b2 = brokers(Broker(path))
    b2.checkpoint()
    b2.close()
    brokers(assert_recovered(path, b))


def test_interrupted_checkpoint_after_obliterate_keeps_the_queue_seq(
        path: str, brokers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", 1)
    b = brokers(Broker(path))
    q = b.q("emails")
    for i in range(5):
        q.add(f"j{i}", "n", b"", None, now=i)
    b.commit()
    b.checkpoint()                     # q:emails meta at seq 5 is on disk
    q.obliterate()
    q.add("a", "n", b"", None, now=10)
    q.add("b", "n", b"", None, now=10)
    b.commit()
    b.checkpoint_begin()
    assert b.store.checkpoint_step() is True
    b.close()                          # crash before the last step
    again = brokers(Broker(path))
    assert again.queues["emails"].seq == q.seq == 8


def test_obliterate_then_complete_checkpoint_recovers_exactly(path: str, brokers: Any,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", 1)
    b = brokers(Broker(path))
    q = b.q("emails")
    for i in range(5):
        q.add(f"j{i}", "n", b"", None, now=i)
    b.commit()
    b.checkpoint()
    q.obliterate()
    q.add("a", "n", b"", None, now=10)
    b.commit()
    b.checkpoint()
    b.close()
    brokers(assert_recovered(path, b))


def test_intermediate_checkpoint_steps_skip_the_fsync_and_commits_keep_it(
        path: str, brokers: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", 1)
    b = brokers(Broker(path))
    for i in range(4):
        b.q("emails").add(f"j{i}", "n", b"", None, now=i)
    b.commit()
    b.checkpoint_begin()
    seen = []
    real = b.store._checkpoint_chunk

    def spy(ck: Any, db: Any) -> bool:
        seen.append(db.execute("PRAGMA synchronous").fetchone()[0])
        return bool(real(ck, db))

    monkeypatch.setattr(b.store, "_checkpoint_chunk", spy)
    while b.store.checkpoint_step():
        assert b.store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
    assert seen[:-1] == [1] * (len(seen) - 1) and seen[-1] == 2  # NORMAL..., FULL last
    b.close()
    brokers(assert_recovered(path, b))


# ======================================================================== what survives
@pytest.mark.parametrize("rows_per_step", [5000, 2])  # 2: over several transactions
def test_obliterated_queue_rows_are_deleted_by_the_next_checkpoint(
        path: str, brokers: Any, monkeypatch: pytest.MonkeyPatch, rows_per_step: int) -> None:
    monkeypatch.setattr(store_module, "GONE_ROWS_PER_STEP", rows_per_step)
    b = brokers(Broker(path))
    q = b.q("emails")
    for i in range(5):
        q.add(f"j{i}", "n", b"", None, now=i)
    b.q("sms").add("other", "n", b"", None, now=0)
    b.commit()
    b.checkpoint()
    q.obliterate()
    q.add("fresh", "n", b"", None, now=10)
    b.commit()
    b.checkpoint()
    rows = sql(path, "SELECT queue, id FROM jobs ORDER BY queue, id")
    assert rows == [("emails", "fresh"), ("sms", "other")]
    b.close()
    brokers(assert_recovered(path, b))


def test_dedup_tombstones_survive_checkpoint_and_restart(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    q = b.q("emails")
    q.add("once", "n", b"", {"remove_on_complete": 0}, now=0)
    jid, tok = pull_one(q, now=1)
    q.ack(jid, tok, None, now=2)
    b.commit()
    b.checkpoint()
    [(jid, blob)] = sql(path, "SELECT id, blob FROM jobs")
    assert (jid, unseal(job_key("emails", jid), blob)) == ("once", msgpack.packb([2]))
    b.close()
    r = brokers(Broker(path)).queues["emails"]
    assert r.tombstones == {"once": 2}
    assert r.add("once", "n", b"", None, now=3) is False


def test_expired_tombstone_row_is_deleted_by_checkpoint(path: str, brokers: Any) -> None:
    b = brokers(Broker(path))
    q = b.q("emails")
    q.add("once", "n", b"", {"remove_on_complete": 0}, now=0)
    jid, tok = pull_one(q, now=1)
    q.ack(jid, tok, None, now=2)
    b.commit()
    b.checkpoint()
    q.expire_tombstones(2 + DEFAULTS.dedup_ttl_ms)
    b.commit()
    b.checkpoint()
    assert sql(path, "SELECT count(*) FROM jobs")[0][0] == 0
    b.close()
    r = brokers(Broker(path)).queues["emails"]
    assert r.tombstones == {}
    assert r.add("once", "n", b"", None, now=1000) is True


def test_counters_seq_and_pause_survive_checkpoint_and_restart(path: str,
                                                             brokers: Any) -> None:
    b = brokers(Broker(path))
    fill(b)
    b.checkpoint()
    b.q("emails").set_paused(True)
    b.commit()
    b.close()
    again = brokers(Broker(path))
    for name in ("emails", "sms"):
        live, got = b.queues[name], again.queues[name]
        assert (got.counters, got.seq, got.paused) == (live.counters, live.seq, live.paused)


# ======================================================================== random workloads
def random_step(b: Broker, rng: random.Random, now: int, obliterate: bool = True) -> None:
    q = b.q(rng.choice(list(SLOTS)))
    r = rng.random()
    active = sorted(q.active)
    if r < 0.30:
        jid = f"j{rng.randrange(15)}"
        q.add(jid, "n", jid.encode(), {
            "priority": rng.randrange(3), "delay_ms": rng.choice([0, 0, 20]),
            "attempts": rng.randint(1, 3), "backoff": rng.choice([None, ["fixed", 5]]),
            "remove_on_complete": rng.choice([-1, -1, 0, 2]),
            "remove_on_fail": rng.choice([-1, 0, 1])}, now)
    elif r < 0.50:
        q.pull(rng.randint(1, 3), rng.choice([10, 50]), now, [])
    elif r < 0.60 and active:
        jid = rng.choice(active)
        q.ack(jid, q.jobs[jid].token, b"res", now)
    elif r < 0.68 and active:
        jid = rng.choice(active)
        q.fail(jid, q.jobs[jid].token, f"err{now}", now)
    elif r < 0.72 and active:
        jid = rng.choice(active)
        q.extend(jid, q.jobs[jid].token, 30, now)
    elif r < 0.75 and active:
        jid = rng.choice(active)
        q.progress(jid, q.jobs[jid].token, now)
    elif r < 0.90:
        q.promote(now)
        q.expire_locks(now)
        q.expire_tombstones(now)
    elif r < 0.95:
        q.set_paused(rng.random() < 0.3)
    elif r < 0.985 or not obliterate:
        q.drain(rng.random() < 0.5, now)
    else:
        q.obliterate()


@pytest.mark.parametrize("seed", range(12))
def test_random_workload_with_checkpoints_recovers_exactly(
        path: str, brokers: Any, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", 3)
    rng = random.Random(seed)
    b = brokers(Broker(path))
    checkpointing = False
    for now in range(1, 400):
        random_step(b, rng, now * 3, obliterate=False)
        if rng.random() < 0.3:
            b.commit()
            if checkpointing:
                checkpointing = b.store.checkpoint_step()
            elif rng.random() < 0.15:
                b.checkpoint_begin()
                checkpointing = True
    b.commit()
    b.close()  # maybe mid-checkpoint
    brokers(assert_recovered(path, b, exact_order=False))


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_with_obliterates_and_whole_checkpoints_recovers_exactly(
        path: str, brokers: Any, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Obliterate is kept apart from cut-short checkpoints: see
    # test_interrupted_checkpoint_after_obliterate_keeps_the_queue_seq.
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", 3)
    rng = random.Random(1000 + seed)
    b = brokers(Broker(path))
    checkpointing = False
    for now in range(1, 400):
        random_step(b, rng, now * 3)
        if rng.random() < 0.3:
            b.commit()
            if checkpointing:
                checkpointing = b.store.checkpoint_step()
            elif rng.random() < 0.15:
                b.checkpoint_begin()
                checkpointing = True
    b.commit()
    while checkpointing:
        checkpointing = b.store.checkpoint_step()
    b.close()
    brokers(assert_recovered(path, b, exact_order=False))


@pytest.mark.parametrize(("run", "chunk"), [(3, 2), (4, 5), (100, 7)])
def test_checkpoint_writes_keys_in_btree_order_sorting_in_bounded_runs(
        path: str, brokers: Any, monkeypatch: pytest.MonkeyPatch, run: int, chunk: int) -> None:
    """Every dirty key is written once, in (queue, id) order across chunks (rows of a
    chunk share pages), though no step sorts more than `run` keys."""
    monkeypatch.setattr(store_module, "SORT_RUN", run)
    monkeypatch.setattr(store_module, "CHECKPOINT_CHUNK", chunk)
    b = brokers(Broker(path))
    ids = [f"j{i:03d}" for i in range(40)]
    random.Random(7).shuffle(ids)
    for n, jid in enumerate(ids):
        b.q(("emails", "sms", "webhooks")[n % 3]).add(jid, "n", b"", None, now=n)
    b.commit()
    written: list[tuple[str, str]] = []
    sorted_lengths: list[int] = []
    real_sorted = sorted

    def spy_sorted(keys: Any) -> Any:
        sorted_lengths.append(len(keys))
        return real_sorted(keys)

    def recording(queue: str, jid: str) -> Any:
        written.append((queue, jid))
        return b.row_source(queue, jid)

    monkeypatch.setattr(store_module, "sorted", spy_sorted, raising=False)
    metas = {name: q.meta() for name, q in b.queues.items()}
    b.store.checkpoint_begin(b.seq, metas, {}, recording)
    while b.store.checkpoint_step():
        pass
    assert written == real_sorted(written)
    assert len(written) == len(set(written)) == 40
    assert sorted_lengths and max(sorted_lengths) <= run
    b.close()
    brokers(assert_recovered(path, b))


def wal_resets(path: str) -> int:
    """The WAL header's checkpoint sequence number: +1 each time the WAL restarts.
    Read from the file: asking SQLite (a checkpoint) would backfill it."""
    with open(path + "-wal", "rb") as f:
        return int.from_bytes(f.read(16)[12:16], "big")


def test_the_writer_restarts_a_wal_the_background_passes_cannot_finish(
        path: str, brokers: Any) -> None:
    """Under steady writes a passive checkpoint from another connection never catches
    the writer, so the WAL never restarts (it grew to 860 MB per broker in a scale-out
    bench). Once the background pass reports more than WAL_RESTART_FRAMES, the writer
    backfills the rest after its commit and the next commit starts the WAL over."""
    b = brokers(Broker(path))
    b.store._stop_wal.set()  # no background passes: nothing backfills but the writer
    assert b.store._wal_thread is not None
    b.store._wal_thread.join()
    q = b.q("emails")
    for i in range(300):
        q.add(f"j{i}", "n", b"x" * 2000, None, now=i)
        b.commit()
    assert os.path.getsize(path + "-wal") > 300 * 4096
    resets = wal_resets(path)
    q.add("quiet", "n", b"", None, now=999)
    b.commit()
    assert wal_resets(path) == resets  # below the threshold: appended, no restart
    b.store._wal_frames = store_module.WAL_RESTART_FRAMES + 1  # what a pass would report
    q.add("last", "n", b"", None, now=1000)
    b.commit()
    assert b.store.wal_restarts == 1
    q.add("after", "n", b"", None, now=1001)
    b.commit()
    assert wal_resets(path) == resets + 1, "the WAL was not restarted"
    assert os.path.getsize(path + "-wal") <= store_module.WAL_SIZE_LIMIT
    b.close()
    brokers(assert_recovered(path, b))


def test_checkpoint_reuses_the_logged_add_record_only_while_it_is_the_jobs_row(
        path: str, brokers: Any) -> None:
    """An add's packed record goes into the checkpoint as logged; a job changed,
    removed or obliterated since is written (or dropped) from memory instead."""
    b = brokers(Broker(path))
    for i in range(6):
        b.q("emails").add(f"e{i}", "n", b"x", None, now=i)
        b.q("sms").add(f"s{i}", "n", b"x", None, now=i)
    b.q("emails").pull(2, 1000, 10, [])  # e0, e1 active: newer than their add
    b.commit()
    b.q("sms").obliterate()  # its adds are in the log, its jobs gone
    b.q("sms").add("s9", "n", b"y", None, now=20)  # recreated after the obliterate
    b.commit()
    b.checkpoint()
    b.close()
    again = brokers(assert_recovered(path, b))
    assert set(again.queues["sms"].jobs) == {"s9"}
    assert again.queues["emails"].jobs["e0"].state == ACTIVE
    assert again.queues["emails"].jobs["e5"].state == WAITING


def test_job_sealer_seals_as_seal_of_the_job_key() -> None:
    """The checkpoint's per-queue sealer writes the bytes `seal` would."""
    from shardq.broker.integrity import job_sealer, seal

    for queue, jid, payload in [("q", "j", b""), ("emails", "01ab-\u00e9", b"\x93\x01\x02\x03"),
                                ("", "", b"x" * 300)]:
        sealed = job_sealer(queue)(jid, payload)
        assert sealed == seal(job_key(queue, jid), payload)
        assert unseal(job_key(queue, jid), sealed) == payload


def test_adds_around_an_obliterate_in_one_batch_are_all_checkpointed(
        path: str, brokers: Any) -> None:
    """Adds, an obliterate and adds again to one queue in a single commit: the
    jobs added after the obliterate reach the checkpoint, the others do not."""
    b = brokers(Broker(path))
    b.q("emails").add("a1", "n", b"x", None, now=1)
    b.q("emails").obliterate()
    b.q("emails").add("a2", "n", b"x", None, now=2)
    b.q("emails").add("a3", "n", b"x", None, now=3)
    b.commit()
    b.checkpoint()
    b.close()
    again = brokers(assert_recovered(path, b))
    assert set(again.queues["emails"].jobs) == {"a2", "a3"}
