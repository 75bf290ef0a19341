"""The commit log: the one place that decides when a write is durable (docs/design.md §3, §9).

Ops mutate memory synchronously and append their redo ops to `ops`, the
open batch, shared with every queue. `CommitLog` turns the batch into one
log row per group commit: small batches commit inline on the loop thread
when the writer is idle (skipping two thread hand-offs), larger ones on the
single writer thread while the loop goes on filling the next batch.

A reply that must be durable is handed to `defer_reply`: it is held until
the commit holding every op logged before it returned from fsync, then
written. The ack journal (tests count exactly-once completions with it)
follows the same rule: a line reaches the file only once its own commit
did. Checkpoints (broker/store.py) run on the writer between commits, paced
so that commits come first and the checkpoint never starves.

Disk full is not fatal: a commit (or checkpoint step) that finds no space
is rolled back by the store (`StorageFullError`); its ops stay in memory,
unsaved, and go first into the next commit, and its replies wait for that
commit. Every DISK_RETRY_S the WAL's space is reclaimed and the commit tried
again, so the broker resumes by itself when space returns and no answered
write is lost. No checkpoint starts meanwhile (it would spend the space on a
second copy of the jobs before they are saved).

The broker plugs in through `CommitHost`: what to do with a batch before it
commits (handoff taps, event marks) and once it is durable (publish events),
and what a checkpoint needs (queue metas, the ownership record, live rows).

Replication (docs/design.md §12) plugs in through `repl` (broker/replica.py):
while it is set, each batch is shipped to the follower before the local
fsync starts (the two disks work in parallel), and while `repl.gating` a
reply, a journal line or a `durable()` waiter for batch N is released only
once the follower acknowledged N too. With `repl` None (replicas 0, or no
follower yet) the path is exactly the unreplicated one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TextIO

from shardq.broker.store import RowSource, StorageFullError, Store

log = logging.getLogger("shardq.broker")

CHECKPOINT_EVERY_COMMITS = 20_000
CHECKPOINT_EVERY_S = 30.0
CHECKPOINT_STEP_EVERY_S = 0.02  # under load, one checkpoint chunk per 20 ms of commits ...
CHECKPOINT_STEP_SHARE = 1 / 3  # ... and at most this share of the writer's time
INLINE_COMMIT_MAX_OPS = 256  # smaller batches commit on the loop thread when the writer is idle
# A broker with no commit for this long checkpoints what its log holds
# (housekeeping), instead of waiting for the next write to come due: a bulk
# push followed by a quiet moment is written out then, not later on top of
# the next burst (measured: the checkpoint of a 333k-job push cut the
# throughput of the load that followed it by 3-5x for ~20 s at 0.3 cores).
IDLE_CHECKPOINT_AFTER_S = 1.0
# With no commit for this long, checkpoint steps run back to back instead of
# paced: a commit that arrives then waits for one step (a few ms) at most.
IDLE_UNPACED_AFTER_S = 0.1
DISK_RETRY_S = 1.0  # with the disk full, a commit is tried again this often


class Sink(Protocol):
    """Where replies go: a connection's transport."""

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...


class Shipper(Protocol):
    """The follower link, as the commit log sees it (broker/replica.py)."""

    gating: bool  # replies wait for the follower's ack
    acked: int  # the last batch seq the follower has on its disk

    def ship(self, seq: int, ops: list[Any]) -> None:
        """Send batch `seq` to the follower (called before the local commit)."""


class CommitHost(Protocol):
    """What the commit log asks of the broker."""

    def batch_started(self, ops: list[Any]) -> Any:
        """A batch leaves for the store; the result comes back to `batch_durable`."""

    def batch_durable(self, token: Any) -> None:
        """The batch `batch_started` returned `token` for is durable."""

    def checkpoint_blocked(self) -> bool:
        """True while a checkpoint must not start (an import is staged in the log)."""

    def checkpoint_state(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any], RowSource]:
        """(queue metas, ownership record, live-row source) as of the last batch."""

    def ownership_op(self) -> tuple[str, None, dict[str, Any]]:
        """An ownership record to log (a batch that starts a checkpoint)."""


