"""The coordinator's durable state: one SQLite file under its data dir (docs/design.md §6).

Tables:

    meta(key, value)                 `term`, incremented at every start; `pins`;
                                     `tenants` (cluster-wide tenant limits);
                                     `replication` (replication.py: per primary
                                     {follower, in_sync, repl_epoch, failover?})
    brokers(id, addr, state, weight, revive_state, last_heartbeat_ms, storage, since)
                                     membership; `revive_state` is the state a
                                     `dead` broker returns to when it heartbeats;
                                     `storage` the identity of the data directory
                                     its slots are owned under, recorded at `since`
    topology(epoch, blob)            ownership, one msgpack row per epoch change:
                                     {slots (runs), overrides, partitions, moving};
                                     the last `HISTORY` epochs are kept
    barred(id, at_ms)                forgotten broker ids, refused at register
    moves(move_id, source, target, slots, phase, epoch, state, error, created_ms, updated_ms)
                                     handoffs (moves.py): a row is written before each
                                     step is sent, and the commit point writes the new
                                     ownership and `phase = commit` in one transaction;
                                     the last `MOVE_HISTORY` finished moves are kept

Every `save` is one transaction committed with `synchronous=FULL` before it
returns, so whatever the coordinator answers after a save survives a
`kill -9` or a power loss. Writes are rare (membership and ownership
changes, never heartbeats alone), so they run on the caller's thread.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgpack

from shardq.protocol import PHASES
from shardq.router import BrokerState, Topology

DB_NAME = "coordinator.db"
HISTORY = 100
MOVE_HISTORY = 1000
COMMIT_PHASE = "commit"
_COMMIT_INDEX = PHASES.index(COMMIT_PHASE)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS brokers(
    id TEXT PRIMARY KEY, addr TEXT NOT NULL, state TEXT NOT NULL, weight INTEGER NOT NULL,
    revive_state TEXT NOT NULL, last_heartbeat_ms INTEGER NOT NULL, storage TEXT,
    since INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS topology(epoch INTEGER PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS barred(id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS moves(
    move_id TEXT PRIMARY KEY, source TEXT NOT NULL, target TEXT NOT NULL, slots BLOB NOT NULL,
    phase TEXT NOT NULL, epoch INTEGER NOT NULL, state TEXT NOT NULL, error TEXT,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL) WITHOUT ROWID;
"""


class MoveState(StrEnum):
    """Where a handoff stands as a whole (its `phase` says which step)."""

    RUNNING = "running"  # going forward (before or after the commit point)
    ABORTING = "aborting"  # failed before the commit point; ABORT not yet acknowledged
    ABORTED = "aborted"  # finished, ownership unchanged
    DONE = "done"  # finished, committed, activated and released


