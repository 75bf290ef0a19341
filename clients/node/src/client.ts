/**
 * `ShardqClient`: topology, connections and the add batcher, shared by the
 * Queue, Worker, FlowProducer and QueueEvents objects made on it.
 *
 * `connection` (BullMQ's option name) takes a coordinator URL
 * (`"http://127.0.0.1:7070"`), broker addresses (`"h:p,h:p"` or a list), an
 * options object `{ url | brokers, token, ... }`, or a `ShardqClient` to
 * share. With a URL the map comes from `GET {url}/topology`; later refreshes
 * fall back to the brokers' TOPOLOGY, so the coordinator is never on the data path.
 */
import { Cluster, DEFAULT_POLICY, RetryPolicy } from "./cluster.js";
import { readFileSync } from "node:fs";
import {
  Connection, DEFAULT_CONNECT_TIMEOUT_MS, DEFAULT_PING_INTERVAL_MS, DEFAULT_PING_TIMEOUT_MS,
  DEFAULT_REQUEST_TIMEOUT_MS, isLinkError,
} from "./connection.js";
import { AuthError, ConnectionClosedError, ShardqError, TlsError, UnavailableError } from "./errors.js";
import { Topology, TopologyManager, TopologySource } from "./topology.js";

export interface ConnectionOptions {
  /** The coordinator's URL, e.g. `http://127.0.0.1:7070`. */
  url?: string;
  /** Broker addresses, `"host:port,host:port"` or a list. */
  brokers?: string | string[];
  /**
   * The cluster's client token, when brokers run with `--token`. Default:
   * the first line of `tokenFile`, else `$SHARDQ_TOKEN` (README "Security and
   * limits": a file or the environment keeps it off command lines).
   */
  token?: string;
  /** A file whose first line is the token (wins over `token` and the environment). */
  tokenFile?: string;
  /** ms of silence on a connection before it sends PING (default 5000; 0: never). */
  pingIntervalMs?: number;
  /** A pong later than this many ms marks the link dead (default 10000). */
  pingTimeoutMs?: number;
  /** How brokers see this client in HELLO (default `shardq-node/<pid>`). */
  clientName?: string;
  requestTimeoutMs?: number;
  connectTimeoutMs?: number;
  /** Most jobs in one ADD frame (default 5000). */
  maxBatch?: number;
  /**
   * TLS to brokers (`{ ca: readFileSync("ca.pem") }`, plus `cert`/`key` for
   * mutual TLS), as `tls.connect` takes them. An `https://` coordinator URL
   * is fetched with Node's own trust store: add a private CA with
   * `NODE_EXTRA_CA_CERTS`, or pass broker addresses.
   */
  tls?: import("node:tls").ConnectionOptions;
  retry?: Partial<RetryPolicy>;
}

export type ConnectionInput = string | string[] | ConnectionOptions | ShardqClient;

export const DEFAULT_MAX_BATCH = 5000;
/** Payload bytes past which an ADD frame is closed (well under the 16 MiB frame limit). */
export const MAX_BATCH_BYTES = 4 * 1024 * 1024;

interface PendingBatch {
  items: unknown[]; bytes: number;
  resolves: Array<(v: unknown) => void>; rejects: Array<(e: unknown) => void>;
}

/** Split ADD items into frames of at most `maxItems` items and about MAX_BATCH_BYTES of data. */
export function chunkItems(items: unknown[], maxItems: number): unknown[][] {
  const out: unknown[][] = [];
  let cur: unknown[] = [];
  let bytes = 0;
  for (const it of items) {
    const n = ((it as unknown[])[2] as Uint8Array).length + 64;
    if (cur.length && (cur.length >= maxItems || bytes + n > MAX_BATCH_BYTES)) {
      out.push(cur);
      cur = [];
      bytes = 0;
    }
    cur.push(it);
    bytes += n;
  }
  if (cur.length) out.push(cur);
  return out;
}

export class ShardqClient {
  readonly coordinator: string | null;
  readonly seeds: string[];
  readonly token: string | undefined;
  readonly topology: TopologyManager;
  readonly cluster: Cluster;
  readonly requestTimeoutMs: number;
  readonly maxBatch: number;
  /** ADD frames sent by the add batcher (for tests and stats). */
  addFrames = 0;
  private readonly clientName: string;
  private readonly connectTimeoutMs: number;
  private readonly pingIntervalMs: number;
  private readonly pingTimeoutMs: number;
  private readonly tls: import("node:tls").ConnectionOptions | undefined;
  private loading = false;
  private readyPromise: Promise<void> | null = null;
  private pendingAdds = new Map<string, PendingBatch>();
  private flushScheduled = false;
  private readonly inflightAdds = new Set<Promise<void>>();
  private closed = false;

