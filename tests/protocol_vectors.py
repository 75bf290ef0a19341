"""The golden vectors of docs/protocol.md, and the script that writes them.

docs/protocol-vectors.json is generated from the definitions below with the
real Python encoder (`shardq.codec.encode_frame`) and hash
(`shardq.router.slots`); `python -m tests.protocol_vectors --write`
rewrites it. tests/unit/test_protocol_vectors.py checks the file against
the code, tests/integration/test_protocol_vectors_broker.py replays its
session against a real broker, and clients/node/test/vectors.test.mjs
checks the Node client's encoder, decoder and hash against the same file.

JSON cannot hold msgpack bin or 64-bit integers, so values are written with
two tags: `{"$bin": "<hex>"}` is a bin (bytes) value and `{"$int": "<decimal>"}`
an integer outside +-2**53. Everything else is plain JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgpack

from shardq.codec import encode_frame
from shardq.router import Ring, hash64, partition_for, slot_of

PATH = Path(__file__).resolve().parent.parent / "docs" / "protocol-vectors.json"
FAR_DEADLINE = 4_102_444_800_000  # 2100-01-01, ms: a flow deadline that never passes
STALE_TOKEN = 3_141_592_653_589_793_238  # a 62-bit token no delivery has (LOCK_LOST)
Q = "vec-emails"


def b(value: Any) -> bytes:
    """A job payload: the client packs `data` once, the broker keeps the bytes."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def to_json(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"$bin": v.hex()}
    if isinstance(v, bool) or v is None or isinstance(v, str | float):
        return v
    if isinstance(v, int):
        return v if -(2**53) < v < 2**53 else {"$int": str(v)}
    if isinstance(v, list | tuple):
        return [to_json(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_json(x) for k, x in v.items()}
    raise TypeError(f"no JSON form for {v!r}")


def from_json(v: Any) -> Any:
    if isinstance(v, list):
        return [from_json(x) for x in v]
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        if set(v) == {"$int"}:
            return int(v["$int"])
        return {k: from_json(x) for k, x in v.items()}
    return v


# A scripted session against a fresh standalone broker (no token), in order.
# `expect`: status always; `body` compared exactly; `keys` must all be in the
# body map; `items` per bulk item: a value, or {"code": C} for an error item.
SESSION: list[dict[str, Any]] = [
    {
        "op": "HELLO",
        "args": {"version": 1, "client": "vectors"},
        "expect": {
            "status": "ok",
            "keys": ["broker_id", "epoch", "version", "max_frame", "max_job_data"],
        },
    },
    {"op": "PING", "args": {}, "expect": {"status": "ok", "body": "pong"}},
    {
        "op": "ADD",
        "args": {
            "queue": Q,
            "jobs": [
                ["job-1", "send", b({"to": "a@b"}), None],
                [
                    "job-2",
                    "send",
                    b({"to": "c@d", "n": 2**40}),
                    {
                        "priority": 2,
                        "attempts": 3,
                        "backoff": {"type": "exponential", "delay_ms": 100},
                        "remove_on_complete": True,
                        "timestamp": 1_767_225_600_000,
                    },
                ],
                ["", "bad", b(None), None],
            ],
        },
        "expect": {"status": "ok", "items": ["job-1", "job-2", {"code": "BAD_REQUEST"}]},
    },
    {
        "op": "ADD",
        "args": {"queue": Q, "jobs": [["job-1", "send", b({"other": 1}), None]]},
        "expect": {"status": "ok", "body": ["job-1"]},
    },
    {
        "op": "COUNTS",
        "args": {"queue": Q},
        "expect": {
            "status": "ok",
            "body": {
                "waiting": 2,
                "delayed": 0,
                "active": 0,
                "completed": 0,
                "failed": 0,
                "paused": False,
            },
        },
    },
    {
        "op": "GET_JOB",
        "args": {"queue": Q, "id": "job-2"},
        "expect": {
            "status": "ok",
            "keys": ["id", "name", "data", "state", "priority", "attempts_made"],
        },
    },
    {"op": "GET_JOB", "args": {"queue": Q, "id": "nope"}, "expect": {"status": "ok", "body": None}},
    {
        "op": "PULL",
        "args": {"queues": [Q], "count": 1, "wait_ms": 0, "lock_ms": 30_000},
        "expect": {"status": "ok"},
    },
    {
        "op": "ACK",
        "args": {"items": [[Q, "job-1", STALE_TOKEN, b({"sent": True})]]},
        "expect": {"status": "ok", "items": [{"code": "LOCK_LOST"}]},
    },
    {
        "op": "ACK",
        "args": {
            "items": [[Q, "job-1", STALE_TOKEN, None]],
            "pull": {"queues": [Q], "count": 0, "lock_ms": 30_000},
        },
        "expect": {"status": "ok", "keys": ["acks", "jobs"]},
    },
    {
        "op": "FAIL",
        "args": {"items": [[Q, "job-1", STALE_TOKEN, "boom"]]},
        "expect": {"status": "ok", "items": [{"code": "LOCK_LOST"}]},
    },
    {
        "op": "EXTEND",
        "args": {"items": [[Q, "job-1", STALE_TOKEN, 30_000]]},
        "expect": {"status": "ok", "items": [{"code": "LOCK_LOST"}]},
    },
    {
        "op": "PROGRESS",
        "args": {"queue": Q, "id": "job-1", "token": STALE_TOKEN, "progress": 50},
        "expect": {"status": "LOCK_LOST"},
    },
    {
        "op": "LOG",
        "args": {"queue": Q, "id": "job-1", "token": STALE_TOKEN, "line": "hi"},
        "expect": {"status": "LOCK_LOST"},
    },
    {"op": "GET_LOGS", "args": {"queue": Q, "id": "job-1"}, "expect": {"status": "ok", "body": []}},
    {"op": "PAUSE", "args": {"queue": Q}, "expect": {"status": "ok", "body": None}},
    {"op": "RESUME", "args": {"queue": Q}, "expect": {"status": "ok", "body": None}},
    {"op": "DRAIN", "args": {"queue": Q, "delayed": False}, "expect": {"status": "ok", "body": 1}},
    {
        "op": "SCHED_UPSERT",
        "args": {
            "queue": Q,
            "id": "daily",
            "every_ms": 60_000,
            "tz": "UTC",
            "name": "digest",
            "data": b({"k": 1}),
            "opts": None,
        },
        "expect": {
            "status": "ok",
            "keys": ["id", "every_ms", "cron", "tz", "name", "data", "opts", "next_tick_ms"],
        },
    },
    {"op": "SCHED_LIST", "args": {"queue": Q}, "expect": {"status": "ok"}},
    {
        "op": "SCHED_REMOVE",
        "args": {"queue": Q, "id": "daily"},
        "expect": {"status": "ok", "body": True},
    },
    {
        "op": "RATE_LIMIT",
        "args": {"queue": Q, "max": 100, "per_ms": 1000},
        "expect": {"status": "ok", "keys": ["rate", "groups"]},
    },
    {
        "op": "GROUP_SET",
        "args": {"queue": Q, "group": "tenant-7", "concurrency": 2},
        "expect": {"status": "ok"},
    },
    {
        "op": "LIMITS",
        "args": {"queue": Q},
        "expect": {"status": "ok", "keys": ["rate", "tenant", "groups"]},
    },
    {
        "op": "DLQ_LIST",
        "args": {"queue": Q, "offset": 0, "limit": 1000},
        "expect": {"status": "ok", "body": []},
    },
    {"op": "DLQ_RETRY", "args": {"queue": Q, "ids": None}, "expect": {"status": "ok", "body": 0}},
    {"op": "DLQ_PURGE", "args": {"queue": Q}, "expect": {"status": "ok", "body": 0}},
    {
        "op": "FLOW_ADD_CHILDREN",
        "args": {
            "queue": "vec-pages",
            "flow": "flow-1",
            "deadline": FAR_DEADLINE,
            "parent": ["vec-report", "parent-1"],
            "jobs": [["child-1", "render", b({"p": 1}), None, False]],
        },
        "expect": {"status": "ok", "body": ["child-1"]},
    },
    {
        "op": "FLOW_ADD_PARENT",
        "args": {
            "queue": "vec-report",
            "flow": "flow-1",
            "deadline": FAR_DEADLINE,
            "children": 1,
            "job": ["parent-1", "merge", b({}), None],
        },
        "expect": {"status": "ok", "body": "parent-1"},
    },
    {
        "op": "FLOW_COMMIT",
        "args": {"queue": "vec-pages", "flow": "flow-1"},
        "expect": {"status": "ok", "body": 1},
    },
    {
        "op": "FLOW_CHILDREN",
        "args": {"queue": "vec-report", "id": "parent-1"},
        "expect": {"status": "ok", "body": {}},
    },
    {"op": "OBLITERATE", "args": {"queue": Q}, "expect": {"status": "ok", "body": None}},
    {"op": "QUEUES", "args": {}, "expect": {"status": "ok"}},
    {"op": "STATS", "args": {}, "expect": {"status": "ok"}},
    {
        "op": "TOPOLOGY",
        "args": {},
        "expect": {"status": "ok", "keys": ["term", "epoch", "brokers", "slots"]},
    },
    {"op": "NO_SUCH_OP", "args": {}, "expect": {"status": "BAD_REQUEST"}},
    {"op": "ADD", "args": {"queue": Q}, "expect": {"status": "BAD_REQUEST"}},
    {
        "op": "SUBSCRIBE",
        "args": {"queue": Q, "after_seq": None},
        "expect": {"status": "ok", "keys": ["seq", "events", "gap"]},
    },
]

# Replies as a broker sends them: decoders must read these bytes as these values.
REPLIES: list[dict[str, Any]] = [
    {
        "what": "HELLO answered",
        "frame": [
            1,
            "ok",
            {
                "broker_id": "b1",
                "epoch": 7,
                "version": 1,
                "max_frame": 16_777_216,
                "max_job_data": 1_048_576,
            },
            7,
        ],
    },
    {
        "what": "bulk ADD with one refused item",
        "frame": [
            3,
            "ok",
            [
                "job-1",
                "job-2",
                ["BAD_REQUEST", "job id must be a non-empty string of at most 256 chars"],
            ],
            7,
        ],
    },
    {
        "what": "PULL delivering one job (62-bit token)",
        "frame": [
            8,
            "ok",
            [[Q, "job-1", "send", b({"to": "a@b"}), STALE_TOKEN, 0, 1, 1_767_225_600_000, 30_000]],
            7,
        ],
    },
    {
        "what": "ACK with pull",
        "frame": [
            9,
            "ok",
            {"acks": [None, ["LOCK_LOST", "lock token is stale or the lock expired"]], "jobs": []},
            7,
        ],
    },
    {
        "what": "MOVED",
        "frame": [
            4,
            "MOVED",
            {"slot": 1234, "owner": "b2", "addr": "10.0.0.2:7102", "epoch": 9},
            9,
        ],
    },
    {
        "what": "MOVED for an overridden queue",
        "frame": [
            4,
            "MOVED",
            {"slot": 1234, "owner": "b3", "addr": "10.0.0.3:7103", "epoch": 11, "queue": "hot"},
            11,
        ],
    },
    {
        "what": "TRYAGAIN",
        "frame": [
            5,
            "TRYAGAIN",
            {"retry_after_ms": 10, "message": "slot is frozen for a handoff"},
            9,
        ],
    },
    {
        "what": "BUSY",
        "frame": [6, "BUSY", {"retry_after_ms": 50, "message": "broker is over its limits"}, 9],
    },
    {"what": "AUTH", "frame": [1, "AUTH", "wrong or missing token", 0]},
    {
        "what": "event push",
        "frame": [
            12,
            "push",
            {
                "queue": Q,
                "events": [
                    [5, "added", "job-3", {"name": "send"}],
                    [6, "completed", "job-3", b({"ok": True})],
                ],
            },
            7,
        ],
    },
]

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
SLOT_NAMES = [_ALPHABET[:n] for n in range(34)] + [
    "emails",
    "vec-emails",
    "hot-tenant",
    "q~0",
    "q~3",
    "contact",
    "enrich",
    "ai",
    "send",
    "save",
    "webhook",
    "report",
    "pages",
    "ümlaut-queue",
    "队列",
    "🚀rocket",
    "a-rather-long-queue-name-for-tails",
]
PARTITION_KEYS = [("tenant-7", 4), ("job-1", 8), ("0190f1c2-7a3b-7cde-8f01-23456789abcd", 16)]
RING = {"b1": 1, "b2": 1, "b3": 2}
RING_SLOTS = [0, 1, 2, 100, 1000, 2048, 4095]


def build() -> dict[str, Any]:
    requests = []
    for rid, step in enumerate(SESSION, start=1):
        frame = [rid, step["op"], step["args"]]
        requests.append(
            {
                "req_id": rid,
                "op": step["op"],
                "args": to_json(step["args"]),
                "hex": encode_frame(frame).hex(),
                "expect": to_json(step["expect"]),
            }
        )
    replies = [
        {"what": r["what"], "value": to_json(r["frame"]), "hex": encode_frame(r["frame"]).hex()}
        for r in REPLIES
    ]
    ring = Ring(RING)
    return {
        "comment": "Golden vectors of docs/protocol.md; "
        "written by `python -m tests.protocol_vectors --write`.",
        "encoding": {"$bin": "msgpack bin, hex", "$int": "integer outside +-2**53, decimal"},
        "requests": requests,
        "replies": replies,
        "hashes": [
            {"name": n, "hash64": to_json(hash64(n)), "slot": slot_of(n)} for n in SLOT_NAMES
        ],
        "partitions": [
            {"key": k, "p": p, "partition": partition_for(k, p)} for k, p in PARTITION_KEYS
        ],
        "ring": {
            "brokers": RING,
            "vnodes": ring.vnodes,
            "targets": [{"slot": s, "broker": ring.target(s)} for s in RING_SLOTS],
        },
    }


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"rewrite {PATH.name}")
    args = ap.parse_args(argv)
    text = render()
    if args.write:
        PATH.write_text(text, encoding="utf-8")
        return 0
    if not PATH.exists() or PATH.read_text(encoding="utf-8") != text:
        print(
            f"{PATH} is out of date: run python -m tests.protocol_vectors --write", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
