/**
 * `QueueEvents`: a queue's job events, BullMQ's shape:
 *
 *     const events = new QueueEvents("emails", { connection });
 *     events.on("completed", ({ jobId, returnvalue }) => ...);
 *
 * One follower per stored queue (each partition) sends SUBSCRIBE to the
 * queue's owner on a connection of its own and reads the frames the broker
 * pushes (docs/protocol.md "SUBSCRIBE"). When the queue moves or the link
 * breaks it subscribes again at the owner with `after_seq` = the last seq
 * seen; repeats are dropped by seq, so each event is emitted once.
 *
 * Events: added {jobId, name}; active {jobId, prev}; progress {jobId, data};
 * completed {jobId, returnvalue}; failed {jobId, failedReason, final};
 * stalled {jobId}; and `gap` when the owner says events may be missing.
 */
import { EventEmitter } from "node:events";
import { ConnectionInput, ShardqClient, resolveConnection } from "./client.js";
import { Connection, isLinkError } from "./connection.js";
import { MovedError, TryAgainError } from "./errors.js";
import { unpackPayload } from "./msgpack.js";
import { partitionName } from "./slots.js";

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class QueueEvents extends EventEmitter {
  readonly client: ShardqClient;
  private readonly ownsClient: boolean;
  private closed = false;
  private readonly conns = new Set<Connection>();
  private readonly followers: Array<Promise<void>> = [];
  private readonly readyPromise: Promise<void>;

  constructor(readonly name: string, opts: { connection: ConnectionInput; autorun?: boolean }) {
    super();
    [this.client, this.ownsClient] = resolveConnection(opts?.connection);
    this.readyPromise = this.start();
    this.readyPromise.catch((err) => { if (this.listenerCount("error")) this.emit("error", err); });
  }

  /** Resolves once every partition's subscription is live. */
  waitUntilReady(): Promise<void> {
    return this.readyPromise;
  }

  private async start(): Promise<void> {
    await this.client.ready();
    const p = this.client.topology.topo.partitions.get(this.name);
    const stored = p ? Array.from({ length: p }, (_, i) => partitionName(this.name, i)) : [this.name];
    const live = stored.map(() => { let ok!: () => void; const pr = new Promise<void>((r) => (ok = r)); return { pr, ok }; });
    stored.forEach((q, i) => this.followers.push(this.follow(q, live[i]!.ok)));
    await Promise.all(live.map((l) => l.pr));
  }

  private async follow(stored: string, onLive: () => void): Promise<void> {
    let last: number | null = null;
    while (!this.closed) {
      const route = this.client.topology.route(stored);
      if (!route) { await this.client.topology.refresh(); await sleep(200); continue; }
      const addr = route[1];
      let conn: Connection | null = null;
      try {
        conn = await Connection.open(addr, { token: this.client.token, clientName: `shardq-node-events/${process.pid}` });
        this.conns.add(conn);
        const pushes: Array<unknown | null> = [];
        let wake: (() => void) | null = null;
        const onPush = (body: unknown | null) => { pushes.push(body); wake?.(); };
        const reply = (await conn.request("SUBSCRIBE", { queue: stored, after_seq: last }, undefined, onPush)) as
          { seq: number; events: unknown[][]; gap: boolean };
        if (reply.gap && last !== null) this.emit("gap", { queue: stored });
        last = this.deliver(stored, reply.events, last);
        if (last === null) last = reply.seq;
        onLive();
        for (;;) {
          while (!pushes.length) await new Promise<void>((r) => (wake = r));
          const body = pushes.shift();
          if (body === null || body === undefined) break; // link gone: resume
          const b = body as { events?: unknown[][]; moved?: Record<string, unknown> };
          if (b.moved) {
            const m = b.moved;
            this.client.topology.patch(new MovedError(Number(m["slot"]), String(m["owner"]), String(m["addr"]), Number(m["epoch"])));
            break;
          }
          last = this.deliver(stored, b.events ?? [], last);
        }
      } catch (err) {
        if (err instanceof MovedError) {
          this.client.topology.patch(err);
        } else if (err instanceof TryAgainError) {
          await sleep(err.retryAfterMs);
        } else if (!isLinkError(err)) {
          if (this.listenerCount("error")) this.emit("error", err);
          await sleep(500);
        } else {
          await this.client.topology.refresh();
          await sleep(100);
        }
      } finally {
        if (conn) { this.conns.delete(conn); conn.abort(); }
      }
    }
  }

  private deliver(stored: string, events: unknown[][], last: number | null): number | null {
    for (const [seq, type, jobId, data] of events as Array<[number, string, string, unknown]>) {
      if (last !== null && seq <= last) continue; // a repeat after a resume
      last = seq;
      const base = { jobId, queue: this.name, partition: stored, seq };
      switch (type) {
        case "added": this.emit("added", { ...base, name: (data as { name?: string } | null)?.name }, seq); break;
        case "active": this.emit("active", { ...base, prev: "waiting" }, seq); break;
        case "progress": this.emit("progress", { ...base, data }, seq); break;
        case "completed": this.emit("completed", { ...base, returnvalue: unpackPayload(data), prev: "active" }, seq); break;
        case "failed": {
          const d = (data ?? {}) as { reason?: string; final?: boolean };
          this.emit("failed", { ...base, failedReason: d.reason, final: d.final ?? true, prev: "active" }, seq);
          break;
        }
        case "stalled": this.emit("stalled", base, seq); break;
        default: this.emit(type, { ...base, data }, seq);
      }
    }
    return last;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const c of this.conns) c.abort();
    await Promise.allSettled(this.followers);
    if (this.ownsClient) await this.client.close();
  }
}
