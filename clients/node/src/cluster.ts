/**
 * Routing: one lazy connection per broker (and lane), the retry rules of
 * docs/protocol.md "What a client does", and bulk fan-out.
 *
 * `call()` sends one request for one queue to its owner and follows MOVED /
 * TRYAGAIN / BUSY / unreachable with one budget per request. `bulk()` sends
 * a bulk op whose items may belong to many queues: it groups them by owner,
 * sends one frame per owner in parallel, and resends only the items that
 * failed with a retryable code (a MOVED item is re-routed alone).
 */
import { Connection, isLinkError } from "./connection.js";
import {
  BusyError, ConnectionClosedError, MovedError, ServerError, ShardqError, TryAgainError,
  UnavailableError, errorFromWire,
} from "./errors.js";
import { TopologyManager } from "./topology.js";

export interface RetryPolicy {
  maxRedirects: number;
  tryAgainBudgetMs: number;
  tryAgainRefreshAfterMs: number;
  busyBudgetMs: number;
  unavailableBudgetMs: number;
  backoffMinMs: number;
  backoffMaxMs: number;
}

export const DEFAULT_POLICY: RetryPolicy = {
  maxRedirects: 5, tryAgainBudgetMs: 5000, tryAgainRefreshAfterMs: 1000, busyBudgetMs: 5000,
  unavailableBudgetMs: 5000, backoffMinMs: 20, backoffMaxMs: 500,
};

interface Decision { delayMs: number; refresh: boolean }

/** The retry state of one logical request (all its resends); throws the final error. */
export class Budget {
  private redirects = 0;
  private readonly visited = new Set<string>();
  private tryAgainSince: number | null = null;
  private tryAgainRefreshed = false;
  private busySince: number | null = null;
  private downSince: number | null = null;
  private downAttempts = 0;

  constructor(private readonly policy: RetryPolicy, private readonly stats: ClusterStats) {}

  moved(err: MovedError, sentTo: string, stale: boolean): Decision {
    this.stats.moved++;
    if (stale) {
      // The broker has not learned the newer map yet: wait, resend to it.
      return this.tryAgain(new TryAgainError(`${sentTo} still routes slot ${err.slot} by epoch ${err.epoch}`, 50));
    }
    if (++this.redirects > this.policy.maxRedirects) throw err;
    this.visited.add(sentTo);
    return { delayMs: 0, refresh: this.visited.has(err.owner) };
  }

  tryAgain(err: TryAgainError): Decision {
    this.stats.tryAgain++;
    const now = performance.now();
    this.tryAgainSince ??= now;
    const waited = now - this.tryAgainSince;
    if (waited >= this.policy.tryAgainBudgetMs) throw err;
    let refresh = false;
    if (waited >= this.policy.tryAgainRefreshAfterMs && !this.tryAgainRefreshed) {
      this.tryAgainRefreshed = refresh = true;
    }
    return { delayMs: this.retryAfter(err.retryAfterMs), refresh };
  }

  busy(err: BusyError): Decision {
    this.stats.busy++;
    const now = performance.now();
    this.busySince ??= now;
    if (now - this.busySince >= this.policy.busyBudgetMs) throw err;
    return { delayMs: this.retryAfter(err.retryAfterMs), refresh: false };
  }

  unreachable(broker: string, err: unknown): Decision {
    const now = performance.now();
    this.downSince ??= now;
    if (now - this.downSince >= this.policy.unavailableBudgetMs) {
      throw new UnavailableError(broker, err instanceof Error ? err.message : String(err));
    }
    this.downAttempts++;
    const delayMs = Math.min(this.policy.backoffMinMs * 2 ** (this.downAttempts - 1), this.policy.backoffMaxMs);
    return { delayMs, refresh: true };
  }

  reached(): void {
    this.downSince = null;
    this.downAttempts = 0;
  }

  private retryAfter(ms: number): number {
    return Math.min(Math.max(ms, 1), this.policy.backoffMaxMs * 4);
  }
}

/** Counters of what the router went through (for tests and dashboards). */
export interface ClusterStats { moved: number; tryAgain: number; busy: number }

