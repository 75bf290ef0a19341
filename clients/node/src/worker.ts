/**
 * `Worker`: BullMQ's consumer API on shardq.
 *
 *     const worker = new Worker("emails", async (job) => send(job.data), { connection, concurrency: 50 });
 *     worker.on("completed", (job, result) => ...);
 *
 * Slots: `free + reserved + running == concurrency`. A pull reserves slots
 * before it is sent and gives back what it did not fill, so a worker never
 * holds more jobs than slots, whichever brokers they come from.
 *
 * One long-poll PULL loop runs per broker owning some of the worker's queues
 * (re-planned when the topology changes), on connections of the worker's
 * own lane so `close()` can half-close them at once. When a processor
 * settles its slot frees and its ack joins a batch flushed on the next turn
 * of the event loop; the ACK frame carries a `pull` for slots still free
 * then (ack-and-fetch). Every `lockRenewTime` one EXTEND frame renews the locks of
 * all running jobs. A LOCK_LOST answer (the lock expired and the job went
 * back to waiting; another worker may run it) drops the result and emits
 * `lockLost`: delivery is at-least-once (docs/protocol.md "Locks").
 */
import { AsyncLocalStorage } from "node:async_hooks";
import { EventEmitter } from "node:events";
import { ConnectionInput, ShardqClient, resolveConnection } from "./client.js";
import { AuthError, BadRequestError, BusyError, ConnectionClosedError, LockLostError, MovedError, TryAgainError } from "./errors.js";
import { Job } from "./job.js";
import { pack, unpack } from "./msgpack.js";
import { partitionName } from "./slots.js";

export type Processor<D = any, R = any> = (job: Job<D, R>, token?: string) => Promise<R> | R;

export interface WorkerOptions {
  connection: ConnectionInput;
  /** Jobs processed at once (default 1). */
  concurrency?: number;
  /** Lock duration in ms (default 30 000). */
  lockDuration?: number;
  /** How often locks are renewed, ms (default lockDuration / 2). */
  lockRenewTime?: number;
  /** Start at construction (default true, as in BullMQ). */
  autorun?: boolean;
  /** Seconds a long-poll PULL waits for a job (default 5). */
  drainDelay?: number;
  /** A queue-wide rate limit set when the worker starts: `max` starts per `duration` ms. */
  limiter?: { max: number; duration: number };
  /** Accepted for BullMQ compatibility; the broker applies its own stall rules. */
  stalledInterval?: number;
  maxStalledCount?: number;
}

const MAX_WAIT_MS = 60_000;
const STACKTRACE_MAX = 8192;  // the broker keeps at most this much of each trace
// Which worker's processor is running: close() called from inside one must not wait for itself.
const inProcessor = new AsyncLocalStorage<object>();
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

interface Outcome { job: Job; result?: unknown; error?: Error }

export class Worker<D = any, R = any> extends EventEmitter {
  readonly client: ShardqClient;
  readonly concurrency: number;
  readonly lockDuration: number;
  readonly lockRenewTime: number;
  /** Jobs acked completed / failed by this worker. */
  completedCount = 0;
  failedCount = 0;
  private readonly ownsClient: boolean;
  private readonly waitMs: number;
  private readonly lane: string;
  private free: number;
  private readonly running = new Set<Job<D, R>>();
  private slotWaiters: Array<() => void> = [];
  private acks: Outcome[] = [];
  private fails: Outcome[] = [];
  private flushScheduled = false;
  private readonly sends = new Set<Promise<void>>();
  private readonly handlers = new Set<Promise<void>>();
  private pullLoops = 0;
  private closing = false;
  private runPromise: Promise<void> | null = null;
  private closePromise: Promise<void> | null = null;
  private renewTimer: NodeJS.Timeout | null = null;
  private static lanes = 0;

  constructor(readonly name: string, readonly processor: Processor<D, R>, readonly opts: WorkerOptions) {
    super();
    [this.client, this.ownsClient] = resolveConnection(opts?.connection);
    this.concurrency = opts.concurrency ?? 1;
    if (!Number.isInteger(this.concurrency) || this.concurrency < 1) throw new RangeError("concurrency must be an integer >= 1");
    this.lockDuration = opts.lockDuration ?? 30_000;
    this.lockRenewTime = opts.lockRenewTime ?? this.lockDuration / 2;
    this.waitMs = Math.min(Math.round((opts.drainDelay ?? 5) * 1000), MAX_WAIT_MS);
    this.free = this.concurrency;
    this.lane = `worker-${process.pid}-${++Worker.lanes}`;
    if (opts.autorun !== false) {
      // BullMQ starts at once; errors surface as 'error' events.
      queueMicrotask(() => { void this.run().catch((err) => this.emitError(err)); });
    }
  }