  constructor(opts: ConnectionOptions | string | string[]) {
    const o: ConnectionOptions = typeof opts === "string" || Array.isArray(opts) ? parseTarget(opts) : opts;
    this.coordinator = o.url ? o.url.replace(/\/+$/, "") : null;
    this.seeds = typeof o.brokers === "string" ? o.brokers.split(",").map((s) => s.trim()).filter(Boolean) : [...(o.brokers ?? [])];
    if (!this.coordinator && this.seeds.length === 0) {
      throw new ShardqError("connection needs a coordinator URL or at least one broker address");
    }
    this.token = resolveToken(o.token, o.tokenFile);
    this.pingIntervalMs = o.pingIntervalMs ?? DEFAULT_PING_INTERVAL_MS;
    this.pingTimeoutMs = o.pingTimeoutMs ?? DEFAULT_PING_TIMEOUT_MS;
    this.tls = o.tls;
    this.clientName = o.clientName ?? `shardq-node/${process.pid}`;
    this.requestTimeoutMs = o.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.connectTimeoutMs = o.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    this.maxBatch = o.maxBatch ?? DEFAULT_MAX_BATCH;
    const sources: TopologySource[] = [() => this.fromBrokers()];
    if (this.coordinator) sources.unshift(() => this.fromCoordinator());
    this.topology = new TopologyManager(new Topology(), sources);
    this.cluster = new Cluster(this.topology, (addr) => this.open(addr), { ...DEFAULT_POLICY, ...(o.retry ?? {}) });
  }

  /** Resolves once the first topology is loaded (retried for the unavailable budget). */
  ready(): Promise<void> {
    // A failed first load is not kept: the next call tries again.
    this.readyPromise ??= this.loadFirst().catch((err: unknown) => { this.readyPromise = null; throw err; });
    return this.readyPromise;
  }

  /** Router counters: MOVED, TRYAGAIN and BUSY answers seen. */
  get stats(): { moved: number; tryAgain: number; busy: number } {
    return this.cluster.stats;
  }

  async call(queue: string, op: string, args: unknown, timeoutMs?: number): Promise<unknown> {
    await this.ready();
    return this.cluster.call(queue, op, args, timeoutMs);
  }

  /** Queue one ADD item `[id, name, data, opts]`; concurrent adds leave in one frame per queue. */
  add(queue: string, item: unknown[]): Promise<unknown> {
    if (this.closed) return Promise.reject(new ConnectionClosedError("client is closed"));
    return new Promise((resolve, reject) => {
      const n = (item[2] as Uint8Array).length + 64;
      let batch = this.pendingAdds.get(queue);
      if (batch && batch.bytes + n > MAX_BATCH_BYTES) {
        this.pendingAdds.delete(queue);
        this.startBatch(queue, batch);
        batch = undefined;
      }
      if (!batch) this.pendingAdds.set(queue, (batch = { items: [], bytes: 0, resolves: [], rejects: [] }));
      batch.items.push(item);
      batch.bytes += n;
      batch.resolves.push(resolve);
      batch.rejects.push(reject);
      if (batch.items.length >= this.maxBatch) {
        this.pendingAdds.delete(queue);
        this.startBatch(queue, batch);
      } else if (!this.flushScheduled) {
        this.flushScheduled = true;
        setImmediate(() => this.flushAdds());
      }
    });
  }

  private flushAdds(): void {
    this.flushScheduled = false;
    const pending = this.pendingAdds;
    this.pendingAdds = new Map();
    for (const [queue, batch] of pending) this.startBatch(queue, batch);
  }

  private startBatch(queue: string, batch: PendingBatch): void {
    this.addFrames++;
    const p = this.sendAdd(queue, batch.items).then(
      (outcomes) => outcomes.forEach((o, i) => (o instanceof Error ? batch.rejects[i]!(o) : batch.resolves[i]!(o))),
      (err) => batch.rejects.forEach((r) => r(err)),
    ).finally(() => this.inflightAdds.delete(p));
    this.inflightAdds.add(p);
  }

  /** Send ADD items for one queue (split by owner); one outcome per item. */
  async sendAdd(queue: string, items: unknown[]): Promise<unknown[]> {
    await this.ready();
    return this.cluster.bulk("ADD", items, () => queue, (_bid, sub) => ({ queue, jobs: sub }));
  }

  /** Fetch the whole topology now. */
  refreshTopology(): Promise<void> {
    return this.topology.refresh();
  }

  /** Let adds in flight finish (5 s at most), then close every connection. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.flushAdds();
    this.closed = true;
    if (this.inflightAdds.size) {
      await Promise.race([Promise.allSettled([...this.inflightAdds]), new Promise((r) => setTimeout(r, 5000).unref())]);
    }
    this.topology.close();
    await this.cluster.close();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  // -- topology sources ------------------------------------------------------

  /**
   * A connection of its own to `addr` (a QueueEvents subscription), with this
   * client's token, timeouts and pings; the caller closes it.
   */
  openDedicated(addr: string, clientName: string): Promise<Connection> {
    return Connection.open(addr, {
      token: this.token, clientName, connectTimeoutMs: this.connectTimeoutMs,
      requestTimeoutMs: this.requestTimeoutMs, pingIntervalMs: this.pingIntervalMs, pingTimeoutMs: this.pingTimeoutMs,
      tls: this.tls,
    });
  }

