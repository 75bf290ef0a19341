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
                 timestamp:int (ms, default now),
                 group:str (1-256 chars; groups are served round-robin, DESIGN §11)
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
SCHED_UPSERT {queue, id, every_ms | cron, tz?, name?, data?: bytes, opts?}
           -> {id, every_ms, cron, tz, name, data, opts, next_tick_ms}
           Each tick makes job `f"{id}:{tick_ms}"` (DESIGN §6, §10).
SCHED_REMOVE {queue, id} -> bool
SCHED_LIST   {queue} -> [scheduler, ...]
RATE_LIMIT {queue, max: int|nil, per_ms: int} -> limits (see LIMITS)
           At most `max` jobs start (are handed out by PULL) in any sliding
           `per_ms` window; nil clears. A PULL the limit holds back parks (when
           it has wait_ms) and is answered as soon as the window frees budget.
GROUP_SET  {queue, group, concurrency?: int>=1|nil, paused?: bool, rate?: [max, per_ms]|nil}
           -> the group's settings with {active, waiting} | nil (none left)
           Only the keys given change; nil (or paused false) clears one.
LIMITS     {queue} -> {rate: [max, per_ms]|nil, tenant: str|nil,
                       groups: {group: {concurrency?, paused?, rate?, active, waiting}}}

Handoff of a set of slots from source A to target B (DESIGN §6). The
coordinator sends these with its `term`; a broker answers STALE_TERM to a
term lower than the highest it has seen. Every step is idempotent for the
same move_id (a retried step answers as the first did).

HANDOFF_PREPARE  (to B) {move_id, slots, source, source_addr, term} -> {"state": "importing"}
                 B durably records importing(move_id, slots) and wipes stale staging.
HANDOFF_COPY     (to A) {move_id, slots, target, target_addr, term}
                 -> {"queues": n, "jobs": n}
                 A starts recording every op on those slots, streams a snapshot of
                 their queues to B (IMPORT_CHUNKS on A's own connection to B) while
                 it keeps serving, and answers once B stored them durably.
HANDOFF_FREEZE   (to A) {move_id, slots, term} -> {"frozen": true}
                 A durably records the freeze before answering; from then on every
                 request for those slots answers TRYAGAIN. Survives restart.
HANDOFF_CATCHUP  (to A) {move_id, term, target_addr?} -> {"ops": n}
                 A sends B the ops recorded since the snapshot (IMPORT_OPS) and
                 answers once B committed them: B is ready.
  -- commit point: the coordinator persists epoch e+1 with owner B --
HANDOFF_ACTIVATE (to B) {move_id, epoch, term} -> {"active": true}
                 B moves staging to live in one small transaction and serves.
HANDOFF_RELEASE  (to A) {move_id, epoch, owner, addr, term} -> {"released": true}
                 A gives the slots up (answers MOVED naming B) and deletes their data.
HANDOFF_ABORT    (to A and B) {move_id, term} -> {"aborted": true}
                 Before the commit point only: A unfreezes, B drops staging and
                 records move_id as aborted so it can never be activated.
HANDOFF_STATUS   (to B; asked by a frozen A cut off from the coordinator)
                 {move_id} -> "committed" | "aborted" | "pending"
                 A move B has no record of is recorded as aborted.
IMPORT_CHUNKS    (A to B) {move_id, chunks: [export chunk, ...]} -> nil
IMPORT_OPS       (A to B) {move_id, ops: [redo op, ...]} -> nil
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
SCHED_UPSERT = "SCHED_UPSERT"
SCHED_REMOVE = "SCHED_REMOVE"
SCHED_LIST = "SCHED_LIST"
RATE_LIMIT = "RATE_LIMIT"
GROUP_SET = "GROUP_SET"
LIMITS = "LIMITS"
HANDOFF_PREPARE = "HANDOFF_PREPARE"
HANDOFF_COPY = "HANDOFF_COPY"
HANDOFF_FREEZE = "HANDOFF_FREEZE"
HANDOFF_CATCHUP = "HANDOFF_CATCHUP"
HANDOFF_ACTIVATE = "HANDOFF_ACTIVATE"
HANDOFF_RELEASE = "HANDOFF_RELEASE"
HANDOFF_ABORT = "HANDOFF_ABORT"
HANDOFF_STATUS = "HANDOFF_STATUS"
IMPORT_CHUNKS = "IMPORT_CHUNKS"
IMPORT_OPS = "IMPORT_OPS"

# Handoff phases as the topology's `moving` entries name them (DESIGN §5).
PHASES = ("prepare", "copy", "freeze", "catch-up", "commit", "activate", "cleanup")

# index of fields in a delivered job (PULL / ACK-with-pull)
(J_QUEUE, J_ID, J_NAME, J_DATA, J_TOKEN, J_ATTEMPTS_MADE, J_ATTEMPTS_STARTED, J_TIMESTAMP,
 J_LOCK_MS) = range(9)

JOB_FIELDS = (
    "id", "name", "data", "state", "priority", "attempts", "attempts_made",
    "attempts_started", "stalled_count", "progress", "result", "failed_reason",
    "timestamp", "processed_on", "finished_on", "delay_ms", "group",
)

DEFAULT_LOCK_MS = 30_000
MAX_WAIT_MS = 60_000
QUEUE_NAME_MAX = 512