  isRunning(): boolean {
    return this.runPromise !== null && !this.closing;
  }

  /** Pull and process jobs until `close()`; resolves once closed. */
  run(): Promise<void> {
    if (this.runPromise) return this.runPromise;
    this.runPromise = this.main();
    return this.runPromise;
  }

  private async main(): Promise<void> {
    await this.client.ready();
    if (this.opts.limiter) {
      for (const q of this.storedQueues()) {
        await this.client.call(q, "RATE_LIMIT", { queue: q, max: this.opts.limiter.max, per_ms: this.opts.limiter.duration });
      }
    }
    this.renewTimer = setInterval(() => void this.renewLocks(), this.lockRenewTime);
    const loops = new Map<string, Promise<void>>();
    let seen = -1;
    while (!this.closing) {
      for (const bid of this.owners()) {
        if (!loops.has(bid)) {
          loops.set(bid, this.pullLoop(bid).catch((err) => this.emitError(err)).finally(() => loops.delete(bid)));
        }
      }
      seen = this.client.topology.version;
      await Promise.race([this.client.topology.waitChanged(seen), this.stopped()]);
    }
    await Promise.allSettled([...loops.values()]);
    // Handlers first, then the acks they queued.
    while (this.handlers.size || this.sends.size || this.acks.length || this.fails.length) {
      if (this.handlers.size) { await Promise.allSettled([...this.handlers]); continue; }
      this.flush();
      if (this.sends.size) await Promise.allSettled([...this.sends]);
    }
    if (this.renewTimer) clearInterval(this.renewTimer);
  }

  private stopWaiters: Array<() => void> = [];
  private stopped(): Promise<void> {
    return this.closing ? Promise.resolve() : new Promise((r) => this.stopWaiters.push(r));
  }

  /**
   * Stop pulling, let running jobs finish and their acks go out, close
   * the connection if this Worker made it. Idempotent.
   */
  close(_force = false): Promise<void> {
    this.closePromise ??= (async () => {
      this.emit("closing");
      this.closing = true;
      for (const w of this.stopWaiters.splice(0)) w();
      this.wakeSlots();
      await this.client.cluster.closeLane(this.lane);
      if (this.runPromise) await this.runPromise.catch(() => undefined);
      if (this.renewTimer) clearInterval(this.renewTimer);
      if (this.ownsClient) await this.client.close();
      this.emit("closed");
    })();
    // From inside a processor the close goes on in the background: awaiting it would wait for itself.
    return inProcessor.getStore() === this ? Promise.resolve() : this.closePromise;
  }

  // -- routing ---------------------------------------------------------------

  private storedQueues(): string[] {
    const p = this.client.topology.topo.partitions.get(this.name);
    return p ? Array.from({ length: p }, (_, i) => partitionName(this.name, i)) : [this.name];
  }

  private owners(): Set<string> {
    const out = new Set<string>();
    for (const q of this.storedQueues()) {
      const r = this.client.topology.route(q);
      if (r) out.add(r[0]);
    }
    return out;
  }

  private queuesOn(bid: string): string[] {
    return this.storedQueues().filter((q) => this.client.topology.route(q)?.[0] === bid);
  }

  // -- slots -------------------------------------------------------------------

  private reserve(n: number): number {
    const got = Math.min(this.free, n);
    this.free -= got;
    return got;
  }

  private release(n: number): void {
    if (n > 0) {
      this.free += n;
      this.wakeSlots();
    }
  }

  private wakeSlots(): void {
    for (const w of this.slotWaiters.splice(0)) w();
  }

  /** Wait for a free slot; while others are busy, for `atLeast`, so a pull asks for a batch. */
  private async waitSlots(atLeast: number): Promise<void> {
    while (!this.closing && (this.free <= 0 || (this.free < Math.min(atLeast, this.concurrency) && this.free < this.concurrency))) {
      await new Promise<void>((r) => this.slotWaiters.push(r));
    }
  }

  // -- pulling -------------------------------------------------------------------

