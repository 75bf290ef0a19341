/**
 * Job management (docs/protocol.md "Job management"; the Python client's
 * client/jobs.py): BullMQ's getters and actions over GET_JOBS, JOB_COUNTS,
 * JOB_ACTIONS, RETRY_JOBS, PROMOTE_JOBS, CLEAN and SET_RETENTION.
 *
 * A partitioned queue is answered by all its partitions: getters merge them
 * in one order (each broker returns its jobs' sort keys `[rank, time, id]`),
 * queue-wide actions add up what each partition touched, and a single-job
 * action whose partition is unknown goes to every partition at once, in one
 * bulk JOB_ACTIONS frame per broker (only the partition holding the id
 * applies it; the others answer NOT_FOUND).
 */
import type { ShardqClient } from "./client.js";
import { BadRequestError, NotFoundError } from "./errors.js";

/** The states GET_JOBS lists ("waiting" excludes "prioritized", as BullMQ). */
export const JOB_STATES = ["waiting", "prioritized", "delayed", "active", "completed", "failed", "waiting-children"] as const;
export type ListState = (typeof JOB_STATES)[number];
/** BullMQ's job types: the states, plus its aliases "wait" and "paused" (both read as waiting). */
export type JobType = ListState | "wait" | "paused";

const PAGE = 1000; // jobs per GET_JOBS reply (the broker's bound)
/** Jobs one queue-wide request may touch (the broker's bound). */
export const MAX_TOUCH = 10_000;

/** The wire states for BullMQ job types, deduplicated, in the order given (default: all). */
export function stateList(types: JobType | JobType[] | undefined): ListState[] {
  const listed = types === undefined ? [...JOB_STATES] : Array.isArray(types) ? types : [types];
  if (listed.length === 0) return [...JOB_STATES];
  const out: ListState[] = [];
  for (const t of listed) {
    const s = t === "wait" || t === "paused" ? "waiting" : t;
    if (!(JOB_STATES as readonly string[]).includes(s)) {
      throw new BadRequestError(`unknown job type ${JSON.stringify(t)}; one of ${JOB_STATES.join(", ")}, wait, paused`);
    }
    if (!out.includes(s)) out.push(s);
  }
  return out;
}

/** One listed job: its sort key, its GET_JOB dict, and the stored queue it came from. */
export interface Listed { key: unknown[]; job: Record<string, unknown>; partition: string }

/** Jobs start..end (inclusive, -1: to the last) of one stored queue, page by page. */
export async function fetchRange(client: ShardqClient, queue: string, states: ListState[], start: number,
                                 end: number, asc: boolean): Promise<Listed[]> {
  const out: Listed[] = [];
  let pos = start;
  while (end < 0 || pos <= end) {
    const reply = (await client.call(queue, "GET_JOBS", { queue, states, start: pos, end, asc })) as {
      jobs: Array<Record<string, unknown>>; keys: unknown[][]; total: number;
    };
    reply.jobs.forEach((job, i) => out.push({ key: reply.keys[i]!, job, partition: queue }));
    pos += reply.jobs.length;
    if (reply.jobs.length < PAGE || pos >= Number(reply.total)) break;
  }
  return out;
}

/** Compare sort keys as broker/jobadmin.py orders them: rank ascending, then time and id ascending (asc) or descending. */
export function compareKeys(a: unknown[], b: unknown[], asc: boolean): number {
  const ra = Number(a[0]), rb = Number(b[0]);
  if (ra !== rb) return ra - rb;
  const ta = Number(a[1]), tb = Number(b[1]);
  let c = ta !== tb ? (ta < tb ? -1 : 1) : 0;
  if (c === 0) {
    const ia = String(a[2]), ib = String(b[2]);
    c = ia === ib ? 0 : ia < ib ? -1 : 1;
  }
  return asc ? c : -c;
}

/** GET_JOBS over every partition, merged into one order, then start..end of it. */
export async function listJobs(client: ShardqClient, parts: string[], states: ListState[], start: number,
                               end: number, asc: boolean): Promise<Listed[]> {
  if (!Number.isInteger(start) || !Number.isInteger(end) || start < 0 || end < -1) {
    throw new BadRequestError("start must be an integer >= 0 and end >= -1");
  }
  if (parts.length === 1) return fetchRange(client, parts[0]!, states, start, end, asc);
  const runs = await Promise.all(parts.map((q) => fetchRange(client, q, states, 0, end, asc)));
  const merged = runs.flat().sort((x, y) => compareKeys(x.key, y.key, asc));
  return merged.slice(start, end < 0 ? undefined : end + 1);
}

/** JOB_COUNTS summed over partitions, with `completed_total` / `failed_total` (all time). */
export async function jobCounts(client: ShardqClient, parts: string[], states: ListState[]): Promise<Record<string, number>> {
  const replies = (await Promise.all(parts.map((q) => client.call(q, "JOB_COUNTS", { queue: q, states })))) as Array<Record<string, unknown>>;
  const total: Record<string, number> = {};
  for (const k of [...states, "completed_total", "failed_total"]) total[k] = 0;
  for (const r of replies) for (const k of Object.keys(total)) total[k]! += Number(r[k] ?? 0);
  return total;
}

/**
 * A queue-wide op on every partition until it touched nothing more, each
 * request asking for at most `batch` jobs (BullMQ's `count`: per iteration).
 * @returns how many jobs were touched in all.
 */
export async function touchAll(client: ShardqClient, parts: string[], op: string, batch: number,
                               key: string, args: Record<string, unknown>): Promise<number> {
  if (!Number.isInteger(batch) || batch < 1) throw new BadRequestError(`${key} must be an integer >= 1`);
  const ask = Math.min(batch, MAX_TOUCH);
  let done = 0;
  for (const q of parts) {
    for (;;) {
      const n = Number((await client.call(q, op, { queue: q, [key]: ask, ...args })) ?? 0);
      done += n;
      if (n < ask) break;
    }
  }
  return done;
}

/**
 * One JOB_ACTIONS item per stored queue in `parts` (one frame per broker);
 * done when one of them applied it, the others having answered NOT_FOUND.
 * @throws NotFoundError no partition has the job; JobStateError and the rest as answered.
 */
export async function jobAction(client: ShardqClient, parts: string[], jobId: string, action: string,
                                arg: unknown, queueName: string): Promise<void> {
  await client.ready();
  const items = parts.map((q) => [q, jobId, action, arg ?? null]);
  const outcomes = await client.cluster.bulk("JOB_ACTIONS", items, (it) => String((it as unknown[])[0]),
    (_bid, sub) => ({ items: sub }));
  if (outcomes.some((o) => o === null || o === undefined)) return;
  for (const o of outcomes) {
    if (o instanceof Error && !(o instanceof NotFoundError)) throw o;
  }
  throw new NotFoundError(`no job ${JSON.stringify(jobId)} in ${JSON.stringify(queueName)}`);
}
