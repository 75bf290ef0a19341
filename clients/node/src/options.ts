/**
 * BullMQ job options -> the ADD `opts` map (docs/protocol.md "ADD").
 *
 *   attempts            -> attempts
 *   backoff: n | {type, delay}  -> backoff {type, delay_ms}
 *   delay               -> delay_ms
 *   priority            -> priority (lower runs first, as in BullMQ)
 *   jobId               -> the item's id (else a UUIDv7 made here)
 *   removeOnComplete / removeOnFail: bool | n | {count} -> bool | n
 *   timestamp           -> timestamp
 *   group: {id} | id    -> group (BullMQ Pro groups)
 *   timeout, ttl        -> timeout_ms, ttl_ms (shardq extras)
 *   partitionKey        -> picks the partition of a partitioned queue
 */
import { BadRequestError } from "./errors.js";

export type KeepJobs = boolean | number | { count?: number; age?: number };
export type BackoffOptions = number | { type: "fixed" | "exponential"; delay?: number };

export interface JobsOptions {
  attempts?: number;
  backoff?: BackoffOptions;
  delay?: number;
  priority?: number;
  jobId?: string;
  removeOnComplete?: KeepJobs;
  removeOnFail?: KeepJobs;
  timestamp?: number;
  /** BullMQ Pro's groups: jobs are served round-robin across group ids. */
  group?: { id: string } | string;
  /** Fail an attempt running longer than this many ms (shardq extra). */
  timeout?: number;
  /** Discard to the DLQ a job not started within this many ms of its add (shardq extra). */
  ttl?: number;
  /** Picks the partition of a partitioned queue (shardq extra). */
  partitionKey?: string;
  /** BullMQ's own, refused here with a clear error. */
  lifo?: boolean;
  repeat?: unknown;
  [other: string]: unknown;
}

function keep(v: KeepJobs, what: string): boolean | number {
  if (typeof v === "boolean" || typeof v === "number") return v;
  if (v && typeof v === "object") {
    if (v.age !== undefined) throw new BadRequestError(`${what}.age is not supported by shardq; use count`);
    if (v.count !== undefined) return v.count;
  }
  throw new BadRequestError(`${what} must be a boolean, a count or {count}`);
}

/** The wire opts map for BullMQ-style options, or null when all are defaults. */
export function wireOpts(o: JobsOptions | undefined): Record<string, unknown> | null {
  if (!o) return null;
  if (o.lifo) throw new BadRequestError("lifo is not supported by shardq (jobs run by priority, then FIFO)");
  if (o.repeat !== undefined) throw new BadRequestError("repeat is not supported on add(); use queue.upsertJobScheduler()");
  const out: Record<string, unknown> = {};
  if (o.priority) out["priority"] = o.priority;
  if (o.delay) out["delay_ms"] = o.delay;
  if (o.attempts !== undefined) out["attempts"] = o.attempts;
  if (o.backoff !== undefined) {
    out["backoff"] = typeof o.backoff === "number"
      ? { type: "fixed", delay_ms: o.backoff }
      : { type: o.backoff.type, delay_ms: o.backoff.delay ?? 0 };
  }
  if (o.removeOnComplete !== undefined) out["remove_on_complete"] = keep(o.removeOnComplete, "removeOnComplete");
  if (o.removeOnFail !== undefined) out["remove_on_fail"] = keep(o.removeOnFail, "removeOnFail");
  if (o.timestamp !== undefined) out["timestamp"] = o.timestamp;
  if (o.group !== undefined) out["group"] = typeof o.group === "string" ? o.group : o.group.id;
  if (o.timeout !== undefined) out["timeout_ms"] = o.timeout;
  if (o.ttl !== undefined) out["ttl_ms"] = o.ttl;
  return Object.keys(out).length ? out : null;
}
