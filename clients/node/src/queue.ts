/**
 * `Queue`: BullMQ's producer/admin API on shardq.
 *
 *     const queue = new Queue("emails", { connection: "http://127.0.0.1:7070" });
 *     await queue.add("send", { to: "a@b" }, { attempts: 3, backoff: { type: "exponential", delay: 100 } });
 *
 * Concurrent `add` calls leave in one bulk ADD frame per queue (and owner);
 * each job's id is made here before the first send, so resends are idempotent.
 * A partitioned queue (docs/protocol.md "Partitions") is written to one
 * partition per job and read with a fan-out over all of them.
 */
import { ConnectionInput, ShardqClient, chunkItems, resolveConnection } from "./client.js";
import { BadRequestError } from "./errors.js";
import { Job } from "./job.js";
import { pack, unpackPayload } from "./msgpack.js";
import { JobsOptions, wireOpts } from "./options.js";
import { partitionFor, partitionName } from "./slots.js";
import { uuid7 } from "./uuid7.js";

export const COUNT_TYPES = ["waiting", "delayed", "active", "completed", "failed"] as const;
const DLQ_PAGE = 1000;
export type CountType = (typeof COUNT_TYPES)[number] | "paused" | "prioritized" | "waiting-children";

export interface QueueOptions {
  connection: ConnectionInput;
  /** Options applied to every add (BullMQ's `defaultJobOptions`). */
  defaultJobOptions?: JobsOptions;
  /** BullMQ's key prefix: no meaning on shardq; refused unless undefined. */
  prefix?: undefined;
}

export interface BulkJob<D = unknown> { name: string; data: D; opts?: JobsOptions }

export interface RepeatOptions { every?: number; pattern?: string; tz?: string }
export interface JobTemplate<D = unknown> { name?: string; data?: D; opts?: JobsOptions }

export class Queue<DataType = unknown, ResultType = unknown> {
  readonly client: ShardqClient;
  readonly defaultJobOptions: JobsOptions;
  private readonly ownsClient: boolean;

  constructor(readonly name: string, opts: QueueOptions) {
    if (!name) throw new RangeError("queue name must not be empty");
    [this.client, this.ownsClient] = resolveConnection(opts?.connection);
    this.defaultJobOptions = opts.defaultJobOptions ?? {};
  }

  /** Resolves once the topology is loaded (BullMQ's `waitUntilReady`). */
  async waitUntilReady(): Promise<void> {
    await this.client.ready();
  }

  /** The stored queue names: `[name]`, or `name~0 .. name~P-1` if partitioned. */
  partitions(): string[] {
    const p = this.client.topology.topo.partitions.get(this.name);
    return p ? Array.from({ length: p }, (_, i) => partitionName(this.name, i)) : [this.name];
  }

  private target(jobId: string, key: string | undefined): string {
    const p = this.client.topology.topo.partitions.get(this.name);
    return p ? partitionName(this.name, partitionFor(key ?? jobId, p)) : this.name;
  }

  private item(name: string, data: DataType, opts: JobsOptions | undefined): [string, unknown[], JobsOptions] {
    const o = opts ? { ...this.defaultJobOptions, ...opts } : this.defaultJobOptions;
    const id = o.jobId ?? uuid7();
    let packed: Uint8Array;
    try {
      packed = pack(data);
    } catch (err) {
      throw new BadRequestError(`job data cannot be packed as msgpack: ${(err as Error).message}`);
    }
    return [id, [id, name, packed, wireOpts(o)], o];
  }

  /**
   * Add one job; resolves to it. Adding an id that exists returns it and changes nothing.
   * @throws ShardqError the add was refused (BadRequestError, TooLargeError, BusyError, UnavailableError, ...).
   */
  async add(name: string, data: DataType, opts?: JobsOptions): Promise<Job<DataType, ResultType>> {
    const [id, item, o] = this.item(name, data, opts);
    await this.client.ready();
    const stored = this.target(id, o.partitionKey);
    await this.client.add(stored, item);
    const job = new Job<DataType, ResultType>(this.client, this.name, name, data, o, id, o.timestamp ?? Date.now());
    job.partition = stored;
    return job;
  }

