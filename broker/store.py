"""SQLite persistence: a redo log written by group commit, and a checkpointer.

Layout (docs/design.md §3):
    log(seq INTEGER PRIMARY KEY, ops BLOB)    one row per group commit
    jobs(slot, queue, id, blob) WITHOUT ROWID live jobs and dedup tombstones
    state(key PRIMARY KEY, value) WITHOUT ROWID
        "checkpoint_seq" -> last seq whose effects the jobs/state rows hold
        "q:<queue>"      -> queue meta (counters, seq, paused) as of that seq
        "broker"         -> ownership, epochs, topology as of that seq
        "identity"       -> {storage, broker, created_ms}: this data directory's
                            storage identity (a random id made when the file is
                            first opened) and the broker id that claimed it

Every method except `open_and_recover` and `claim_identity` (both at start,
before the first commit) runs on the single writer thread.
The checkpointer reads live jobs straight from the broker's memory through
`row_source`; rows that are newer than the checkpoint seq are harmless,
because replay applies absolute values (see broker/replay.py).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from shardq import failpoints
from shardq.broker import redo
from shardq.broker.histogram import COMMIT_BUCKETS_S, Buckets
from shardq.broker.identity import ForeignStorageError as ForeignStorageError
from shardq.broker.identity import StorageIdentity
from shardq.broker.integrity import CorruptionError, Damage, job_key, log_key, seal, unseal
from shardq.broker.job import Job
from shardq.broker.replay import Images, QueueImage, apply_broker_op, apply_op
from shardq.router import slot_of

log = logging.getLogger("shardq.broker.store")

# (queue, id) -> (slot, blob) to write, or (slot, None) to delete
RowSource = Callable[[str, str], tuple[int, bytes | None] | None]

_DIRTY = redo.DIRTY
_JOB, _ADDED, _TOMBSTONES = redo.Touch.JOB, redo.Touch.ADDED, redo.Touch.TOMBSTONES
_QUEUE_GONE, _QUEUES_GONE = redo.Touch.QUEUE_GONE, redo.Touch.QUEUES_GONE
CHECKPOINT_CHUNK = 250  # rows per checkpoint transaction: a commit waits for one at most
GONE_ROWS_PER_STEP = 1000  # rows of dropped queues deleted per checkpoint transaction
# Dirty keys are written in B-tree order so a chunk's rows share pages (job ids
# are time-ordered, so recent jobs of a queue sit together). Sorting a million
# keys in one call holds the GIL (the event loop) for a second: they are sorted
# in runs of this many, one run per step (~9 ms), then merged lazily. Chunks
# of unsorted keys touched one page per row: 20k dirty keys/s wrote ~40 MB/s
# of WAL per broker after a scale out.
SORT_RUN = 10_000
# WAL frames past which the writer completes the background checkpointer's
# pass itself. A passive checkpoint from another connection never finishes
# while the writer keeps appending, so under steady load the WAL never
# restarts and grew to 860 MB per broker (measured) with every commit's
# page lookups and the disk slowing down; the writer, the only writer,
# finishes the few frames appended since the last pass and the next commit
# starts the WAL from the beginning.
WAL_RESTART_FRAMES = 4096  # 16 MB of 4 KB pages
WAL_SIZE_LIMIT = 64 * 2**20  # bytes a restarted WAL file is truncated to


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ValueError) and str(exc) else f"undecodable ({exc!r})"


class StorageFullError(Exception):
    """A write failed for lack of space (or an I/O error of the disk): nothing
    of it was committed and the transaction is rolled back. The caller keeps
    the ops and tries again later; the broker stays up (README "Disk full")."""


# SQLITE_FULL, SQLITE_IOERR (a WAL append on a full disk can report either).
_STORAGE_ERRORS = (13, 10)


def _storage_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return code & 0xFF in _STORAGE_ERRORS
        return "full" in str(exc) or "I/O error" in str(exc)
    return isinstance(exc, OSError) and exc.errno == 28  # ENOSPC


# Storage identity (docs/design.md §3.2) is StorageIdentity's, broker/identity.py.
class Store(StorageIdentity):
    def __init__(self, path: str, durable: bool = True, verify: bool = False,
                 salvage: bool = False) -> None:
        self.path = path
        self.durable = durable
        self.verify = verify  # the full integrity_check at start, not quick_check
        self.salvage = salvage  # start on a damaged file, leaving damaged records out
        self.damage: Damage | None = None  # what the start found (salvaged)
        self._db: sqlite3.Connection | None = None
        self._dirty: set[tuple[str, str]] = set()
        # Whole queues to write at the next checkpoint (a handoff's imports),
        # listed only then, so activating an import costs O(1) here.
        self._dirty_queues: list[tuple[str, dict[str, Any], dict[str, int]]] = []
        self._obliterated: set[str] = set()
        self._ckpt: _Checkpoint | None = None
        self.commits = 0
        self.commit_seconds = 0.0
        self.commit_hist = Buckets(COMMIT_BUCKETS_S)  # shardq_commit_seconds
        self.log_rows = 0
        self._stop_wal = threading.Event()
        self._wal_thread: threading.Thread | None = None
        self._wal_frames = 0  # WAL length seen by the last background pass
        self.wal_restarts = 0
        self.storage_id = ""  # set by open_and_recover
        self._identity: dict[str, Any] = {}

    # ------------------------------------------------------------ startup
    def open_and_recover(self) -> tuple[Images, dict[str, Any], dict[str, Images], int]:
        """Open (creating) the file and rebuild queue images from it.

        Returns (images, broker_state, staging, last_seq): `staging` holds the
        queues of handoffs this broker is importing, by move id."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'OFF'}")
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        db.execute("PRAGMA cache_size=-65536")
        db.execute("CREATE TABLE IF NOT EXISTS log(seq INTEGER PRIMARY KEY, ops BLOB NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS jobs(slot INTEGER NOT NULL, queue TEXT NOT NULL,"
                   " id TEXT NOT NULL, blob BLOB NOT NULL, PRIMARY KEY(slot, queue, id))"
                   " WITHOUT ROWID")
        db.execute("CREATE TABLE IF NOT EXISTS state(key TEXT PRIMARY KEY, value BLOB)"
                   " WITHOUT ROWID")
        self._db = db
        damage = Damage(self.path)
        self._check_structure(db, damage)
        state = self._load_state(db, damage)
        ckpt_seq = int(state.get("checkpoint_seq", 0))
        broker_state: dict[str, Any] = dict(state.get("broker", {}))
        images: Images = {}
        for key, meta in state.items():
            if key.startswith("q:"):
                images[key[2:]] = QueueImage(meta=dict(meta))
        self._load_jobs(db, damage, images)
        staging: dict[str, Images] = {}
        last_seq = self._replay_log(db, damage, ckpt_seq, images, broker_state, staging)
        self._settle_damage(db, damage)
        # Written only once the file is known sound: a damaged one is refused
        # as it is (above), never given a new identity.
        self._identity = state.get("identity") or self._new_identity()
        self.storage_id = str(self._identity["storage"])
        self.log_rows = db.execute("SELECT count(*) FROM log").fetchone()[0]
        self._start_wal_checkpointer()
        return images, broker_state, staging, last_seq

    def _load_state(self, db: sqlite3.Connection, damage: Damage) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for k, v in self._rows(db, "SELECT key, value FROM state", damage):
            try:
                state[k] = msgpack.unpackb(v, raw=False)
            except Exception as exc:  # a state row that does not decode
                damage.add(f"state row {k!r}", f"undecodable ({exc})", table="state", key=k)
        return state

    def _load_jobs(self, db: sqlite3.Connection, damage: Damage, images: Images) -> None:
        unpack = msgpack.unpackb
        for queue, jid, blob in self._rows(db, "SELECT queue, id, blob FROM jobs", damage):
            try:
                rec = unpack(unseal(job_key(queue, jid), blob), raw=False)
                job = None if len(rec) == 1 else Job.from_record(rec)
            except Exception as exc:  # damaged: never served (README "Corruption")
                damage.add(f"job row (queue {queue!r}, id {jid!r})", _why(exc),
                           table="jobs", queue=str(queue), id=str(jid), blob=bytes(blob).hex())
                continue
            img = images.get(queue)
            if img is None:
                img = images[queue] = QueueImage()
            if job is None:
                img.tombstones[jid] = rec[0]
            else:
                img.jobs[jid] = job

    def _replay_log(self, db: sqlite3.Connection, damage: Damage, ckpt_seq: int,
                    images: Images, broker_state: dict[str, Any],
                    staging: dict[str, Images]) -> int:
        last_seq = ckpt_seq
        for seq, blob in self._rows(db, "SELECT seq, ops FROM log WHERE seq > ? ORDER BY seq",
                                    damage, (ckpt_seq,)):
            try:
                ops = msgpack.unpackb(unseal(log_key(seq), blob), raw=False)
            except Exception as exc:
                damage.add(f"log row {seq}", _why(exc), table="log", seq=str(seq))
                continue
            for op in ops:
                if op[1] is None:
                    if op[0] == "I":  # imported jobs arrived without ops of their own
                        self.mark_dirty_queues([(name, img.jobs, img.tombstones)
                                                for name, img in staging.get(op[2], {}).items()])
                    apply_broker_op(images, broker_state, staging, op)
                else:
                    apply_op(images, op)
            # What only this log holds must reach the next checkpoint, or that
            # checkpoint would delete these rows without writing their jobs.
            self._track(ops)
            last_seq = seq
        return last_seq

    def _settle_damage(self, db: sqlite3.Connection, damage: Damage) -> None:
        """Refuse to start on damage, or (--salvage) list it and go on without it."""
        if not damage.problems:
            return
        if not self.salvage:
            db.close()
            self._db = None
            raise CorruptionError(damage)
        self.damage = damage
        where = damage.write_quarantine()
        # Listed there with their bytes; gone from the file, so a later start
        # does not find (and quarantine) them again.
        db.execute("BEGIN")
        for q in damage.quarantined:
            if q.get("table") == "jobs":
                db.execute("DELETE FROM jobs WHERE slot = ? AND queue = ? AND id = ?",
                           (slot_of(q["queue"]), q["queue"], q["id"]))
            elif q.get("table") == "log":
                db.execute("DELETE FROM log WHERE seq = ?", (int(q["seq"]),))
        db.execute("COMMIT")
        log.error("salvaged a damaged %s: %d problem(s), damaged records left out and "
                  "listed in %s", self.path, len(damage.problems), where)

    def _check_structure(self, db: sqlite3.Connection, damage: Damage) -> None:
        """SQLite's own check of the file: quick_check, or integrity_check with --verify."""
        pragma = "integrity_check" if self.verify else "quick_check"
        try:
            rows = [r[0] for r in db.execute(f"PRAGMA {pragma}(20)")]
        except sqlite3.DatabaseError as exc:
            damage.add(f"sqlite {pragma}", str(exc))
            return
        if rows != ["ok"]:
            for r in rows:
                damage.add(f"sqlite {pragma}", str(r))

    @staticmethod
    def _rows(db: sqlite3.Connection, sql: str, damage: Damage,
              params: tuple[Any, ...] = ()) -> list[Any]:
        """All rows of a query; a table SQLite cannot read is reported, not raised."""
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            damage.add(f"reading {sql.split('FROM')[1].split()[0]}", str(exc))
            return []

    def _start_wal_checkpointer(self) -> None:
        # Passive WAL checkpoints from a second connection never block the
        # writer (docs/design.md §3); wal_autocheckpoint=0 keeps them off the commit path.
        def run() -> None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                while not self._stop_wal.wait(0.5):
                    try:
                        row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    except sqlite3.OperationalError:
                        continue
                    self._wal_frames = int(row[1]) if row and row[1] > 0 else 0
            finally:
                db.close()

        self._wal_thread = threading.Thread(target=run, name="wal-checkpoint", daemon=True)
        self._wal_thread.start()

    # ------------------------------------------------------------ writer thread
    def commit(self, seq: int, ops: list[Any]) -> None:
        """Write one group commit as log row `seq`; returns after fsync.

        Raises:
            StorageFullError: no space; nothing of it was written.
        """
        try:
            self._commit(seq, ops)
        except (sqlite3.OperationalError, OSError) as exc:
            if not _storage_full(exc):
                raise
            self._rollback()
            raise StorageFullError(f"commit of {len(ops)} ops failed: {exc}") from exc

    def reclaim_wal(self) -> bool:
        """Backfill the WAL into the database and truncate it to zero bytes:
        after a failed write on a full disk, the space its frames took is
        the first to win back. False when it could not (no space, readers)."""
        db = self._db
        if db is None:
            return False
        try:
            row = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            log.debug("WAL reclaim failed: %r", exc)
            return False
        log.debug("WAL reclaim: %r", row)
        return not row[0]

    def _rollback(self) -> None:
        db = self._db
        if db is not None and db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _commit(self, seq: int, ops: list[Any]) -> None:

        blob = seal(log_key(seq), msgpack.packb(ops, use_bin_type=True))
        self._track(ops)
        db = self._db
        assert db is not None
        t0 = time.perf_counter()
        db.execute("BEGIN")
        db.execute("INSERT INTO log(seq, ops) VALUES (?, ?)", (seq, blob))
        if failpoints.ACTIVE:
            failpoints.hit("commit.before_fsync")
        db.execute("COMMIT")
        if failpoints.ACTIVE:
            failpoints.hit("commit.after_fsync")
        took = time.perf_counter() - t0
        self.commit_seconds += took
        self.commit_hist.observe(took)
        self.commits += 1
        self.log_rows += 1
        if self._wal_frames > WAL_RESTART_FRAMES:
            self._restart_wal(db)

    def _restart_wal(self, db: sqlite3.Connection) -> None:
        """Backfill what the background pass left, so the next commit starts the
        WAL from its beginning. This commit's answer waits for it: the frames
        since the last pass (<= 0.5 s of writes) and an fsync of the database
        file, once per WAL_RESTART_FRAMES of WAL."""
        self._wal_frames = 0
        try:
            busy, _frames, _done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError:
            return
        if not busy:
            self.wal_restarts += 1

    def _track(self, ops: list[Any]) -> None:
        """Note the jobs and queues these ops touched, for the next checkpoint."""
        dirty = self._dirty
        for op in ops:
            touch = _DIRTY[op[0]]  # an unknown code fails the commit, never a restart
            if touch is _JOB:
                dirty.add((op[1], op[2]))
            elif touch is _ADDED:
                dirty.add((op[1], op[2][0]))
            elif touch is _TOMBSTONES:
                for jid in op[2]:
                    dirty.add((op[1], jid))
            elif touch is _QUEUE_GONE:
                self._obliterated.add(op[1])
            elif touch is _QUEUES_GONE:
                self._obliterated.update(op[2])

    def mark_dirty_queues(self, queues: list[tuple[str, dict[str, Any], dict[str, int]]]
                          ) -> None:
        """Jobs that arrived without ops of their own (a handoff's import)."""
        self._dirty_queues.extend(queues)

    def checkpoint_begin(self, seq: int, metas: dict[str, dict[str, Any]],
                         broker_state: dict[str, Any], row_source: RowSource) -> None:
        """Start a checkpoint at `seq` (every op <= seq is in `metas`)."""
        # Not sorted here: one sort of a million keys holds the GIL (and so
        # the event loop) for a second; each chunk is sorted when written.
        keys = list(self._dirty)
        self._dirty = set()
        # `list(d)` copies a dict's keys in one step under the GIL, so reading
        # the live queues from the writer thread is safe. A key listed twice
        # is only written twice.
        for name, jobs, tombstones in self._dirty_queues:
            keys.extend([(name, jid) for jid in list(jobs) + list(tombstones)])
        self._dirty_queues = []
        gone = self._obliterated
        self._obliterated = set()
        self._ckpt = _Checkpoint(seq, metas, broker_state, keys, gone, row_source)

    def checkpoint_step(self) -> bool:
        """Write one bounded chunk; True while more remains.

        Raises:
            StorageFullError: no space: the checkpoint is abandoned (its keys
                are dirty again, the log it would replace stays) and is begun
                again later.
        """
        try:
            return self._checkpoint_step()
        except (sqlite3.OperationalError, OSError) as exc:
            if not _storage_full(exc):
                raise
            self._rollback()
            ck, self._ckpt = self._ckpt, None
            if ck is not None:
                self._dirty.update(ck.keys)
                self._obliterated.update(ck.gone)
            raise StorageFullError(f"checkpoint failed: {exc}") from exc

    def _checkpoint_step(self) -> bool:
        """One chunk of the checkpoint (see checkpoint_step).

        Only the last step is fsynced: a crash that loses earlier steps loses
        nothing (the log they cover is deleted by the last step), and the
        last step's fsync of the WAL makes every earlier frame durable too.
        Without an fsync a step takes a few ms, so commits queued behind it
        (acks, adds) wait that long instead of a disk flush."""
        ck = self._ckpt
        db = self._db
        if ck is None or db is None:
            return False
        if not ck.gone_left and not ck.sorted_runs():
            return True  # this step sorted a run of the keys
        last = not ck.gone_left and ck.pos + CHECKPOINT_CHUNK >= len(ck.keys)
        if last or not self.durable:
            return self._checkpoint_chunk(ck, db)
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            return self._checkpoint_chunk(ck, db)
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def _checkpoint_chunk(self, ck: _Checkpoint, db: sqlite3.Connection) -> bool:
        db.execute("BEGIN")
        if ck.gone_left:
            # Rows of obliterated / handed-off queues can go early: replay of
            # the log from the old checkpoint deletes them again. Their meta
            # goes only with the new checkpoint seq, in the last step. A few
            # thousand rows per step, by primary key: commits wait meanwhile.
            budget = GONE_ROWS_PER_STEP
            while ck.gone_left and budget > 0:
                queue = ck.gone_left[-1]
                slot = slot_of(queue)
                n = db.execute(
                    "DELETE FROM jobs WHERE slot = ? AND queue = ? AND id IN"
                    " (SELECT id FROM jobs WHERE slot = ? AND queue = ? LIMIT ?)",
                    (slot, queue, slot, queue, budget)).rowcount
                if n < budget:  # none of its rows left
                    ck.gone_left.pop()
                budget -= max(n, 1)  # an empty one still costs a lookup
            db.execute("COMMIT")
            return True
        chunk = ck.next_chunk(CHECKPOINT_CHUNK)
        puts, dels = [], []
        for queue, jid in chunk:
            row = ck.row_source(queue, jid)
            if row is None:
                continue
            slot, blob = row
            if blob is None:
                dels.append((slot, queue, jid))
            else:
                puts.append((slot, queue, jid, seal(job_key(queue, jid), blob)))
        if puts:
            db.executemany("INSERT OR REPLACE INTO jobs(slot, queue, id, blob) VALUES (?,?,?,?)",
                           puts)
        if dels:
            db.executemany("DELETE FROM jobs WHERE slot = ? AND queue = ? AND id = ?", dels)
        if ck.pos < len(ck.keys):
            db.execute("COMMIT")
            return True
        # Last chunk: meta, broker state and the new checkpoint seq in the same
        # transaction, then the log it replaces.
        pack = msgpack.packb
        db.executemany("DELETE FROM state WHERE key = ?", [("q:" + q,) for q in ck.gone])
        db.executemany("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                       [("q:" + q, pack(m, use_bin_type=True)) for q, m in ck.metas.items()])
        db.execute("INSERT OR REPLACE INTO state(key, value) VALUES ('broker', ?)",
                   (pack(ck.broker_state, use_bin_type=True),))
        db.execute("INSERT OR REPLACE INTO state(key, value) VALUES ('checkpoint_seq', ?)",
                   (pack(ck.seq),))
        db.execute("DELETE FROM log WHERE seq <= ?", (ck.seq,))
        db.execute("COMMIT")
        self.log_rows = db.execute("SELECT count(*) FROM log").fetchone()[0]
        self._ckpt = None
        return False

    @property
    def checkpointing(self) -> bool:
        return self._ckpt is not None

    def close(self) -> None:
        self._stop_wal.set()
        if self._wal_thread is not None:
            self._wal_thread.join(timeout=5)
        if self._db is not None:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass
            self._db.close()
            self._db = None


class _Checkpoint:
    __slots__ = ("broker_state", "gone", "gone_left", "keys", "merged", "metas", "pos",
                 "row_source", "runs", "seq")

    def __init__(self, seq: int, metas: dict[str, dict[str, Any]], broker_state: dict[str, Any],
                 keys: list[tuple[str, str]], gone: set[str], row_source: RowSource) -> None:
        self.seq = seq
        self.metas = metas
        self.broker_state = broker_state
        self.keys = keys
        self.gone = gone
        self.gone_left = sorted(gone)  # queues whose rows are still to delete
        self.pos = 0  # keys written so far
        self.row_source = row_source
        self.runs: list[list[tuple[str, str]]] = []  # sorted runs of `keys`, in order
        self.merged: Iterator[tuple[str, str]] | None = None

    def sorted_runs(self) -> bool:
        """Sort the next run of keys; True once every key is in a sorted run."""
        if self.merged is not None:
            return True
        start = len(self.runs) * SORT_RUN
        if start < len(self.keys):
            self.runs.append(sorted(self.keys[start:start + SORT_RUN]))
        if len(self.runs) * SORT_RUN < len(self.keys):
            return False
        self.merged = heapq.merge(*self.runs) if len(self.runs) > 1 else iter(
            self.runs[0] if self.runs else ())
        return True

    def next_chunk(self, n: int) -> list[tuple[str, str]]:
        """The next `n` keys in B-tree order (call once sorted_runs() is True)."""
        assert self.merged is not None
        chunk = list(itertools.islice(self.merged, n))
        self.pos += len(chunk)
        return chunk