@dataclass(frozen=True, slots=True)
class MoveRecord:
    """One handoff of `slots` from `source` to `target` (docs/design.md §6), as persisted.

    `phase` is the step being carried out (one of `shardq.protocol.PHASES`):
    it is persisted before that step's op is sent. `epoch` is the epoch at
    which `target` got the slots: 0 until the commit point.
    """

    move_id: str
    source: str
    target: str
    slots: tuple[int, ...]
    phase: str = PHASES[0]
    epoch: int = 0
    state: MoveState = MoveState.RUNNING
    error: str | None = None
    created_ms: int = 0
    updated_ms: int = 0

    @property
    def committed(self) -> bool:
        """True from the commit point on: from then on the move only rolls forward."""
        return PHASES.index(self.phase) >= _COMMIT_INDEX

    @property
    def finished(self) -> bool:
        return self.state in (MoveState.ABORTED, MoveState.DONE)

    def moving_entry(self) -> dict[str, Any]:
        """The topology's `moving` entry (docs/design.md §5)."""
        return {"move_id": self.move_id, "slots": list(self.slots), "from": self.source,
                "to": self.target, "phase": self.phase}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe view, for the HTTP API."""
        return {**self.moving_entry(), "epoch": self.epoch, "state": self.state.value,
                "error": self.error}


@dataclass(slots=True)
class BrokerRecord:
    """What the coordinator keeps about a broker beyond its topology entry."""

    revive_state: BrokerState
    last_heartbeat_ms: int  # wall clock, for display; liveness uses a monotonic clock
    # The storage identity a `lost-storage` broker presents (not the recorded
    # one): what `forget` records when the broker rejoins empty. Memory only;
    # the broker presents it again at every register and heartbeat.
    presented_storage: str | None = None


@dataclass(slots=True)
class Snapshot:
    """Everything `Store.load` reads back."""

    term: int
    topology: Topology
    records: dict[str, BrokerRecord]
    barred: dict[str, int]
    moves: list[MoveRecord]  # unfinished ones (running or aborting), oldest first


class Store:
    """The coordinator's SQLite file. Not thread-safe: one owner thread.

    Args:
        path: the database file, or ":memory:" (tests).
    """

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Add the columns a file written by an older coordinator lacks."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(brokers)")}
        if "storage" not in columns:
            self._db.execute("ALTER TABLE brokers ADD COLUMN storage TEXT")
        if "since" not in columns:
            self._db.execute("ALTER TABLE brokers ADD COLUMN since INTEGER NOT NULL DEFAULT 0")

    @classmethod
    def in_dir(cls, data_dir: Path) -> Store:
        """Open (creating) the store under `data_dir`."""
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(data_dir / DB_NAME)

    def close(self) -> None:
        """Close the file; idempotent."""
        self._db.close()

    def start_term(self) -> int:
        """Increment and persist the term; called once per coordinator start."""
        with self._tx():
            row = self._db.execute("SELECT value FROM meta WHERE key = 'term'").fetchone()
            term = (int(row[0]) if row else 0) + 1
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('term', ?)", (term,))
        return term

    def load_pins(self) -> dict[int, str]:
        """Slots pinned to a broker by `shardq move` (slot -> broker id)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'pins'").fetchone()
        return {int(k): str(v) for k, v in json.loads(row[0]).items()} if row else {}

    def save_pins(self, pins: dict[int, str]) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('pins', ?)",
                             (json.dumps({str(k): v for k, v in sorted(pins.items())}),))

    def load_tenants(self) -> dict[str, Any]:
        """Cluster-wide tenant limits (coordinator/tenants.py): {name: {queues, max, per_ms}}."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'tenants'").fetchone()
        loaded: dict[str, Any] = json.loads(row[0]) if row else {}
        return loaded

    def save_tenants(self, tenants: dict[str, Any]) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('tenants', ?)",
                             (json.dumps(tenants, sort_keys=True),))

    def load_meta(self, key: str) -> Any:
        """A JSON value kept in `meta` (None when absent)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def load(self) -> Snapshot:
        """Read the last saved state (an empty topology on a fresh file)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'term'").fetchone()
        term = int(row[0]) if row else 0
        brokers: dict[str, Any] = {}
        records: dict[str, BrokerRecord] = {}
        for bid, addr, state, weight, revive, hb, storage, since in self._db.execute(
            "SELECT id, addr, state, weight, revive_state, last_heartbeat_ms, storage, since "
            "FROM brokers"
        ):
            brokers[bid] = {"addr": addr, "state": state, "weight": weight}
            if storage is not None:
                brokers[bid].update(storage=storage, since=int(since))
            records[bid] = BrokerRecord(BrokerState(revive), int(hb))
        top = self._db.execute(
            "SELECT blob FROM topology ORDER BY epoch DESC LIMIT 1"
        ).fetchone()
        body: dict[str, Any] = msgpack.unpackb(top[0]) if top else {"epoch": 0, "slots": []}
        topology = Topology.from_dict({**body, "term": term, "brokers": brokers})
        barred = dict(self._db.execute("SELECT id, at_ms FROM barred").fetchall())
        return Snapshot(term, topology, records, barred, self.load_moves())

    def load_moves(self, finished: bool = False) -> list[MoveRecord]:
        """Unfinished moves, oldest first (or, with `finished`, the kept finished ones)."""
        states = ("aborted", "done") if finished else ("running", "aborting")
        rows = self._db.execute(
            "SELECT move_id, source, target, slots, phase, epoch, state, error, created_ms, "
            "updated_ms FROM moves WHERE state IN (?, ?) ORDER BY created_ms, move_id", states)
        return [
            MoveRecord(mid, src, dst, tuple(msgpack.unpackb(slots)), phase, int(epoch),
                       MoveState(state), error, int(created), int(updated))
            for mid, src, dst, slots, phase, epoch, state, error, created, updated in rows
        ]

    def save(
        self,
        topology: Topology,
        records: Mapping[str, BrokerRecord],
        bar: Iterable[tuple[str, int]] = (),
        moves: Iterable[MoveRecord] = (),
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Persist membership, ownership and move records in one durable transaction.

        Args:
            topology: the whole current topology; its brokers must all be in `records`.
                Saving at an unchanged epoch replaces that epoch's row (a phase change).
            records: per-broker extras, keyed like `topology.brokers`.
            bar: (broker id, wall ms) pairs to add to the barred list.
            moves: move records to insert or replace.
            meta: JSON values to keep in `meta` in the same transaction
                (the replication state, replication.py).
        """
        move_rows = [
            (r.move_id, r.source, r.target, msgpack.packb(list(r.slots)), r.phase, r.epoch,
             r.state.value, r.error, r.created_ms, r.updated_ms)
            for r in moves
        ]
        d = topology.to_dict()
        body = {k: d[k] for k in ("epoch", "slots", "overrides", "partitions", "moving")}
        with self._tx():
            self._db.execute("DELETE FROM brokers")
            self._db.executemany(
                "INSERT INTO brokers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (b.id, b.addr, b.state.value, b.weight,
                     records[b.id].revive_state.value, records[b.id].last_heartbeat_ms,
                     b.storage, b.since)
                    for b in topology.brokers.values()
                ],
            )
            self._db.execute(
                "INSERT OR REPLACE INTO topology(epoch, blob) VALUES (?, ?)",
                (topology.epoch, msgpack.packb(body)),
            )
            self._db.execute("DELETE FROM topology WHERE epoch <= ?", (topology.epoch - HISTORY,))
            self._db.executemany("INSERT OR REPLACE INTO barred VALUES (?, ?)", list(bar))
            if meta:
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    [(k, json.dumps(v, sort_keys=True)) for k, v in meta.items()])
            if move_rows:
                self._db.executemany(
                    "INSERT OR REPLACE INTO moves VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    move_rows)
                if any(row[6] in ("aborted", "done") for row in move_rows):
                    self._db.execute(
                        "DELETE FROM moves WHERE state IN ('aborted', 'done') AND move_id NOT IN "
                        "(SELECT move_id FROM moves WHERE state IN ('aborted', 'done') "
                        "ORDER BY updated_ms DESC LIMIT ?)", (MOVE_HISTORY,))

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the body raised."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
