/**
 * The client's copy of the topology (docs/protocol.md "Topology"): who owns
 * each slot at which epoch, patched by MOVED, refreshed whole when a reply
 * carries a newer epoch (coalesced: one fetch at a time, at most every 100 ms).
 */
import { MovedError, ShardqError } from "./errors.js";
import { NUM_SLOTS, slotOf } from "./slots.js";

export interface BrokerInfo {
  id: string;
  addr: string;
  state: string;
  weight: number;
}

/** The topology map, parsed from the coordinator's JSON or a broker's TOPOLOGY reply. */
export class Topology {
  term = 0;
  epoch = 0;
  brokers = new Map<string, BrokerInfo>();
  slotOwners: Array<string | null> = new Array(NUM_SLOTS).fill(null);
  slotEpochs: number[] = new Array(NUM_SLOTS).fill(0);
  overrides = new Map<string, [string, number]>();
  partitions = new Map<string, number>();

  static standalone(brokerId: string, addr: string): Topology {
    const t = new Topology();
    t.epoch = 1;
    t.brokers.set(brokerId, { id: brokerId, addr, state: "active", weight: 1 });
    t.slotOwners.fill(brokerId);
    t.slotEpochs.fill(1);
    return t;
  }

  /** @throws ShardqError a malformed map. */
  static fromDict(d: unknown): Topology {
    if (!d || typeof d !== "object") throw new ShardqError("topology must be a map");
    const m = d as Record<string, unknown>;
    const t = new Topology();
    t.term = Number(m["term"] ?? 0);
    t.epoch = Number(m["epoch"]);
    if (!Number.isInteger(t.epoch)) throw new ShardqError("topology is missing its epoch");
    for (const [id, info] of Object.entries((m["brokers"] ?? {}) as Record<string, Record<string, unknown>>)) {
      t.brokers.set(id, { id, addr: String(info["addr"]), state: String(info["state"] ?? "active"), weight: Number(info["weight"] ?? 1) });
    }
    for (const run of (m["slots"] ?? []) as unknown[][]) {
      const [start, end, owner, epoch] = run as [number, number, string, number];
      if (!(start >= 0 && end < NUM_SLOTS && start <= end)) throw new ShardqError(`bad slot run ${JSON.stringify(run)}`);
      t.slotOwners.fill(owner, start, end + 1);
      t.slotEpochs.fill(Number(epoch), start, end + 1);
    }
    for (const [q, entry] of Object.entries((m["overrides"] ?? {}) as Record<string, [string, number]>)) {
      t.overrides.set(q, [entry[0], Number(entry[1])]);
    }
    for (const [q, p] of Object.entries((m["partitions"] ?? {}) as Record<string, number>)) {
      t.partitions.set(q, Number(p));
    }
    return t;
  }

  /** [brokerId, addr] serving a stored queue name, or null (unowned / address unknown). */
  route(queue: string): [string, string] | null {
    const override = this.overrides.size ? this.overrides.get(queue) : undefined;
    const owner = override ? override[0] : this.slotOwners[slotOf(queue)];
    if (!owner) return null;
    const info = this.brokers.get(owner);
    return info ? [owner, info.addr] : null;
  }

  addrOf(brokerId: string): string | null {
    return this.brokers.get(brokerId)?.addr ?? null;
  }

  /** Apply one MOVED; ignored when older than what the entry has. */
  patch(err: MovedError): void {
    if (!err.owner || !err.addr) return;
    if (err.queue !== null) {
      const cur = this.overrides.get(err.queue);
      if (cur && err.epoch < cur[1]) return;
      this.overrides.set(err.queue, [err.owner, err.epoch]);
    } else {
      if (err.slot < 0 || err.slot >= NUM_SLOTS || err.epoch < this.slotEpochs[err.slot]!) return;
      this.slotOwners[err.slot] = err.owner;
      this.slotEpochs[err.slot] = err.epoch;
    }
    const info = this.brokers.get(err.owner);
    if (!info) this.brokers.set(err.owner, { id: err.owner, addr: err.addr, state: "active", weight: 1 });
    else info.addr = err.addr;
  }

  /** The broker that answered MOVED knows an older owner than this map does. */
  isStale(err: MovedError): boolean {
    if (err.queue !== null) {
      const known = this.overrides.get(err.queue);
      return known !== undefined && err.epoch < known[1];
    }
    return err.slot >= 0 && err.slot < NUM_SLOTS && err.epoch < this.slotEpochs[err.slot]!;
  }
}

export type TopologySource = () => Promise<Topology>;

const REFRESH_MIN_INTERVAL_MS = 100;

/** Holds the current Topology and keeps it fresh. */
export class TopologyManager {
  version = 0;
  refreshes = 0;
  private lastFetch = -Infinity;
  private inflight: Promise<void> | null = null;
  private waiters: Array<() => void> = [];
  private closed = false;

  constructor(public topo: Topology, readonly sources: TopologySource[]) {}

  route(queue: string): [string, string] | null {
    return this.topo.route(queue);
  }

  private bump(): void {
    this.version++;
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Resolves once the version differs from `seen` (or the manager closes). */
  waitChanged(seen: number): Promise<number> {
    if (this.version !== seen || this.closed) return Promise.resolve(this.version);
    return new Promise((resolve) => this.waiters.push(() => resolve(this.version)));
  }

  patch(err: MovedError): void {
    this.topo.patch(err);
    this.bump();
  }

  isStale(err: MovedError): boolean {
    return this.topo.isStale(err);
  }

  /** Adopt `topo` unless it is older than the current map. */
  replace(topo: Topology): boolean {
    if (topo.epoch < this.topo.epoch) return false;
    this.topo = topo;
    this.bump();
    return true;
  }

  /** A reply carried `epoch`: refresh in the background if it is newer. */
  noteEpoch(epoch: number): void {
    if (epoch > this.topo.epoch && !this.closed) void this.refresh();
  }

  /** Fetch the whole map now, or join the fetch in flight; never throws. */
  refresh(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.inflight ??= this.doRefresh().finally(() => { this.inflight = null; });
    return this.inflight;
  }

  private async doRefresh(): Promise<void> {
    const wait = this.lastFetch + REFRESH_MIN_INTERVAL_MS - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    this.lastFetch = performance.now();
    this.refreshes++;
    for (const source of this.sources) {
      try {
        if (this.replace(await source())) return;
      } catch {
        // an unreachable source: try the next; routing keeps the map it has
      }
    }
  }

  close(): void {
    this.closed = true;
    this.bump();
  }
}