  private async pullLoop(bid: string): Promise<void> {
    this.pullLoops++;
    let wasBusy = true;
    try {
      while (!this.closing) {
        const queues = this.queuesOn(bid);
        if (!queues.length) return; // none of our queues lives there any more
        const loops = Math.max(this.pullLoops, 1);
        await this.waitSlots(Math.max(1, Math.floor(this.concurrency / (4 * loops))));
        if (this.closing) return;
        const n = this.reserve(Math.ceil(this.free / loops));
        // Another loop may have taken the slots between the wake-up and now.
        if (n === 0) continue;
        let jobs: unknown[] = [];
        try {
          jobs = await this.pull(bid, queues, n);
        } finally {
          this.release(n - this.dispatch(bid, jobs));
        }
        // BullMQ's 'drained': once when a busy queue runs out of jobs.
        if (!jobs.length && wasBusy && !this.closing) this.emit("drained");
        wasBusy = jobs.length > 0;
      }
    } finally {
      this.pullLoops--;
    }
  }

  private async pull(bid: string, queues: string[], n: number): Promise<unknown[]> {
    const args = { queues, count: n, wait_ms: this.waitMs, lock_ms: this.lockDuration };
    try {
      return (await this.client.cluster.callBroker(bid, "PULL", args, this.waitMs + this.client.requestTimeoutMs, this.lane)) as unknown[];
    } catch (err) {
      if (err instanceof ConnectionClosedError && this.closing) return [];
      if (err instanceof MovedError) {
        this.client.topology.patch(err);
        await this.client.topology.refresh();
      } else if (err instanceof TryAgainError || err instanceof BusyError) {
        await sleep(err.retryAfterMs);
      } else {
        this.emitError(err);
        await this.client.topology.refresh();
        await sleep(err instanceof AuthError || err instanceof BadRequestError ? 1000 : 500);
      }
      return [];
    }
  }

  /** Start the processor on each delivered job; returns how many. */
  private dispatch(_bid: string, wires: unknown[]): number {
    for (const w of wires) {
      const wire = w as unknown[];
      const partition = wire[0] as string;
      let data: unknown;
      let decodeError: Error | undefined;
      try {
        data = wire[3] instanceof Uint8Array ? unpack(wire[3]) : wire[3];
      } catch (err) {
        decodeError = new Error(`job data is not valid msgpack: ${(err as Error).message}`);
      }
      const job = new Job<D, R>(this.client, this.name, wire[2] as string, data as D, {}, wire[1] as string, Number(wire[7]));
      job.partition = partition;
      job.token = wire[4] as number | bigint;
      job.attemptsMade = Number(wire[5]);
      job.attemptsStarted = Number(wire[6]);
      job.timeoutMs = wire.length > 9 ? Number(wire[9] ?? 0) : 0;
      // Field 10 (trace) only for jobs added with one (docs/protocol.md "PULL").
      if (wire.length > 10 && wire[10] && typeof wire[10] === "object") job.trace = wire[10] as Record<string, string>;
      job.processedOn = Date.now();
      job.state = "active";
      this.running.add(job);
      if (decodeError) {
        this.finish(job, undefined, decodeError);
        continue;
      }
      this.emit("active", job, "waiting");
      const handler = this.runOne(job);
      this.handlers.add(handler);
      void handler.finally(() => this.handlers.delete(handler));
    }
    return wires.length;
  }

