/**
 * `Job`: what `queue.add` returns, `queue.getJob` reads, and a Worker's
 * processor receives. Field names follow BullMQ (`attemptsMade`,
 * `returnvalue`, `failedReason`, `processedOn`, ...).
 */
import type { ShardqClient } from "./client.js";
import type { JobsOptions } from "./options.js";
import { unpackPayload } from "./msgpack.js";

export type JobState = "waiting" | "delayed" | "active" | "completed" | "failed" | "waiting-children" | "unknown";

export class Job<DataType = unknown, ReturnType = unknown> {
  /** The stored queue it lives in (`name~i` for a partition of a partitioned queue). */
  partition: string;
  progress: unknown = 0;
  returnvalue: ReturnType | null = null;
  failedReason: string | undefined = undefined;
  attemptsMade = 0;
  attemptsStarted = 0;
  stalledCounter = 0;
  processedOn: number | undefined = undefined;
  finishedOn: number | undefined = undefined;
  /** The lock token of this delivery (a worker's job only). */
  token: number | bigint | undefined = undefined;
  /** Set when the lock was lost while the processor ran: its result is dropped. */
  lockLost = false;
  /** ms the processor may run before the attempt is failed "timed out" (0: none). */
  timeoutMs = 0;
  state: JobState | undefined = undefined;

  constructor(
    /** @internal */ readonly client: ShardqClient,
    readonly queueName: string,
    readonly name: string,
    readonly data: DataType,
    readonly opts: JobsOptions,
    readonly id: string,
    public timestamp: number = Date.now(),
  ) {
    this.partition = queueName;
  }

  /** A job from a GET_JOB reply (`data` and `result` decoded). */
  static fromDict<D, R>(client: ShardqClient, queueName: string, partition: string, d: Record<string, unknown>): Job<D, R> {
    const job = new Job<D, R>(client, queueName, String(d["name"] ?? ""), unpackPayload(d["data"]) as D,
      {}, String(d["id"]), Number(d["timestamp"] ?? 0));
    job.partition = partition;
    job.state = (d["state"] as JobState | undefined) ?? "unknown";
    job.progress = d["progress"] ?? 0;
    job.returnvalue = (unpackPayload(d["result"]) as R | null) ?? null;
    job.failedReason = (d["failed_reason"] as string | null) ?? undefined;
    job.attemptsMade = Number(d["attempts_made"] ?? 0);
    job.attemptsStarted = Number(d["attempts_started"] ?? 0);
    job.stalledCounter = Number(d["stalled_count"] ?? 0);
    job.processedOn = (d["processed_on"] as number | null) ?? undefined;
    job.finishedOn = (d["finished_on"] as number | null) ?? undefined;
    const opts: JobsOptions = {};
    if (d["priority"]) opts.priority = Number(d["priority"]);
    if (d["attempts"] !== undefined && d["attempts"] !== null) opts.attempts = Number(d["attempts"]);
    if (d["delay_ms"]) opts.delay = Number(d["delay_ms"]);
    if (d["group"]) opts.group = { id: String(d["group"]) };
    Object.assign(job.opts, opts);
    return job;
  }

  /**
   * Record progress (a number or any msgpack value).
   * @throws LockLostError this delivery no longer holds the job.
   */
  async updateProgress(progress: unknown): Promise<void> {
    await this.client.call(this.partition, "PROGRESS", { queue: this.partition, id: this.id, token: this.token ?? 0, progress });
    this.progress = progress;
  }

  /**
   * Append a line to the job's log (`queue.getJobLogs(id)`); the last 1000 are kept.
   * @returns the number of lines sent by this call (BullMQ returns the log's length).
   * @throws LockLostError this delivery no longer holds the job.
   */
  async log(line: string): Promise<number> {
    await this.client.call(this.partition, "LOG", { queue: this.partition, id: this.id, token: this.token ?? 0, line: String(line) });
    return 1;
  }

  /** The job's state now, read from its broker. */
  async getState(): Promise<JobState> {
    const d = (await this.client.call(this.partition, "GET_JOB", { queue: this.partition, id: this.id })) as Record<string, unknown> | null;
    return d ? (d["state"] as JobState) : "unknown";
  }

  /** A flow parent's children's results, keyed `queue:jobId` (BullMQ's `getChildrenValues`). */
  async getChildrenValues<T = unknown>(): Promise<Record<string, T>> {
    const raw = (await this.client.call(this.partition, "FLOW_CHILDREN", { queue: this.partition, id: this.id })) as Record<string, unknown>;
    const out: Record<string, T> = {};
    for (const [k, v] of Object.entries(raw)) out[k] = unpackPayload(v) as T;
    return out;
  }

  toJSON(): Record<string, unknown> {
    return {
      id: this.id, name: this.name, data: this.data, opts: this.opts, queueName: this.queueName,
      progress: this.progress, returnvalue: this.returnvalue, failedReason: this.failedReason,
      attemptsMade: this.attemptsMade, attemptsStarted: this.attemptsStarted, timestamp: this.timestamp,
      processedOn: this.processedOn, finishedOn: this.finishedOn,
    };
  }
}
