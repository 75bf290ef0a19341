"""Cost of one checkpoint row: the broker's Store against a bare SQLite insert.

A checkpoint writes every job a batch of commits touched into the `jobs`
table (broker/store.py). Every pushed job pays it once, every completed job
twice (its history row, then its tombstone) and every moved job twice (the
target's import, the source's delete), so it is the largest per-job cost of
a move. This runs a real `Store` on a temp dir: N waiting jobs over 333
queues committed in batches of 1000, then one whole checkpoint; the
baseline, measured in the same run, is the same rows (already packed)
inserted into the same table layout with one `executemany` per 250 rows.

    python bench/bench_checkpoint.py [--jobs 333000]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardq.broker.engine import live_row  # noqa: E402
from shardq.broker.job import Job  # noqa: E402
from shardq.broker.queue import QueueDefaults, QueueState  # noqa: E402
from shardq.broker.store import CHECKPOINT_CHUNK, Store  # noqa: E402
from shardq.client.ids import uuid7  # noqa: E402
from shardq.router import slot_of  # noqa: E402

QUEUES = 333
PAYLOAD = msgpack.packb({"n": 1, "body": "x" * 100})


def fill(n: int) -> tuple[dict[str, QueueState], list[list[tuple[str, str, list[object]]]]]:
    """N waiting jobs in memory, and their add ops in batches of 1000."""
    log: list[object] = []
    queues = {name: QueueState(name, slot_of(name), log, QueueDefaults())
              for name in (f"backlog-{i:04d}" for i in range(QUEUES))}
    names = list(queues)
    ops = []
    for k in range(n):
        q = queues[names[k % QUEUES]]
        job = Job(uuid7(), "job", PAYLOAD, "waiting", 0, 1, None, 1_700_000_000_000, order=k)
        q.jobs[job.id] = job
        ops.append(("A", q.name, job.to_record()))
    return queues, [ops[i:i + 1000] for i in range(0, n, 1000)]


def store_checkpoint(path: str, n: int, reopen: bool = False) -> tuple[float, int]:
    """Seconds for one whole checkpoint of N jobs, and its step count.

    `reopen`: the store is reopened before the checkpoint, so every row is
    read and packed from memory (as after a restart, or for jobs changed
    since their add) instead of reusing the record its add logged."""
    queues, batches = fill(n)
    st = Store(path)
    st.open_and_recover()
    for seq, batch in enumerate(batches, start=1):
        st.commit(seq, batch)
    if reopen:
        st.close()
        st = Store(path)
        st.open_and_recover()
    t = time.perf_counter()
    st.checkpoint_begin(len(batches), {}, {}, lambda q, j: live_row(queues, q, j))
    steps = 1
    while st.checkpoint_step():
        steps += 1
    took = time.perf_counter() - t
    st.close()
    return took, steps


def bare_inserts(path: str, n: int) -> float:
    """Seconds to insert N prepacked rows, CHECKPOINT_CHUNK per transaction."""
    queues, _ = fill(n)
    rows = sorted((q.slot, q.name, jid, msgpack.packb(job.to_record(), use_bin_type=True))
                  for q in queues.values() for jid, job in q.jobs.items())
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE jobs(slot INTEGER NOT NULL, queue TEXT NOT NULL, id TEXT NOT NULL,"
               " blob BLOB NOT NULL, PRIMARY KEY(slot, queue, id)) WITHOUT ROWID")
    t = time.perf_counter()
    for i in range(0, len(rows), CHECKPOINT_CHUNK):
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO jobs VALUES (?,?,?,?)",
                       rows[i:i + CHECKPOINT_CHUNK])
        db.execute("COMMIT")
    took = time.perf_counter() - t
    db.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=333_000, help="waiting jobs to checkpoint")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as d:
        base = bare_inserts(os.path.join(d, "bare.db"), a.jobs)
        took, steps = store_checkpoint(os.path.join(d, "broker.db"), a.jobs)
        mem, _ = store_checkpoint(os.path.join(d, "reopened.db"), a.jobs, reopen=True)
    per_row, base_row = took / a.jobs * 1e6, base / a.jobs * 1e6
    print(f"{a.jobs:,} rows: Store checkpoint {took:.2f} s in {steps} steps "
          f"({per_row:.1f} us/row, {took / steps * 1e3:.2f} ms/step); bare SQLite inserts of the "
          f"same rows prepacked and sorted {base:.2f} s ({base_row:.1f} us/row); "
          f"ratio {per_row / base_row:.2f}x")
    print(f"rows read and packed from memory (after a restart, or jobs changed since their "
          f"add): {mem / a.jobs * 1e6:.1f} us/row, ratio {mem / base:.2f}x")


if __name__ == "__main__":
    main()
