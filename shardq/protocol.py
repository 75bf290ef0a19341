"""Wire protocol constants and the shape of every op (docs/design.md §4).

A request frame is `[req_id, op, args]` and a reply `[req_id, status, body,
epoch]`; `status` is "ok" or an error code from `shardq.errors`. Replies can
come back in any order (pipelining): match them by `req_id`.

Bulk ops answer a list aligned with the request's items; each item is either
a value or `[code, body]` (an error for that item only). Job payloads
(`data`, `result`) are msgpack bytes packed by the client; the broker stores
and returns them without decoding.

Ops and their args (all maps are msgpack maps with str keys):

HELLO      {version: 1, token?: str, client?: str}
           -> {broker_id, epoch, version, max_frame, max_job_data, role}
           Must be the first frame when the broker has a token; it must come
           within --handshake-timeout, and until it succeeds frames are at most
           4 KB. `role` is "control" (the control token: every op) or "client"
           (the client token: every op but CONTROL_OPS).
PING       {} -> "pong"
ADD        {queue, jobs: [[id, name, data, opts|nil], ...]}
           -> [id | [code, body], ...]   (existing id: returns id, changes nothing)
           opts: priority:int>=0, delay_ms:int>=0, attempts:int>=1,
                 backoff:{type: "fixed"|"exponential", delay_ms:int},
                 remove_on_complete: bool|int, remove_on_fail: bool|int,
                 timestamp:int (ms, default now),
                 timeout_ms:int>=1 (the worker cancels an attempt running longer and
                   fails it "timed out"), ttl_ms:int>=1 (from the add, paused time
                   included: a job not started by then goes to the DLQ, never out)
                 group:str (1-256 chars; groups are served round-robin, docs/design.md §11)
                 trace:{str: str} (a trace context carrier, <= 1024 chars: stored
                   and delivered to the worker; client/tracing.py)
PULL       {queues: [str], count: int, wait_ms: int, lock_ms: int}
           -> [job, ...] where job = [queue, id, name, data, token, attempts_made,
                                      attempts_started, timestamp, lock_ms, timeout_ms?,
                                      trace?]
           (timeout_ms only for jobs added with one or with a trace (then 0 if
           none); trace only for jobs added with one)
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
TOPOLOGY   {} -> the topology map this broker holds (docs/design.md §5) | nil
SCHED_UPSERT {queue, id, every_ms | cron, tz?, name?, data?: bytes, opts?}
           -> {id, every_ms, cron, tz, name, data, opts, next_tick_ms}
           Each tick makes job `f"{id}:{tick_ms}"` (docs/design.md §6, §10).
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

Job logs, dead letters and events (docs/design.md §11, docs/features-jobs.md):

LOG        {queue, id, token, line: str} -> nil        (the active delivery's token)
           Keeps the last 1000 lines of a job, each cut to 2000 characters.
GET_LOGS   {queue, id} -> [str, ...] oldest first ([] for an unknown job)
DLQ_LIST   {queue, offset?: int, limit?: int (<= 1000, default 1000)}
           -> [job dict + dlq_reason, ...] oldest failure first
DLQ_RETRY  {queue, ids?: [str] | nil} -> n   DLQ jobs (all when ids is nil) back to
           waiting with attempts_made = 0 (ids not in the DLQ are skipped)
DLQ_PURGE  {queue} -> n                      removes every job in the DLQ
SUBSCRIBE  {queue, after_seq?: int} -> {seq, events: [event, ...], gap: bool}
           Answered once the queue's ops so far are committed; from then on the
           broker PUSHES frames on this connection, with the SUBSCRIBE's req_id:
               [req_id, "push", {"queue", "events": [event, ...]}, epoch]
               [req_id, "push", {"queue", "moved": MOVED body}, epoch]  (then it ends)
           event = [seq, type, job_id, data], seq the queue's op seq (ascending;
           types added/active/progress/completed/failed/stalled, see
           broker/events.py). `after_seq`: resume after that seq (events still in
           the owner's ring are sent in the reply); `gap` is true when some may
           be missing (ring overflow, broker restart). A subscription ends with
           its connection.

Handoff of a set of slots from source A to target B (docs/design.md §6). The
coordinator sends these with its `term`; a broker answers STALE_TERM to a
term lower than the highest it has seen. Every step is idempotent for the
same move_id (a retried step answers as the first did).

HANDOFF_PREPARE  (to B) {move_id, slots, source, source_addr, term} -> {"state": "importing"}
                 B durably records importing(move_id, slots) and wipes stale staging.
HANDOFF_COPY     (to A) {move_id, slots, target, target_addr, term, max_jobs_per_s?}
                 -> {"queues": n, "jobs": n, "ops": n}
                 A starts recording every op on those slots, streams a snapshot of
                 their queues to B (IMPORT_CHUNKS on A's own connection to B) while
                 it keeps serving, at most max_jobs_per_s jobs/s when given, then
                 sends the ops recorded meanwhile (IMPORT_OPS, up to 3 rounds), and
                 answers once B stored them durably. B indexes the jobs as they
                 arrive, so activation does not depend on the queues' size.
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

Replication (docs/design.md §12; broker/replica.py, broker/follower.py).
REPL_APPEND  (primary P to its follower F) {primary, repl_epoch, seq?, ops?, chunks?,
             reset?, synced?} -> {seq}
             answered once F fsynced it; `ops`: P's batch `seq` (its redo ops in
             commit order); `chunks`: snapshot export chunks; `reset`: F's copy of P
             starts over; `synced`: the snapshot is complete. STALE_TERM when
             `repl_epoch` is older than the newest F has seen (fenced).
REPL_FENCE   (coordinator to F) {primary, repl_epoch, term} -> {repl_epoch, seq, synced, jobs}
             F durably refuses every stream of P older than repl_epoch from now on.
REPL_PROMOTE (coordinator to F, after the commit point) {primary, slots, epoch, term}
             -> {active, queues}   F serves its copy of P's slots at `epoch`.

Flows (docs/design.md §11; broker/flowqueue.py, broker/flows.py). A flow is a parent
and its children under one flow id; `deadline` is the creation deadline (ms
since the epoch): past it, adds are refused and unfinished flows are removed.

FLOW_ADD_CHILDREN {queue, flow, deadline, parent: [queue, id],
                   jobs: [[id, name, data, opts|nil, ignore_failure: bool], ...]}
                  -> [id | [code, body], ...]
                  Adds the children `pending`: stored, never handed out until committed.
FLOW_ADD_PARENT   {queue, flow, deadline, children: n>=1, job: [id, name, data, opts|nil]}
                  -> id   The commit point: the parent, `waiting-children`.
FLOW_COMMIT       {queue, flow} -> n   The flow's pending children here become waiting.
FLOW_RESOLVE      (broker to the parent's owner) {queue, id, flow, deadline}
                  -> "committed" | "aborted" | "pending"
FLOW_CHILD_DONE   (broker to the parent's owner; an outbox delivery)
                  {items: [[queue, id, flow, child key, ok: bool, result|reason,
                            ignore_failure: bool], ...]}
                  -> ["recorded" | "duplicate" | "gone" | [code, body], ...]
FLOW_CHILDREN     {queue, id} -> {child key: result|nil}   (NOT_FOUND: no such job)

Job management (docs/features-jobs.md "Job management"; broker/jobadmin.py).
States: waiting (priority 0), prioritized (waiting, priority > 0), delayed,
active, completed, failed, waiting-children. Writes answer once durable;
queue-wide ones touch at most 10,000 jobs per request (ask again for more).

GET_JOBS     {queue, states: [state], start?: 0, end?: -1, asc?: false}
             -> {jobs: [job dict], keys: [[rank, time, id]], total: n}
             Jobs start..end (inclusive, end -1: the last; at most 1000 per
             reply) ordered by the state's rank in `states`, then its time (due
             for delayed, started for active, finished for completed/failed,
             added otherwise), then id; asc false: times and ids descending.
             `keys` lets a client merge partitions; `total`: jobs in the states.
JOB_COUNTS   {queue, states?: [state]} -> {state: n, ..., completed_total: n,
             failed_total: n}  (totals: ever completed / failed for good)
JOB_ACTIONS  {items: [[queue, id, action, arg|nil], ...]} -> [nil | [code, body], ...]
             action: "retry" (completed/failed -> waiting, attempts reset),
             "remove" (not active), "promote" (delayed -> waiting),
             "update_data" (arg: msgpack bytes), "priority" (arg: int >= 0),
             "delay" (arg: ms >= 0, for waiting/delayed), "discard" (no more
             retries). A wrong state answers JOB_STATE, an unknown id NOT_FOUND.
RETRY_JOBS   {queue, state?: "failed"|"completed", count?: n} -> n retried
PROMOTE_JOBS {queue, count?: n} -> n promoted (soonest due first)
CLEAN        {queue, grace_ms: n, limit?: n, state: str} -> n removed
             (state: completed, failed, waiting, prioritized or delayed; jobs
             finished - or added - at least grace_ms ago, oldest first)
SET_RETENTION {queue, keep_completed: n|nil, keep_failed: n|nil}
             -> {keep_completed: n, keep_failed: n, removed: n}
             The queue's retained history (nil: unchanged, -1: the broker
             default); history over a lower bound is removed at once.
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
REPL_APPEND = "REPL_APPEND"
REPL_FENCE = "REPL_FENCE"
REPL_PROMOTE = "REPL_PROMOTE"
LOG = "LOG"
GET_LOGS = "GET_LOGS"
DLQ_LIST = "DLQ_LIST"
DLQ_RETRY = "DLQ_RETRY"
DLQ_PURGE = "DLQ_PURGE"
SUBSCRIBE = "SUBSCRIBE"
PUSH = "push"  # the status of a server-pushed frame (SUBSCRIBE)
FLOW_ADD_CHILDREN = "FLOW_ADD_CHILDREN"
FLOW_ADD_PARENT = "FLOW_ADD_PARENT"
FLOW_COMMIT = "FLOW_COMMIT"
FLOW_RESOLVE = "FLOW_RESOLVE"
FLOW_CHILD_DONE = "FLOW_CHILD_DONE"
FLOW_CHILDREN = "FLOW_CHILDREN"
GET_JOBS = "GET_JOBS"
JOB_COUNTS = "JOB_COUNTS"
JOB_ACTIONS = "JOB_ACTIONS"
RETRY_JOBS = "RETRY_JOBS"
PROMOTE_JOBS = "PROMOTE_JOBS"
CLEAN = "CLEAN"
SET_RETENTION = "SET_RETENTION"

# Ops only a control connection may send (HELLO with the control token):
# handoff steps carry the coordinator's term, and the rest move data between
# brokers. A client token can never send them (README "Security").
CONTROL_OPS = frozenset({
    HANDOFF_PREPARE, HANDOFF_COPY, HANDOFF_FREEZE, HANDOFF_CATCHUP, HANDOFF_ACTIVATE,
    HANDOFF_RELEASE, HANDOFF_ABORT, HANDOFF_STATUS, IMPORT_CHUNKS, IMPORT_OPS,
    FLOW_RESOLVE, FLOW_CHILD_DONE, REPL_APPEND, REPL_FENCE, REPL_PROMOTE,
})
# The control ops only the coordinator sends: they carry its term or change
# who owns what (handoff steps, failover's fence and promote). A broker
# answers them AUTH from another control connection (a broker's) when it
# can tell the coordinator apart: a coordinator token, or with mutual TLS
# the coordinator's certificate (README "Security and limits").
COORDINATOR_OPS = frozenset({
    HANDOFF_PREPARE, HANDOFF_COPY, HANDOFF_FREEZE, HANDOFF_CATCHUP, HANDOFF_ACTIVATE,
    HANDOFF_RELEASE, HANDOFF_ABORT, REPL_FENCE, REPL_PROMOTE,
})

# Handoff phases as the topology's `moving` entries name them (docs/design.md §5).
PHASES = ("prepare", "copy", "freeze", "catch-up", "commit", "activate", "cleanup")

# index of fields in a delivered job (PULL / ACK-with-pull)
(J_QUEUE, J_ID, J_NAME, J_DATA, J_TOKEN, J_ATTEMPTS_MADE, J_ATTEMPTS_STARTED, J_TIMESTAMP,
 J_LOCK_MS, J_TIMEOUT_MS, J_TRACE) = range(11)

JOB_FIELDS = (
    "id", "name", "data", "state", "priority", "attempts", "attempts_made",
    "attempts_started", "stalled_count", "progress", "result", "failed_reason",
    "timestamp", "processed_on", "finished_on", "delay_ms", "dlq", "group",
)

DEFAULT_LOCK_MS = 30_000
MAX_WAIT_MS = 60_000
QUEUE_NAME_MAX = 512