  /**
   * Add many jobs; resolves to them in order. Sent in frames of up to 5000 per
   * owner, in parallel. Throws the first item error after every item was tried.
   */
  async addBulk(jobs: Array<BulkJob<DataType>>): Promise<Array<Job<DataType, ResultType>>> {
    await this.client.ready();
    const byQueue = new Map<string, { idxs: number[]; items: unknown[] }>();
    const out: Array<Job<DataType, ResultType>> = [];
    jobs.forEach((j, i) => {
      const [id, item, o] = this.item(j.name, j.data, j.opts);
      const stored = this.target(id, o.partitionKey);
      let g = byQueue.get(stored);
      if (!g) byQueue.set(stored, (g = { idxs: [], items: [] }));
      g.idxs.push(i);
      g.items.push(item);
      const job = new Job<DataType, ResultType>(this.client, this.name, j.name, j.data, o, id, o.timestamp ?? Date.now());
      job.partition = stored;
      out.push(job);
    });
    const sends: Array<Promise<unknown[]>> = [];
    for (const [stored, g] of byQueue) {
      for (const chunk of chunkItems(g.items, this.client.maxBatch)) sends.push(this.client.sendAdd(stored, chunk));
    }
    const results = (await Promise.all(sends)).flat();
    const first = results.find((r) => r instanceof Error);
    if (first) throw first;
    return out;
  }

  /** The job, or undefined if unknown (BullMQ's `getJob`). */
  async getJob(jobId: string): Promise<Job<DataType, ResultType> | undefined> {
    await this.client.ready();
    for (const q of this.partitions()) {
      const d = await this.client.call(q, "GET_JOB", { queue: q, id: jobId });
      if (d) return Job.fromDict<DataType, ResultType>(this.client, this.name, q, d as Record<string, unknown>);
    }
    return undefined;
  }

  /** The job's state, or "unknown". */
  async getJobState(jobId: string): Promise<string> {
    return (await this.getJob(jobId))?.state ?? "unknown";
  }

  private async each(op: string, args: Record<string, unknown> = {}): Promise<unknown[]> {
    await this.client.ready();
    return Promise.all(this.partitions().map((q) => this.client.call(q, op, { queue: q, ...args })));
  }

  private async counts(): Promise<Record<string, number> & { paused: boolean }> {
    const replies = (await this.each("COUNTS")) as Array<Record<string, unknown>>;
    const total: Record<string, number> = Object.fromEntries(COUNT_TYPES.map((t) => [t, 0]));
    let paused = true;
    for (const r of replies) {
      for (const t of COUNT_TYPES) total[t]! += Number(r[t] ?? 0);
      paused &&= Boolean(r["paused"]);
    }
    return Object.assign(total, { paused });
  }

  /**
   * Jobs retained per state (BullMQ's `getJobCounts`): all states when none
   * is named. `paused` counts the waiting jobs of a paused queue; shardq has
   * no separate prioritized list, so `prioritized` is 0.
   */
  async getJobCounts(...types: CountType[]): Promise<Record<string, number>> {
    const c = await this.counts();
    const all: Record<string, number> = {
      waiting: c.paused ? 0 : c["waiting"]!, paused: c.paused ? c["waiting"]! : 0,
      delayed: c["delayed"]!, active: c["active"]!, completed: c["completed"]!, failed: c["failed"]!,
      prioritized: 0, "waiting-children": 0,
    };
    const want = types.length ? types : (["waiting", "active", "completed", "failed", "delayed", "paused", "prioritized", "waiting-children"] as CountType[]);
    return Object.fromEntries(want.map((t) => [t, all[t] ?? 0]));
  }

  /** The sum of the counts of the given states. */
  async getJobCountByTypes(...types: CountType[]): Promise<number> {
    return Object.values(await this.getJobCounts(...types)).reduce((a, b) => a + b, 0);
  }

  /** Jobs waiting or delayed (BullMQ's `count`). */
  async count(): Promise<number> {
    return this.getJobCountByTypes("waiting", "paused", "delayed");
  }

  getWaitingCount(): Promise<number> { return this.getJobCountByTypes("waiting", "paused"); }
  getActiveCount(): Promise<number> { return this.getJobCountByTypes("active"); }
  getDelayedCount(): Promise<number> { return this.getJobCountByTypes("delayed"); }
  getCompletedCount(): Promise<number> { return this.getJobCountByTypes("completed"); }
  getFailedCount(): Promise<number> { return this.getJobCountByTypes("failed"); }

  async isPaused(): Promise<boolean> {
    return (await this.counts()).paused;
  }

  /** Stop handing out jobs (adds still work). */
  async pause(): Promise<void> { await this.each("PAUSE"); }

  /** Hand out jobs again. */
  async resume(): Promise<void> { await this.each("RESUME"); }

  /** Remove waiting jobs, and delayed ones when `delayed` is true. */
  async drain(delayed = false): Promise<void> { await this.each("DRAIN", { delayed }); }

  /** Remove the queue and every job in it. */
  async obliterate(_opts?: { force?: boolean }): Promise<void> { await this.each("OBLITERATE"); }

  /** The lines logged with `job.log`, oldest first (BullMQ's shape `{logs, count}`). */
  async getJobLogs(jobId: string): Promise<{ logs: string[]; count: number }> {
    await this.client.ready();
    for (const q of this.partitions()) {
      const logs = (await this.client.call(q, "GET_LOGS", { queue: q, id: jobId })) as string[];
      if (logs.length) return { logs, count: logs.length };
    }
    return { logs: [], count: 0 };
  }

