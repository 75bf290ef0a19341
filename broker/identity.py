"""A data directory's storage identity (docs/design.md §3.2): a random id
made with the SQLite file, and the broker id that first claimed it.

`StorageIdentity` is a part of `Store` (broker/store.py): it reads and writes
the `identity` row of the store's `state` table.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from typing import Any

import msgpack


class ForeignStorageError(Exception):
    """The data directory belongs to another broker (two data dirs swapped?)."""


class StorageIdentity:
    """Store's identity methods; Store sets these attributes."""

    path: str
    storage_id: str
    _db: sqlite3.Connection | None
    _identity: dict[str, Any]

    def _new_identity(self) -> dict[str, Any]:
        """Make and persist this file's storage identity (docs/design.md §3).

        It lives in the same file as the jobs, so it is lost exactly when
        they are: a broker that comes back without it lost its data."""
        identity: dict[str, Any] = {"storage": uuid.uuid4().hex, "broker": None,
                                    "created_ms": int(time.time() * 1000)}
        self._put_identity(identity)
        return identity

    def _put_identity(self, identity: dict[str, Any]) -> None:
        assert self._db is not None
        self._db.execute("INSERT OR REPLACE INTO state(key, value) VALUES ('identity', ?)",
                         (msgpack.packb(identity, use_bin_type=True),))

    def claim_identity(self, broker_id: str) -> str:
        """Bind this data directory to `broker_id` on first use; return its storage id.

        Raises:
            ForeignStorageError: another broker id claimed it before.
        """
        owner = self._identity.get("broker")
        if owner is None:
            self._identity = {**self._identity, "broker": broker_id}
            self._put_identity(self._identity)
        elif owner != broker_id:
            raise ForeignStorageError(
                f"data directory {os.path.dirname(self.path) or '.'} belongs to broker "
                f"{owner!r} (storage {self.storage_id}), not {broker_id!r}: were two data "
                f"directories swapped? Start {owner} on it, and {broker_id} on its own")
        return self.storage_id