class CommitLog:
    """Group commit, durable replies, the ack journal and checkpoint pacing.

    Args:
        store: the broker's SQLite store, opened and recovered.
        host: the broker (see `CommitHost`).
        durable: answer writes only after fsync (False: `--fast`).
        ack_journal: a file to append every accepted ack to, or None.
    """

    def __init__(self, store: Store, host: CommitHost, durable: bool = True,
                 ack_journal: str | None = None) -> None:
        self.store = store
        self.durable_mode = durable
        self._host = host
        self.ops: list[Any] = []  # the open batch, shared by every QueueState
        self._pending_replies: list[tuple[Sink, bytes]] = []  # for the open batch
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._writer_busy = False
        self._flush_scheduled = False
        self._closed = False  # a closed log commits nothing more (a dropped replica)
        self.seq = 0  # of the last batch handed to the store
        self.committed_seq = 0  # of the last batch the store returned
        self._seq_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._commits_since_ckpt = 0
        self._last_ckpt = time.monotonic()
        self._ckpt_requested = False
        self._ckpt_active = False
        self._last_step = 0.0
        self._next_step_at = 0.0  # under load, no checkpoint step before this
        self._last_commit_at = time.monotonic()  # when the last batch went to the writer
        self._step_timer: asyncio.TimerHandle | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._journal: TextIO | None = (
            open(ack_journal, "a", encoding="utf-8")  # noqa: SIM115 - lives with the broker
            if ack_journal else None)
        # Journal lines of the open batch, and of batches being committed: a
        # line reaches the file only once its own commit did (no false doubles).
        self.journal_lines: list[str] = []
        self._journal_batches: dict[int, list[str]] = {}
        # Disk full (_storage_full): ops of failed commits, not yet on disk.
        self._unsaved: list[Any] = []
        self.disk_full = False  # no commit until the retry timer
        self.disk_full_since = 0.0  # monotonic start of the episode, 0 when none
        self.disk_full_total = 0  # episodes (and disk alarms, counted by the broker)
        # Replication (broker/replica.py): the follower link, and what waits for
        # its ack: (seq, replies, journal lines) in seq order.
        self.repl: Shipper | None = None
        self._held: deque[tuple[int, list[tuple[Sink, bytes]], list[str] | None]] = deque()

    @property
    def journaling(self) -> bool:
        return self._journal is not None

    def resume_at(self, last_seq: int) -> None:
        """Number batches after `last_seq` (recovery, before `start`)."""
        self.seq = self.committed_seq = last_seq

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Commit on `loop` from now on."""
        self._loop = loop

    def close(self) -> None:
        self._closed = True
        if self._journal is not None:
            self._journal.close()
        self._writer.shutdown(wait=True)

    def on_writer(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the writer thread, in order with commits."""
        self._writer.submit(fn, *args)

    # ------------------------------------------------------------ replies
    def defer_reply(self, sink: Sink, data: bytes) -> None:
        """Send `data` once everything logged so far is durable."""
        if self.durable_mode and (self.ops or self._writer_busy or self._unsaved or self._held):
            self._pending_replies.append((sink, data))
            self.schedule_flush()
        else:
            sink.write(data)

    def flush_soon(self) -> None:
        """Commit what is logged without anyone waiting on it (pulls, extends)."""
        self.schedule_flush()

    async def durable(self) -> None:
        """Return once everything logged so far is committed. Unlike
        `flush_all`, this does not wait for the log to run dry, so it ends
        under any load."""
        target = self.seq + (1 if self.ops else 0)
        if self.released_seq >= target:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._seq_waiters.append((target, fut))
        self.schedule_flush()
        await fut

    async def flush_all(self, checkpoint: bool = False) -> None:
        """Wait until everything logged is committed (and checkpointed)."""
        assert self._loop is not None
        if checkpoint:
            self._ckpt_requested = True
            self._commits_since_ckpt = max(self._commits_since_ckpt, 1)
            if not self.ops:
                self.ops.append(self._host.ownership_op())
        # A checkpoint cannot start while an import is staged (its data lives
        # in the log until activation or abort): then the log is enough.
        while self.ops or self._writer_busy or self._ckpt_active or (
                checkpoint and self._ckpt_requested and not self._host.checkpoint_blocked()):
            if self.disk_full_since:
                # Nothing unsaved was answered: stopping now loses no answered write.
                log.error("stopping with the disk full: %d ops not saved (none answered)",
                          len(self._unsaved) + len(self.ops))
                return
            fut: asyncio.Future[None] = self._loop.create_future()
            self._idle_waiters.append(fut)
            self.schedule_flush()
            await fut

    # ------------------------------------------------------------ group commit
    def schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._writer_busy and not self._closed:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._writer_busy or self.disk_full or self._closed:
            return  # disk full: the retry timer flushes (see _storage_full)
        if not self.ops and not self._unsaved:
            self._writer_idle()
            return
        ops = self._unsaved + self.ops if self._unsaved else self.ops[:]
        self._unsaved = []
        self.ops.clear()
        token = self._host.batch_started(ops)
        replies = self._pending_replies
        self._pending_replies = []
        self.seq += 1
        seq = self.seq
        self._last_commit_at = time.monotonic()
        if self.journal_lines:
            self._journal_batches[seq] = self.journal_lines
            self.journal_lines = []
        self._commits_since_ckpt += 1
        if self.repl is not None:
            self.repl.ship(seq, ops)  # before our fsync: both disks work at once
        start_ckpt = not self._ckpt_active and self._ckpt_due()
        if len(ops) <= INLINE_COMMIT_MAX_OPS and not self._ckpt_active and not start_ckpt:
            # A small batch and an idle writer: commit on the loop thread. This
            # skips two thread hand-offs, most of a lone client's latency
            # besides the fsync; under load batches grow and go to the writer.
            try:
                self.store.commit(seq, ops)
            except Exception as exc:
                self._after_commit(exc, replies, seq, token, ops)
            else:
                self._after_commit(None, replies, seq, token)
            return
        self._writer_busy = True
        assert self._loop is not None
        fut = self._loop.run_in_executor(self._writer, self.store.commit, seq, ops)
        fut.add_done_callback(
            lambda f: self._after_commit(f.exception(), replies, seq, token, ops))
        if start_ckpt:
            self._begin_checkpoint(seq)

    def _after_commit(self, exc: BaseException | None, replies: list[tuple[Sink, bytes]],
                      seq: int, token: Any = None, ops: list[Any] | None = None) -> None:
        self._writer_busy = False
        lines = self._journal_batches.pop(seq, None)
        if isinstance(exc, StorageFullError):
            # (Replicated, the follower got this batch before our fsync failed;
            # the retry ships its ops again under the next seq: ops are absolute,
            # so the follower's jobs converge, but its op counters count twice.)
            self._storage_full(exc, ops or [], replies, lines)
            return
        self.committed_seq = seq
        if self.disk_full_since:
            log.warning("disk has space again after %.1f s; accepting adds",
                        time.monotonic() - self.disk_full_since)
            self.disk_full_since = 0.0
        if exc is not None:
            # A failed commit means answered writes could be lost: stop now and
            # let the supervisor restart us on the data that did commit.
            log.critical("commit failed: %r; exiting", exc)
            os._exit(3)
        repl = self.repl
        if repl is not None and repl.gating and (repl.acked < seq or self._held):
            self._held.append((seq, replies, lines))  # the follower's disk first
            if repl.acked >= seq:
                self.release()
        else:
            if lines and self._journal is not None:
                self._journal.write("".join(lines))
                self._journal.flush()  # before the acks are answered
            _send(replies)
        if token is not None:
            self._host.batch_durable(token)
        if self._seq_waiters:
            self._wake_seq_waiters()
        if self._ckpt_active and (
                not self.ops or time.monotonic() >= self._next_step_at):
            self._checkpoint_step()  # commits come first, but the checkpoint never starves
        elif self.ops:
            self.schedule_flush()
        else:
            self._writer_idle()

    def _writer_idle(self) -> None:
        """Nothing is being written: replies parked meanwhile are durable."""
        if self._pending_replies:
            repl = self.repl
            if repl is not None and repl.gating and (
                    repl.acked < self.committed_seq or self._held):
                self._held.append((self.committed_seq, self._pending_replies, None))
            else:
                _send(self._pending_replies)
            self._pending_replies = []
        if self._ckpt_active:
            now = time.monotonic()
            wait = self._next_step_at - now
            # (flush_all waits, or nothing was committed lately: no pacing)
            if wait <= 0 or self._idle_waiters or now - self._last_commit_at > IDLE_UNPACED_AFTER_S:
                self._checkpoint_step()
            elif self._step_timer is None:
                # Paced even when idle: a commit arriving mid-step waits for
                # the whole step, so steps take at most their share of time.
                assert self._loop is not None
                self._step_timer = self._loop.call_later(wait, self._paced_step)
        else:
            self._wake_idle()

    def _paced_step(self) -> None:
        self._step_timer = None
        if self._ckpt_active and not self._writer_busy and not self._closed:
            if self.ops:
                self.schedule_flush()  # commits first; the step follows them
            else:
                self._checkpoint_step()

    # ------------------------------------------------------------ disk full
    def _storage_full(self, exc: StorageFullError, ops: list[Any],
                      replies: list[tuple[Sink, bytes]], lines: list[str] | None) -> None:
        """A commit found no space: keep its ops, replies and journal lines for
        the next one, and try again in DISK_RETRY_S (module docstring). Its
        events go out with the next commit's (their marks only grow)."""
        self._unsaved = ops + self._unsaved
        self._pending_replies = replies + self._pending_replies
        if lines:
            self.journal_lines = lines + self.journal_lines
        self.disk_full = True
        if not self.disk_full_since:
            self.disk_full_since = time.monotonic()
            self.disk_full_total += 1
            log.error("disk full: %s; refusing adds, holding %d unsaved ops until space "
                      "returns (retry every %.0f s)", exc, len(self._unsaved), DISK_RETRY_S)
        else:
            log.info("disk still full: %s", exc)
        for f in self._idle_waiters:  # flush_all gives up (see there)
            if not f.done():
                f.set_result(None)
        self._idle_waiters = []
        assert self._loop is not None
        self._loop.call_later(DISK_RETRY_S, self._retry_storage)

    def _retry_storage(self) -> None:
        assert self._loop is not None
        if self._closed:
            return
        if self._writer_busy:
            self._loop.call_later(DISK_RETRY_S, self._retry_storage)
            return
        if self._ckpt_active and not self.store.checkpointing:
            self._ckpt_active = False  # abandoned on the full disk: begun again later
            self._ckpt_requested = True
        # First win back the WAL's space (the frames of failed writes, and
        # whatever the last checkpoint left), then commit what is unsaved.
        self._writer_busy = True
        fut = self._loop.run_in_executor(self._writer, self.store.reclaim_wal)
        fut.add_done_callback(self._reclaimed)

    def _reclaimed(self, fut: asyncio.Future[bool]) -> None:
        self._writer_busy = False
        self.disk_full = False
        self.schedule_flush()

    def reclaim_when_idle(self) -> None:
        """Hand the WAL's checkpointed space back to the filesystem (the disk
        alarm is on), unless the writer has work."""
        if not self._writer_busy and not self._ckpt_active and not self.ops:
            self._writer.submit(self.store.reclaim_wal)

    # ------------------------------------------------------------ replication
    @property
    def released_seq(self) -> int:
        """The last batch on every disk that must have it (ours, and the
        follower's while the link gates replies)."""
        repl = self.repl
        if repl is None or not repl.gating:
            return self.committed_seq
        return min(self.committed_seq, repl.acked)

    def release(self) -> None:
        """The follower acknowledged more, or replies stopped waiting for it
        (the coordinator marked it out of sync): send what is now safe."""
        limit = self.released_seq
        held = self._held
        while held and held[0][0] <= limit:
            _seq, replies, lines = held.popleft()
            if lines and self._journal is not None:
                self._journal.write("".join(lines))
                self._journal.flush()
            _send(replies)
        if self._seq_waiters:
            self._wake_seq_waiters()

    def drop_held(self) -> None:
        """Fenced (broker/replica.py): these replies are never sent; close their
        connections so that the clients resend elsewhere at once."""
        held, self._held = self._held, deque()
        for _seq, replies, _lines in held:
            for sink, _data in replies:
                abort = getattr(sink, "abort", None)
                if abort is not None:
                    abort()

    @property
    def held_replies(self) -> int:
        """Batches whose replies wait for the follower."""
        return len(self._held)

    def _wake_seq_waiters(self) -> None:
        keep = []
        released = self.released_seq
        for target, fut in self._seq_waiters:
            if target <= released:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._seq_waiters = keep

    def _wake_idle(self) -> None:
        if not self._writer_busy and not self.ops and self._idle_waiters:
            for f in self._idle_waiters:
                if not f.done():
                    f.set_result(None)
            self._idle_waiters = []

    # ------------------------------------------------------------ checkpoints
    def _ckpt_due(self) -> bool:
        if self._host.checkpoint_blocked():
            return False  # staging lives in the log until activation or abort
        if self.disk_full_since:
            return False  # the log's space first (_retry_storage)
        return self._ckpt_requested or self._commits_since_ckpt >= CHECKPOINT_EVERY_COMMITS or (
            time.monotonic() - self._last_ckpt > CHECKPOINT_EVERY_S
            and self._commits_since_ckpt > 0)

    def checkpoint_if_idle(self) -> None:
        """Start a checkpoint of the log when nothing was committed lately."""
        if (self._closed or self._commits_since_ckpt == 0 or self._ckpt_active
                or self._ckpt_requested
                or self.disk_full_since or self.ops or self._writer_busy
                or self._host.checkpoint_blocked()
                or time.monotonic() - self._last_commit_at < IDLE_CHECKPOINT_AFTER_S):
            return
        # A checkpoint begins right after a batch is handed to the writer;
        # an ownership record (as flush_all writes) is that batch.
        self._ckpt_requested = True
        self.ops.append(self._host.ownership_op())
        self.schedule_flush()

    def _begin_checkpoint(self, seq: int) -> None:
        # Called right after handing batch `seq` to the writer with the open
        # batch empty, so memory now reflects exactly the ops <= seq.
        metas, ownership, row_source = self._host.checkpoint_state()
        self._commits_since_ckpt = 0
        self._last_ckpt = time.monotonic()
        self._ckpt_requested = False
        self._ckpt_active = True
        self._writer.submit(self.store.checkpoint_begin, seq, metas, ownership, row_source)

    def _checkpoint_step(self) -> None:
        self._last_step = time.monotonic()
        self._writer_busy = True
        assert self._loop is not None
        fut = self._loop.run_in_executor(self._writer, self.store.checkpoint_step)
        fut.add_done_callback(self._checkpoint_stepped)

    def _checkpoint_stepped(self, fut: asyncio.Future[bool]) -> None:
        self._writer_busy = False
        # A slow step (a big chunk, a loaded disk) waits proportionally
        # longer before the next one while commits are waiting.
        took = time.monotonic() - self._last_step
        self._next_step_at = time.monotonic() + max(
            CHECKPOINT_STEP_EVERY_S, took * (1 / CHECKPOINT_STEP_SHARE - 1))
        exc = fut.exception()
        if isinstance(exc, StorageFullError):
            self._storage_full(exc, [], [], None)
            return
        if exc is not None:
            log.critical("checkpoint failed: %r; exiting", exc)
            os._exit(3)
        if not fut.result():
            self._ckpt_active = False
        if self.ops:
            self.schedule_flush()
        else:
            self._writer_idle()


def _send(replies: list[tuple[Sink, bytes]]) -> None:
    for sink, data in replies:
        if not sink.is_closing():
            sink.write(data)