export type Connector = (addr: string) => Promise<Connection>;
export type ArgsBuilder = (brokerId: string, items: unknown[], round: number) => unknown;
export type ReplyParser = (brokerId: string, reply: unknown) => unknown[];

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class Cluster {
  readonly stats: ClusterStats = { moved: 0, tryAgain: 0, busy: 0 };
  private readonly conns = new Map<string, Connection>();
  private readonly opening = new Map<string, Promise<Connection>>();
  private readonly closedLanes = new Set<string>();
  private closed = false;

  constructor(readonly topology: TopologyManager, private readonly connector: Connector,
              readonly policy: RetryPolicy = DEFAULT_POLICY) {}

  /** Register an open connection (a seed asked for TOPOLOGY); false if one exists. */
  adopt(brokerId: string, conn: Connection): boolean {
    const key = `${brokerId}\0`;
    const old = this.conns.get(key);
    if (this.closed || (old && !old.closed)) return false;
    this.conns.set(key, conn);
    return true;
  }

  openConnections(): Connection[] {
    return [...this.conns.entries()].filter(([k, c]) => k.endsWith("\0") && !c.closed).map(([, c]) => c);
  }

  /** The open connection to `brokerId` at `addr` on `lane`; concurrent callers share one connect. */
  async connection(brokerId: string, addr: string, lane = ""): Promise<Connection> {
    const key = `${brokerId}\0${lane}`;
    const conn = this.conns.get(key);
    if (conn && !conn.closed && conn.addr === addr) return conn;
    if (this.closed || this.closedLanes.has(lane)) {
      throw new ConnectionClosedError(this.closed ? "client is closed" : "lane is closed");
    }
    let p = this.opening.get(key);
    if (!p) {
      p = (async () => {
        try {
          if (conn && !conn.closed) await conn.close(); // it now lives at another address
          const fresh = await this.connector(addr);
          if (this.closed || this.closedLanes.has(lane)) {
            await fresh.close();
            throw new ConnectionClosedError("closed while connecting");
          }
          this.conns.set(key, fresh);
          return fresh;
        } finally {
          this.opening.delete(key);
        }
      })();
      this.opening.set(key, p);
    }
    return p;
  }

  laneClosed(lane: string): boolean {
    return this.closed || this.closedLanes.has(lane);
  }

  /** Close a lane's connections for good (half-close: sent requests still get answers). */
  async closeLane(lane: string): Promise<void> {
    this.closedLanes.add(lane);
    const conns: Connection[] = [];
    for (const [k, c] of this.conns) {
      if (k.slice(k.indexOf("\0") + 1) === lane) {
        conns.push(c);
        this.conns.delete(k);
      }
    }
    await Promise.all(conns.map((c) => c.drainClose()));
  }

  async close(): Promise<void> {
    this.closed = true;
    const conns = [...this.conns.values()];
    this.conns.clear();
    await Promise.all(conns.map((c) => c.close()));
  }

  private async apply(d: Decision): Promise<void> {
    if (d.refresh) await this.topology.refresh();
    if (d.delayMs) await sleep(d.delayMs);
  }

  /**
   * Send one request for `queue` to its owner, with the protocol's retries.
   * @throws MovedError / TryAgainError / BusyError / UnavailableError past their budgets;
   *   any other ServerError at once.
   */
  async call(queue: string, op: string, args: unknown, timeoutMs?: number): Promise<unknown> {
    const budget = new Budget(this.policy, this.stats);
    for (;;) {
      const route = this.topology.route(queue);
      if (!route) {
        await this.apply(budget.unreachable("?", new ConnectionClosedError(`no broker owns queue ${JSON.stringify(queue)}`)));
        continue;
      }
      const [bid, addr] = route;
      let d: Decision;
      try {
        const conn = await this.connection(bid, addr);
        return await conn.request(op, args, timeoutMs);
      } catch (err) {
        d = this.decide(err, bid, budget);
      }
      await this.apply(d);
    }
  }

  private decide(err: unknown, bid: string, budget: Budget): Decision {
    if (err instanceof MovedError) {
      const stale = this.topology.isStale(err);
      this.topology.patch(err);
      return budget.moved(err, bid, stale);
    }
    if (err instanceof TryAgainError) return budget.tryAgain(err);
    if (err instanceof BusyError) return budget.busy(err);
    if (isLinkError(err) && !this.closed) return budget.unreachable(bid, err);
    throw err;
  }

  /**
   * Send a request to one given broker, retrying only link failures.
   * @throws UnavailableError the broker stayed unreachable; any ServerError as is.
   */
  async callBroker(brokerId: string, op: string, args: unknown, timeoutMs?: number, lane = ""): Promise<unknown> {
    const budget = new Budget(this.policy, this.stats);
    for (;;) {
      const addr = this.topology.topo.addrOf(brokerId);
      try {
        if (addr === null) throw new ConnectionClosedError(`broker ${brokerId} is not in the topology`);
        const conn = await this.connection(brokerId, addr, lane);
        return await conn.request(op, args, timeoutMs);
      } catch (err) {
        if (!isLinkError(err) || this.laneClosed(lane)) throw err;
        await this.apply(budget.unreachable(brokerId, err));
      }
    }
  }

  /**
   * Send a bulk op; one outcome per item, aligned with `items`: the item's
   * reply value, or the error it finally ended with (returned, not thrown).
   */
  async bulk(op: string, items: unknown[], queueOf: (item: unknown) => string,
             makeArgs: ArgsBuilder, parse?: ReplyParser): Promise<unknown[]> {
    const out: unknown[] = new Array(items.length).fill(null);
    let todo = items.map((_, i) => i);
    const budget = new Budget(this.policy, this.stats);
    for (let round = 0; todo.length; round++) {
      if (this.closed) {
        for (const i of todo) out[i] = new ConnectionClosedError("client is closed");
        break;
      }
      const groups = new Map<string, [string, number[]]>();
      const retry = new Map<string, Array<[number, unknown, string]>>();
      let lastQueue: string | null = null;
      let route: [string, string] | null = null;
      for (const i of todo) {
        const q = queueOf(items[i]);
        if (q !== lastQueue) { lastQueue = q; route = this.topology.route(q); }
        if (!route) { classify(retry, i, new ConnectionClosedError("no broker owns the queue"), "?", out); continue; }
        const g = groups.get(route[0]);
        if (g) g[1].push(i); else groups.set(route[0], [route[1], [i]]);
      }
      const entries = [...groups.entries()];
      const results = await Promise.allSettled(entries.map(([bid, [addr, idxs]]) =>
        this.sendFrame(op, bid, addr, idxs.map((i) => items[i]), makeArgs, parse, round)));
      entries.forEach(([bid, [, idxs]], n) => {
        const res = results[n]!;
        if (res.status === "rejected") {
          for (const i of idxs) classify(retry, i, res.reason, bid, out);
          return;
        }
        budget.reached();
        idxs.forEach((i, k) => {
          const v = res.value[k];
          if (Array.isArray(v) && v.length === 2 && typeof v[0] === "string") {
            classify(retry, i, errorFromWire(v[0], v[1]), bid, out);
          } else {
            out[i] = v;
          }
        });
      });
      todo = await this.settle(retry, budget, out);
    }
    return out;
  }

  private async sendFrame(op: string, bid: string, addr: string, items: unknown[],
                          makeArgs: ArgsBuilder, parse: ReplyParser | undefined, round: number): Promise<unknown[]> {
    const conn = await this.connection(bid, addr);
    await conn.waitWritable();
    const reply = await conn.request(op, makeArgs(bid, items, round));
    const result = parse ? parse(bid, reply) : reply;
    if (!Array.isArray(result) || result.length !== items.length) {
      throw new ServerError("BAD_REPLY", `${op} reply from ${bid} is not aligned with its ${items.length} items`);
    }
    return result;
  }

  private async settle(retry: Map<string, Array<[number, unknown, string]>>, budget: Budget, out: unknown[]): Promise<number[]> {
    const todo: number[] = [];
    const decisions: Decision[] = [];
    for (const [kind, entries] of retry) {
      const [, err, bid] = entries[0]!;
      try {
        if (kind === "MOVED") {
          const stale = this.topology.isStale(err as MovedError);
          for (const [, e] of entries) this.topology.patch(e as MovedError);
          decisions.push(budget.moved(err as MovedError, bid, stale));
        } else if (kind === "TRYAGAIN") {
          decisions.push(budget.tryAgain(err as TryAgainError));
        } else if (kind === "BUSY") {
          decisions.push(budget.busy(err as BusyError));
        } else {
          decisions.push(budget.unreachable(bid, err));
        }
      } catch (final) {
        for (const [i, e] of entries) out[i] = kind === "LINK" ? final : e;
        if (!(final instanceof ShardqError)) throw final;
        continue;
      }
      for (const [i] of entries) todo.push(i);
    }
    if (todo.length) {
      await this.apply({
        delayMs: Math.max(...decisions.map((d) => d.delayMs)),
        refresh: decisions.some((d) => d.refresh),
      });
    }
    return todo.sort((a, b) => a - b);
  }
}

function classify(retry: Map<string, Array<[number, unknown, string]>>, i: number, err: unknown, bid: string, out: unknown[]): void {
  let kind: string;
  if (err instanceof MovedError) kind = "MOVED";
  else if (err instanceof TryAgainError) kind = "TRYAGAIN";
  else if (err instanceof BusyError) kind = "BUSY";
  else if (isLinkError(err)) kind = "LINK";
  else { out[i] = err; return; }
  let list = retry.get(kind);
  if (!list) retry.set(kind, (list = []));
  list.push([i, err, bid]);
}