  private open(addr: string): Promise<Connection> {
    return Connection.open(addr, {
      token: this.token, clientName: this.clientName, connectTimeoutMs: this.connectTimeoutMs,
      requestTimeoutMs: this.requestTimeoutMs, pingIntervalMs: this.pingIntervalMs,
      pingTimeoutMs: this.pingTimeoutMs, tls: this.tls,
      onEpoch: (_c, epoch) => { if (!this.loading) this.topology.noteEpoch(epoch); },
    });
  }

  private async fromCoordinator(): Promise<Topology> {
    const headers: Record<string, string> = this.token ? { Authorization: `Bearer ${this.token}` } : {};
    let resp: Response;
    try {
      resp = await fetch(`${this.coordinator}/topology`, { headers, signal: AbortSignal.timeout(this.connectTimeoutMs) });
    } catch (err) {
      throw new UnavailableError("coordinator", (err as Error).message);
    }
    if (!resp.ok) throw new UnavailableError("coordinator", `HTTP ${resp.status}`);
    return Topology.fromDict(await resp.json());
  }

  private async fromBrokers(): Promise<Topology> {
    const conns = this.cluster.openConnections().sort((a, b) => b.maxEpoch - a.maxEpoch);
    let last: unknown = null;
    for (const conn of conns) {
      try {
        return await askTopology(conn);
      } catch (err) {
        if (!isLinkError(err)) throw err;
        last = err;
      }
    }
    const known = [...this.topology.topo.brokers.values()].map((b) => b.addr);
    for (const addr of new Set([...known, ...this.seeds])) {
      let conn: Connection;
      try {
        conn = await this.open(addr);
      } catch (err) {
        if (err instanceof AuthError || err instanceof TlsError) throw err;
        last = err;
        continue;
      }
      try {
        return await askTopology(conn);
      } finally {
        if (!this.cluster.adopt(conn.brokerId, conn)) await conn.close();
      }
    }
    throw new UnavailableError("any", `no broker answered TOPOLOGY: ${(last as Error | null)?.message ?? "none known"}`);
  }

  private async loadFirst(): Promise<void> {
    this.loading = true;
    try {
      const deadline = performance.now() + this.cluster.policy.unavailableBudgetMs;
      let delay = 50;
      for (;;) {
        const errors: string[] = [];
        for (const source of this.topology.sources) {
          try {
            this.topology.replace(await source());
            return;
          } catch (err) {
            if (err instanceof AuthError || err instanceof TlsError) throw err;
            errors.push((err as Error).message);
          }
        }
        if (performance.now() + delay > deadline) {
          throw new UnavailableError(this.coordinator ?? this.seeds.join(","), errors.join("; "));
        }
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 500);
      }
    } finally {
      this.loading = false;
    }
  }

  /** POST to the coordinator (FlowProducer does not need it; declareQueue does). */
  async coordinatorPost(path: string, body: unknown): Promise<unknown> {
    if (!this.coordinator) throw new ShardqError(`${path} needs the coordinator: connect with its URL`);
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (this.token) headers["Authorization"] = `Bearer ${this.token}`;
    const resp = await fetch(`${this.coordinator}${path}`, { method: "POST", headers, body: JSON.stringify(body) });
    if (!resp.ok) throw new ShardqError(`${path}: HTTP ${resp.status}: ${await resp.text()}`);
    return resp.json();
  }

  /** Store queue `name` as `partitions` queues spread over the brokers (docs/protocol.md "Partitions"). */
  async declareQueue(name: string, partitions: number): Promise<void> {
    await this.coordinatorPost(`/queues/${encodeURIComponent(name)}/declare`, { partitions });
    await this.refreshTopology();
  }
}

async function askTopology(conn: Connection): Promise<Topology> {
  const reply = await conn.request("TOPOLOGY", {});
  // A broker with no map of its own is standalone: it owns every slot.
  return reply === null ? Topology.standalone(conn.brokerId, conn.addr) : Topology.fromDict(reply);
}

/**
 * The token: the first line of `file` when given, else `token`, else
 * `$SHARDQ_TOKEN` (as shardq/secrets.py resolves a server's).
 * @throws ShardqError the file cannot be read or holds no token.
 */
export function resolveToken(token: string | undefined, file: string | undefined): string | undefined {
  if (file !== undefined) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch (err) {
      throw new ShardqError(`cannot read token file ${file}: ${(err as Error).message}`);
    }
    const first = text.trim().split(/\r?\n/)[0]?.trim() ?? "";
    if (!first) throw new ShardqError(`token file ${file} is empty`);
    return first;
  }
  return token || process.env["SHARDQ_TOKEN"] || undefined;
}

function parseTarget(target: string | string[]): ConnectionOptions {
  if (typeof target === "string" && /^https?:\/\//.test(target)) return { url: target };
  return { brokers: target };
}

/** The ShardqClient for a `connection` option, and whether the caller owns (closes) it. */
export function resolveConnection(input: ConnectionInput | undefined): [ShardqClient, boolean] {
  if (input === undefined) throw new ShardqError("a connection is required: { connection: 'http://coordinator:7070' }");
  if (input instanceof ShardqClient) return [input, false];
  return [new ShardqClient(input), true];
}