  /**
   * Jobs that failed for good, oldest failure first (BullMQ's `getFailed`):
   * shardq keeps every final failure in the queue's dead-letter list, bounded
   * like failed history. `end` is inclusive; -1 reads to the end. Each job's
   * `dlqReason` says why ("attempts exhausted", "stalled too many times", "ttl expired").
   */
  async getFailed(start = 0, end = -1): Promise<Array<Job<DataType, ResultType> & { dlqReason?: string }>> {
    await this.client.ready();
    const out: Array<Job<DataType, ResultType> & { dlqReason?: string }> = [];
    const want = end < 0 ? Infinity : end - start + 1;
    let skip = start;
    for (const q of this.partitions()) {
      for (let offset = 0; out.length < want;) {
        const limit = Math.min(DLQ_PAGE, want - out.length + skip);
        const page = (await this.client.call(q, "DLQ_LIST", { queue: q, offset, limit })) as Array<Record<string, unknown>>;
        for (const d of page) {
          if (skip > 0) { skip--; continue; }
          const job = Job.fromDict<DataType, ResultType>(this.client, this.name, q, d) as Job<DataType, ResultType> & { dlqReason?: string };
          job.dlqReason = d["dlq_reason"] as string | undefined;
          if (out.length < want) out.push(job);
        }
        if (page.length < limit) break;
        offset += page.length;
      }
    }
    return out;
  }

  /**
   * Put jobs that failed for good back to waiting with `attemptsMade` 0
   * (BullMQ's `retryJobs({ state: "failed" })`; other states are refused).
   * @returns how many were retried.
   */
  async retryJobs(opts: { state?: "failed"; count?: number } = {}): Promise<number> {
    if (opts.state !== undefined && opts.state !== "failed") {
      throw new BadRequestError(`retryJobs supports state "failed" only, got ${JSON.stringify(opts.state)}`);
    }
    const counts = (await this.each("DLQ_RETRY", { ids: null })) as number[];
    return counts.reduce((a, b) => a + Number(b ?? 0), 0);
  }

  /** At most `max` jobs start in any sliding `duration` ms window (BullMQ's global rate limit). */
  async setGlobalRateLimit(max: number, duration: number): Promise<void> {
    const parts = this.partitions();
    const share = parts.length === 1 ? max : Math.max(1, Math.floor(max / parts.length));
    await this.each("RATE_LIMIT", { max: share, per_ms: duration });
  }

  async removeGlobalRateLimit(): Promise<void> {
    await this.each("RATE_LIMIT", { max: null, per_ms: 1000 });
  }

  private schedulerHome(): string {
    return this.partitions()[0]!; // a partitioned queue keeps its schedulers on partition 0
  }

  /**
   * Create or replace a job scheduler (BullMQ's `upsertJobScheduler`): a job
   * from `template` every `every` ms (ticks on multiples since the epoch) or
   * on the cron `pattern` in `tz`. Each tick makes exactly one job, id
   * `${schedulerId}:${tickMs}`, whatever moves or restarts.
   */
  async upsertJobScheduler(schedulerId: string, repeat: RepeatOptions, template: JobTemplate<DataType> = {}): Promise<Record<string, unknown>> {
    await this.client.ready();
    const home = this.schedulerHome();
    const args: Record<string, unknown> = {
      queue: home, id: schedulerId, tz: repeat.tz ?? "UTC", name: template.name ?? null,
      data: pack(template.data ?? null), opts: wireOpts(template.opts),
    };
    if (repeat.every !== undefined) args["every_ms"] = repeat.every;
    if (repeat.pattern !== undefined) args["cron"] = repeat.pattern;
    const reply = (await this.client.call(home, "SCHED_UPSERT", args)) as Record<string, unknown>;
    reply["data"] = unpackPayload(reply["data"]);
    return reply;
  }

  async removeJobScheduler(schedulerId: string): Promise<boolean> {
    await this.client.ready();
    const home = this.schedulerHome();
    return Boolean(await this.client.call(home, "SCHED_REMOVE", { queue: home, id: schedulerId }));
  }

  async getJobSchedulers(): Promise<Array<Record<string, unknown>>> {
    await this.client.ready();
    const home = this.schedulerHome();
    const list = (await this.client.call(home, "SCHED_LIST", { queue: home })) as Array<Record<string, unknown>>;
    for (const s of list) s["data"] = unpackPayload(s["data"]);
    return list;
  }

  /** Close the connection if this Queue made it. */
  async close(): Promise<void> {
    if (this.ownsClient) await this.client.close();
  }
}