  private async runOne(job: Job<D, R>): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    try {
      const work = inProcessor.run(this, () => Promise.resolve().then(() => this.processor(job, String(job.token))));
      const result = job.timeoutMs
        ? await Promise.race([work, new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`job ${job.id} timed out after ${job.timeoutMs} ms`)), job.timeoutMs);
        })])
        : await work;
      this.finish(job, result, undefined);
    } catch (err) {
      this.finish(job, undefined, err instanceof Error ? err : new Error(String(err)));
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  private finish(job: Job<D, R>, result: unknown, error: Error | undefined): void {
    this.running.delete(job);
    if (job.lockLost) {
      this.emit("lockLost", job);
    } else if (!error) {
      this.acks.push({ job, result });
    } else {
      this.fails.push({ job, error });
    }
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
    // The freed slot wakes the pull loop at once (a microtask, before the ack
    // flush), so refills mostly go by PULL, answered at once, rather than on
    // the ACK, whose reply waits for the group commit: measured on a durable
    // broker under a flood of adds, 6.3k vs 3.6k jobs/s. The ACK carries a
    // pull only for slots still free when it is sent.
    this.release(1);
  }

  // -- acks ------------------------------------------------------------------------

  private flush(): void {
    this.flushScheduled = false;
    const acks = this.acks.splice(0);
    const fails = this.fails.splice(0);
    if (acks.length) {
      const pool = this.closing ? 0 : this.reserve(acks.length);
      this.spawn(this.sendAcks(acks, pool));
    }
    if (fails.length) this.spawn(this.sendFails(fails));
  }

  private spawn(p: Promise<void>): void {
    const tracked = p.catch((err) => this.emitError(err)).finally(() => this.sends.delete(tracked));
    this.sends.add(tracked);
  }

  private async sendAcks(outcomes: Outcome[], pool: number): Promise<void> {
    const items: unknown[] = [];
    const sent: Outcome[] = [];
    for (const o of outcomes) {
      let packed: Uint8Array | null;
      try {
        packed = o.result === undefined || o.result === null ? null : pack(o.result);
      } catch (err) {
        this.fails.push({ job: o.job, error: new TypeError(`processor result cannot be packed: ${(err as Error).message}`) });
        continue;
      }
      items.push([o.job.partition, o.job.id, o.job.token, packed]);
      sent.push(o);
    }
    if (this.fails.length) this.flushSoon();
    let left = pool;
    const reserved = new Map<string, number>();
    const makeArgs = (bid: string, sub: unknown[], round: number): unknown => {
      const args: Record<string, unknown> = { items: sub };
      if (round > 0 && (left || reserved.size)) {
        // Resent items (a frozen or moved queue): do not idle slots meanwhile.
        this.release(left + [...reserved.values()].reduce((a, b) => a + b, 0));
        left = 0;
        reserved.clear();
      }
      if (round === 0 && left && !this.closing) {
        const queues = this.queuesOn(bid);
        if (queues.length) {
          reserved.set(bid, left);
          args["pull"] = { queues, count: left, lock_ms: this.lockDuration };
          left = 0;
        }
      }
      return args;
    };
    const parse = (bid: string, reply: unknown): unknown[] => {
      if (reply && !Array.isArray(reply) && typeof reply === "object") {
        const r = reply as { acks?: unknown[]; jobs?: unknown[] };
        const n = reserved.get(bid) ?? 0;
        reserved.delete(bid);
        this.release(n - this.dispatch(bid, r.jobs ?? []));
        return r.acks ?? [];
      }
      return reply as unknown[];
    };
    let results: unknown[];
    try {
      results = await this.client.cluster.bulk("ACK", items, queueOfItem, makeArgs, parse);
    } finally {
      this.release(left + [...reserved.values()].reduce((a, b) => a + b, 0));
    }
    results.forEach((r, i) => {
      const o = sent[i]!;
      if (r instanceof LockLostError) {
        o.job.lockLost = true;
        this.emit("lockLost", o.job);
      } else if (r instanceof Error) {
        this.emitError(r);
      } else {
        this.completedCount++;
        o.job.returnvalue = o.result as R;
        o.job.finishedOn = Date.now();
        o.job.state = "completed";
        this.emit("completed", o.job, o.result, "active");
      }
    });
  }

  private flushSoon(): void {
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
  }

  private async sendFails(outcomes: Outcome[]): Promise<void> {
    // The 5th element is the attempt's stack trace (its last 8 KB; docs/protocol.md FAIL).
    const items = outcomes.map((o) => [o.job.partition, o.job.id, o.job.token, o.error!.message || String(o.error),
      typeof o.error!.stack === "string" ? o.error!.stack.slice(-STACKTRACE_MAX) : null]);
    const results = await this.client.cluster.bulk("FAIL", items, queueOfItem, (_b, sub) => ({ items: sub }));
    results.forEach((r, i) => {
      const o = outcomes[i]!;
      if (r instanceof LockLostError) {
        o.job.lockLost = true;
        this.emit("lockLost", o.job);
      } else if (r instanceof Error) {
        this.emitError(r);
      } else {
        this.failedCount++;
        o.job.failedReason = o.error!.message;
        o.job.attemptsMade++;
        this.emit("failed", o.job, o.error, "active");
      }
    });
  }

  // -- locks -------------------------------------------------------------------------

  private async renewLocks(): Promise<void> {
    const jobs = [...this.running];
    if (!jobs.length) return;
    const items = jobs.map((j) => [j.partition, j.id, j.token, this.lockDuration]);
    try {
      const results = await this.client.cluster.bulk("EXTEND", items, queueOfItem, (_b, sub) => ({ items: sub }));
      results.forEach((r, i) => {
        if (r instanceof LockLostError) jobs[i]!.lockLost = true;
      });
    } catch (err) {
      this.emitError(err);
    }
  }

  private emitError(err: unknown): void {
    // BullMQ's Worker would throw on an unheard 'error'; a worker keeps going.
    if (this.listenerCount("error")) this.emit("error", err);
    else console.error(`shardq worker ${this.name}:`, err);
  }
}

const queueOfItem = (item: unknown): string => (item as unknown[])[0] as string;
