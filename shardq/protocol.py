"""Wire protocol constants and the shape of every op (DESIGN §4).

A request frame is `[req_id, op, args]` and a reply `[req_id, status, body,
epoch]`; `status` is "ok" or an error code from `shardq.errors`. Replies can
come back in any order (pipelining): match them by `req_id`.

Bulk ops answer a list aligned with the request's items; each item is either
a value or `[code, body]` (an error for that item only). Job payloads
(`data`, `result`) are msgpack bytes packed by the client; the broker stores
and returns them without decoding.

Ops and their args (all maps are msgpack maps with str keys):

HELLO      {version: 1, token?: str, client?: str}
           -> {broker_id, epoch, version, max_frame, max_job_data}
           Must be the first frame when the broker has a token.
PING       {} -> "pong"
ADD        {queue, jobs: [[id, name, data, opts|nil], ...]}
           -> [id | [code, body], ...]   (existing id: returns id, changes nothing)
           opts: priority:int>=0, delay_ms:int>=0, attempts:int>=1,
                 backoff:{type: "fixed"|"exponential", delay_ms:int},
                 remove_on_complete: bool|int, remove_on_fail: bool|int,
                 timestamp:int (ms, default now)
PULL       {queues: [str], count: int, wait_ms: int, lock_ms: int}
           -> [job, ...] where job = [queue, id, name, data, token, attempts_made,
                                      attempts_started, timestamp, lock_ms]
           Long-poll: waits up to wait_ms for at least one job (never longer than
           60 s); an empty list when none came.
ACK        {items: [[queue, id, token, result|nil], ...], pull?: {queues, count, lock_ms}}
           -> [nil | [code, body], ...]            when no `pull`
           -> {"acks": [...], "jobs": [job, ...]}  with `pull` (ack-and-fetch, no wait)
FAIL       {items: [[queue, id, token, reason:str], ...]} -> [nil | [code, body], ...]
           The broker decides retry (backoff) or final failure from the job's attempts.
EXTEND     {items: [[queue, id, token, lock_ms], ...]} -> [nil | [code, body], ...]
PROGRESS   {queue, id, token, progress} -> nil
COUNTS     {queue} -> {waiting, delayed, active, completed, failed, paused: bool}
GET_JOB    {queue, id} -> job dict (see `JOB_FIELDS`) | nil
PAUSE      {queue} -> nil
RESUME     {queue} -> nil
DRAIN      {queue, delayed?: bool} -> removed count (waiting, and delayed when asked)
OBLITERATE {queue} -> nil (removes the queue and every job in it)
QUEUES     {} -> {queue: {waiting, delayed, active, completed, failed, paused}}
STATS      {} -> broker-wide figures (jobs, queues, commits, rss, ...)
TOPOLOGY   {} -> the topology map this broker holds (DESIGN §5) | nil
"""

from __future__ import annotations

PROTOCOL_VERSION = 1

OK = "ok"

# op names
HELLO = "HELLO"
PING = "PING"
ADD = "ADD"
PULL = "PULL"
ACK = "ACK"
FAIL = "FAIL"
EXTEND = "EXTEND"
PROGRESS = "PROGRESS"
COUNTS = "COUNTS"
GET_JOB = "GET_JOB"
PAUSE = "PAUSE"
RESUME = "RESUME"
DRAIN = "DRAIN"
OBLITERATE = "OBLITERATE"
QUEUES = "QUEUES"
STATS = "STATS"
TOPOLOGY = "TOPOLOGY"

# index of fields in a delivered job (PULL / ACK-with-pull)
(J_QUEUE, J_ID, J_NAME, J_DATA, J_TOKEN, J_ATTEMPTS_MADE, J_ATTEMPTS_STARTED, J_TIMESTAMP,
 J_LOCK_MS) = range(9)

JOB_FIELDS = (
    "id", "name", "data", "state", "priority", "attempts", "attempts_made",
    "attempts_started", "stalled_count", "progress", "result", "failed_reason",
    "timestamp", "processed_on", "finished_on", "delay_ms",
)

DEFAULT_LOCK_MS = 30_000
MAX_WAIT_MS = 60_000
QUEUE_NAME_MAX = 512
