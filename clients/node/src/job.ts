/**
 * `Job`: what `queue.add` returns, `queue.getJob` reads, and a Worker's
 * processor receives. Field names follow BullMQ (`attemptsMade`,
 * `returnvalue`, `failedReason`, `processedOn`, ...).
 */
import type { ShardqClient } from "./client.js";
import type { JobsOptions } from "./options.js";
import { BadRequestError } from "./errors.js";
import { jobAction } from "./jobs.js";
import { pack, unpackPayload } from "./msgpack.js";

export type JobState = "waiting" | "prioritized" | "delayed" | "active" | "completed" | "failed" | "waiting-children" | "unknown";

export class Job<DataType = unknown, ReturnType = unknown> {
  /** The stored queue it lives in (`name~i` for a partition of a partitioned queue). */
  partition: string;
  progress: unknown = 0;
  returnvalue: ReturnType | null = null;
  failedReason: string | undefined = undefined;
  /** The last few failed attempts' stack traces, oldest first (BullMQ's `job.stacktrace`). */
  stacktrace: string[] = [];
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
  /** The trace context carrier the job was added with (ADD's `trace`), if any. */
  trace: Record<string, string> | undefined = undefined;

  constructor(
    /** @internal */ readonly client: ShardqClient,
    readonly queueName: string,
    readonly name: string,
    public data: DataType,
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
    job.stacktrace = Array.isArray(d["stacktrace"]) ? (d["stacktrace"] as string[]) : [];
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

  // -- actions (docs/protocol.md "JOB_ACTIONS"); JobStateError for a wrong state --------

  private action(action: string, arg: unknown = null): Promise<void> {
    return jobAction(this.client, [this.partition], this.id, action, arg, this.queueName);
  }

  /**
   * A completed or failed job back to waiting, attempts reset (BullMQ's `retry`).
   * @throws JobStateError it has not finished (or is not in `state`). NotFoundError: it is gone.
   */
  async retry(state?: "completed" | "failed"): Promise<void> {
    if (state !== undefined) {
      const now = await this.getState();
      if (now !== state) throw new BadRequestError(`job ${this.id} is ${now}, not ${state}`);
    }
    await this.action("retry");
  }

  /**
   * Remove the job (not while a worker holds it); its id stays taken for the
   * dedup window. A flow child counts as done (null) on its parent.
   * @throws JobStateError it is active.
   */
  async remove(): Promise<void> { await this.action("remove"); }

  /** Run a delayed job now. @throws JobStateError it is not delayed. */
  async promote(): Promise<void> { await this.action("promote"); }

  /** Replace the job's data (any state; a running processor keeps what it was given). */
  async updateData(data: DataType): Promise<void> {
    await this.action("update_data", pack(data));
    this.data = data;
  }

  /**
   * A new priority (>= 0, lower runs first) for a job not yet started
   * (BullMQ's `changePriority({ priority })`; `lifo` is refused).
   * @throws JobStateError it started or finished.
   */
  async changePriority(opts: { priority?: number; lifo?: boolean }): Promise<void> {
    if (opts.lifo) throw new BadRequestError("lifo is not supported by shardq (jobs run by priority, then FIFO)");
    const priority = opts.priority ?? 0;
    await this.action("priority", priority);
    this.opts.priority = priority;
  }

  /** Run a waiting or delayed job `delay` ms from now (0: now). @throws JobStateError otherwise. */
  async changeDelay(delay: number): Promise<void> {
    await this.action("delay", delay);
    this.opts.delay = delay;
  }

  /**
   * No more retries: the current (or next) attempt is its last. Async here
   * (BullMQ's is a local flag; shardq's broker decides retries).
   * @throws JobStateError it has finished.
   */
  async discard(): Promise<void> { await this.action("discard"); }

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
      stacktrace: this.stacktrace,
      attemptsMade: this.attemptsMade, attemptsStarted: this.attemptsStarted, timestamp: this.timestamp,
      processedOn: this.processedOn, finishedOn: this.finishedOn,
    };
  }
}
