"""The coordinator's durable state: one SQLite file under its data dir (DESIGN §6).

Tables:

    meta(key, value)                 `term`, incremented at every start
    brokers(id, addr, state, weight, revive_state, last_heartbeat_ms)
                                     membership; `revive_state` is the state a
                                     `dead` broker returns to when it heartbeats
    topology(epoch, blob)            ownership, one msgpack row per epoch change:
                                     {slots (runs), overrides, partitions, moving};
                                     the last `HISTORY` epochs are kept
    barred(id, at_ms)                forgotten broker ids, refused at register

Every `save` is one transaction committed with `synchronous=FULL` before it
returns, so whatever the coordinator answers after a save survives a
`kill -9` or a power loss. Writes are rare (membership and ownership
changes, never heartbeats alone), so they run on the caller's thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from shardq.router import BrokerState, Topology

DB_NAME = "coordinator.db"
HISTORY = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS brokers(
    id TEXT PRIMARY KEY, addr TEXT NOT NULL, state TEXT NOT NULL, weight INTEGER NOT NULL,
    revive_state TEXT NOT NULL, last_heartbeat_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS topology(epoch INTEGER PRIMARY KEY, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS barred(id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL) WITHOUT ROWID;
"""


@dataclass(slots=True)
class BrokerRecord:
    """What the coordinator keeps about a broker beyond its topology entry."""

    revive_state: BrokerState
    last_heartbeat_ms: int  # wall clock, for display; liveness uses a monotonic clock


@dataclass(slots=True)
class Snapshot:
    """Everything `Store.load` reads back."""

    term: int
    topology: Topology
    records: dict[str, BrokerRecord]
    barred: dict[str, int]


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

    def load(self) -> Snapshot:
        """Read the last saved state (an empty topology on a fresh file)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'term'").fetchone()
        term = int(row[0]) if row else 0
        brokers: dict[str, Any] = {}
        records: dict[str, BrokerRecord] = {}
        for bid, addr, state, weight, revive, hb in self._db.execute(
            "SELECT id, addr, state, weight, revive_state, last_heartbeat_ms FROM brokers"
        ):
            brokers[bid] = {"addr": addr, "state": state, "weight": weight}
            records[bid] = BrokerRecord(BrokerState(revive), int(hb))
        top = self._db.execute(
            "SELECT blob FROM topology ORDER BY epoch DESC LIMIT 1"
        ).fetchone()
        body: dict[str, Any] = msgpack.unpackb(top[0]) if top else {"epoch": 0, "slots": []}
        topology = Topology.from_dict({**body, "term": term, "brokers": brokers})
        barred = dict(self._db.execute("SELECT id, at_ms FROM barred").fetchall())
        return Snapshot(term, topology, records, barred)

    def save(
        self,
        topology: Topology,
        records: Mapping[str, BrokerRecord],
        bar: Iterable[tuple[str, int]] = (),
    ) -> None:
        """Persist membership and ownership in one durable transaction.

        Args:
            topology: the whole current topology; its brokers must all be in `records`.
            records: per-broker extras, keyed like `topology.brokers`.
            bar: (broker id, wall ms) pairs to add to the barred list.
        """
        d = topology.to_dict()
        body = {k: d[k] for k in ("epoch", "slots", "overrides", "partitions", "moving")}
        with self._tx():
            self._db.execute("DELETE FROM brokers")
            self._db.executemany(
                "INSERT INTO brokers VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (b.id, b.addr, b.state.value, b.weight,
                     records[b.id].revive_state.value, records[b.id].last_heartbeat_ms)
                    for b in topology.brokers.values()
                ],
            )
            self._db.execute(
                "INSERT OR REPLACE INTO topology(epoch, blob) VALUES (?, ?)",
                (topology.epoch, msgpack.packb(body)),
            )
            self._db.execute("DELETE FROM topology WHERE epoch <= ?", (topology.epoch - HISTORY,))
            self._db.executemany("INSERT OR REPLACE INTO barred VALUES (?, ?)", list(bar))

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
