"""The limits a shardq broker is held against, driven like bench/drivers/shardq_driver.py.

    python bench/drivers/limits_driver.py '{"limit": "echo", "target": "127.0.0.1:PORT", ...}'
    python bench/drivers/limits_driver.py '{"limit": "sqlite-commit", "dir": "/tmp/x", ...}'

  echo           bench/echo_server.py: the same framing and the same ADD frames the
                 Python client sends (uuid7 ids, packed payload), answered at once with
                 no queue and no disk: the wire's limit for add_single, add_concurrent
                 (`concurrency` in flight) and add_bulk (`bulk` jobs, `bulk_inflight` calls)
  sqlite-commit  one SQLite WAL commit with synchronous=FULL of one add's log row
                 (one at a time, on the bench's data disk): the disk's limit for one
                 durable add at a time (add_single only)

Prints one JSON line `{"ops", "seconds", "rate", "p50_ms", "p99_ms"}`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shardq.client.ids import uuid7
from shardq.codec import FrameDecoder, encode_frame


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs.sort()
    return xs[min(len(xs) - 1, int(len(xs) * p))]


class Wire(asyncio.Protocol):
    """Request futures by id over one connection, as the client's connection keeps them."""

    def __init__(self) -> None:
        self.dec = FrameDecoder(64 * 1024 * 1024)
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.transport: Any = None
        self.out: list[bytes] = []  # frames of this loop pass, written in one call

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for fr in self.dec.feed(data):
            fut = self.waiting.pop(fr[0], None)
            if fut is not None and not fut.done():
                fut.set_result(fr[2])

    def call(self, op: str, args: Any) -> asyncio.Future[Any]:
        assert self.transport is not None
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = fut
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(encode_frame([self.next_id, op, args]))
        return fut

    def _flush(self) -> None:
        # As the client's connection does: one write per loop pass, not per frame.
        out, self.out = self.out, []
        self.transport.writelines(out)


async def echo(cfg: dict[str, Any]) -> dict[str, Any]:
    host, port = cfg["target"].rsplit(":", 1)
    loop = asyncio.get_running_loop()
    transport, wire = await loop.create_connection(Wire, host, int(port))
    data = msgpack.packb({"body": "x" * int(cfg["payload"])}, use_bin_type=True)
    w = cfg["workload"]
    per_call = int(cfg["bulk"]) if w == "add_bulk" else 1
    lanes = {"add_single": 1, "add_concurrent": int(cfg["concurrency"]),
             "add_bulk": int(cfg["bulk_inflight"])}[w]
    jobs, ops, lat = int(cfg["jobs"]), 0, []
    t0 = time.perf_counter()
    deadline = t0 + float(cfg["seconds"])

    async def lane() -> None:
        nonlocal ops
        while ops < jobs and time.perf_counter() < deadline:
            k = min(per_call, jobs - ops)
            ops += k
            t = time.perf_counter()
            await wire.call("ADD", {"queue": "limit", "jobs": [
                [uuid7(), "j", data, None] for _ in range(k)]})
            lat.append((time.perf_counter() - t) * 1000)

    try:
        await asyncio.gather(*(lane() for _ in range(lanes)))
    finally:
        transport.close()
    seconds = time.perf_counter() - t0
    return {"ops": ops, "seconds": seconds, "rate": ops / seconds,
            "p50_ms": pct(lat, .5), "p99_ms": pct(lat, .99)}


def sqlite_commit(cfg: dict[str, Any]) -> dict[str, Any]:
    """One-row group commits as broker/store.py writes them (WAL, synchronous=FULL)."""
    path = os.path.join(cfg["dir"], "limit.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE IF NOT EXISTS log(seq INTEGER PRIMARY KEY, ops BLOB NOT NULL)")
    data = msgpack.packb({"body": "x" * int(cfg["payload"])}, use_bin_type=True)
    jobs, ops, lat = int(cfg["jobs"]), 0, []
    t0 = time.perf_counter()
    deadline = t0 + float(cfg["seconds"])
    try:
        while ops < jobs and time.perf_counter() < deadline:
            ops += 1
            blob = msgpack.packb([("A", "limit", [uuid7(), "j", data, "waiting", ops])],
                                 use_bin_type=True)
            t = time.perf_counter()
            db.execute("BEGIN")
            db.execute("INSERT INTO log(seq, ops) VALUES (?, ?)", (ops, blob))
            db.execute("COMMIT")
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        db.close()
    seconds = time.perf_counter() - t0
    return {"ops": ops, "seconds": seconds, "rate": ops / seconds,
            "p50_ms": pct(lat, .5), "p99_ms": pct(lat, .99)}


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    if config["limit"] == "sqlite-commit":
        print(json.dumps(sqlite_commit(config)), flush=True)
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            print(json.dumps(runner.run(echo(config))), flush=True)
