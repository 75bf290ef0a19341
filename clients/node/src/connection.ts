/**
 * One pipelined connection to one broker: the only owner of request ids,
 * reply promises, timeouts and write backpressure (docs/protocol.md
 * "Requests and replies"). Routing and the Queue/Worker API sit above it and
 * never see a request id.
 *
 * Frames written in one turn of the event loop are sent with one socket
 * write (`setImmediate` flush), so many small requests cost one syscall.
 * Every reply carries the broker's topology epoch; a newer one than seen so
 * far is reported through `onEpoch` so the router can refresh its map.
 *
 * Liveness (as the Python client, client/connection.py): a connection silent
 * either way for `pingIntervalMs` sends PING; no pong within `pingTimeoutMs`
 * means the link is dead (a peer gone without a FIN, a NAT that dropped its
 * mapping): it is aborted, its requests fail as retryable link errors with
 * `maybeApplied` true, and the router re-dials. A request timeout also sends
 * a PING at once, to tell a slow broker from a dead link.
 */
import net from "node:net";
import tls from "node:tls";
import { BadFrame, DEFAULT_MAX_FRAME, FrameDecoder, encodeFrame } from "./codec.js";
import {
  BadRequestError, BusyError, ConnectionClosedError, OwnerUnavailableError, RequestTimeoutError, ShardqError, TlsError,
  TooLargeError, errorFromWire,
} from "./errors.js";

export const PROTOCOL_VERSION = 1;
export const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
export const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;
/** Silence (either way) before a PING; brokers close links idle past --idle-timeout (300 s). */
export const DEFAULT_PING_INTERVAL_MS = 5_000;
/** A pong later than this marks the link dead (10 s, as the Python client: 5 s fired spuriously under heavy load). */
export const DEFAULT_PING_TIMEOUT_MS = 10_000;
const DIRECT_WRITE_BYTES = 16 * 1024;

interface Pending {
  resolve(v: unknown): void;
  reject(e: unknown): void;
  timer: NodeJS.Timeout | undefined;
  op: string;
}

export type PushHandler = (body: unknown | null) => void;

/** `host:port` (IPv6 as `[::1]:7101`) -> [host, port]. */
export function splitAddr(addr: string): [string, number] {
  const i = addr.lastIndexOf(":");
  const port = addr.slice(i + 1);
  if (i <= 0 || !/^\d+$/.test(port)) throw new RangeError(`broker address must be host:port, got ${JSON.stringify(addr)}`);
  return [addr.slice(0, i).replace(/^\[|\]$/g, ""), Number(port)];
}

export class Connection {
  brokerId = "";
  maxEpoch = 0;
  framesSent = 0;
  /** The broker's frame limit (HELLO's `max_frame`): larger requests are refused here. */
  peerMaxFrame = DEFAULT_MAX_FRAME;
  /** HELLO's `role`: "client" (queue ops) or "control" (control ops too; docs/protocol.md "Roles"). */
  role = "";
  private readonly decoder: FrameDecoder;
  private readonly pending = new Map<number, Pending>();
  private readonly pushes = new Map<number, PushHandler>();
  private nextId = 1;
  private wbuf: Buffer[] = [];
  private closeReason: Error | null = null;
  private readonly closedPromise: Promise<void>;
  private pingTimer: NodeJS.Timeout | undefined = undefined;
  private pingOut = false;
  private lastRx = performance.now();
  private lastTx = performance.now();
  /** PINGs sent by the liveness timer (for tests). */
  pingsSent = 0;

  private constructor(
    readonly addr: string,
    private readonly socket: net.Socket,
    private readonly onEpoch: ((conn: Connection, epoch: number) => void) | undefined,
    readonly requestTimeoutMs: number,
    maxFrame: number,
    private readonly pingIntervalMs: number = DEFAULT_PING_INTERVAL_MS,
    private readonly pingTimeoutMs: number = DEFAULT_PING_TIMEOUT_MS,
  ) {
    this.decoder = new FrameDecoder(maxFrame);
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    this.closedPromise = new Promise((resolve) => {
      socket.on("close", () => {
        this.stopPings();
        this.fail(this.closeReason ?? new ConnectionClosedError(`connection to ${addr} lost`));
        resolve();
      });
    });
    socket.on("error", (err) => {
      this.closeReason ??= new ConnectionClosedError(`connection to ${addr} lost: ${err.message}`);
    });
  }

  /**
   * Connect and complete HELLO.
   * @throws AuthError the broker refused the token; ConnectionClosedError / RequestTimeoutError otherwise.
   */
  static async open(addr: string, opts: {
    token?: string | undefined; clientName?: string | undefined;
    onEpoch?: ((conn: Connection, epoch: number) => void) | undefined;
    connectTimeoutMs?: number | undefined; requestTimeoutMs?: number | undefined;
    /** ms of silence before a PING (0: never ping). */
    pingIntervalMs?: number | undefined;
    pingTimeoutMs?: number | undefined;
    /** TLS to the broker (`ca`, `cert`, `key`, as `tls.connect` takes them); the host name is verified. */
    tls?: tls.ConnectionOptions | undefined;
  } = {}): Promise<Connection> {
    const [host, port] = splitAddr(addr);
    const connectTimeout = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const secure = opts.tls !== undefined;
      const s: net.Socket = secure
        ? tls.connect({ ...opts.tls, host, port, servername: net.isIP(host) ? undefined : host })
        : net.connect({ host, port });
      const timer = setTimeout(() => {
        s.destroy();
        // Nothing was sent: no request can have been applied.
        reject(new ConnectionClosedError(`connect to ${addr} timed out`));
      }, connectTimeout);
      s.once(secure ? "secureConnect" : "connect", () => { clearTimeout(timer); s.removeAllListeners("error"); resolve(s); });
      s.once("error", (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        // A certificate error, or a handshake a cleartext listener cut short: retrying cannot help.
        const tlsFailure = secure && /CERT|SSL|TLS|self.signed|certificate/i.test(`${err.code ?? ""} ${err.message}`);
        reject(tlsFailure ? new TlsError(addr, err.code ?? err.message)
          : new ConnectionClosedError(`connect to ${addr} failed: ${err.message}`));
      });
    });
    const conn = new Connection(addr, socket, opts.onEpoch, opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
      DEFAULT_MAX_FRAME, opts.pingIntervalMs ?? DEFAULT_PING_INTERVAL_MS, opts.pingTimeoutMs ?? DEFAULT_PING_TIMEOUT_MS);
    const hello: Record<string, unknown> = { version: PROTOCOL_VERSION, client: opts.clientName ?? `shardq-node/${process.pid}` };
    if (opts.token !== undefined) hello["token"] = opts.token;
    try {
      const reply = (await conn.request("HELLO", hello, connectTimeout)) as Record<string, unknown> | null;
      if (reply && typeof reply === "object") {
        conn.brokerId = String(reply["broker_id"] ?? "");
        const epoch = reply["epoch"];
        if (typeof epoch === "number" && epoch > conn.maxEpoch) conn.maxEpoch = epoch;
        if (typeof reply["max_frame"] === "number") conn.peerMaxFrame = reply["max_frame"];
        if (typeof reply["role"] === "string") conn.role = reply["role"];
      }
    } catch (err) {
      conn.abort(new ConnectionClosedError("HELLO failed"));
      // Only HELLO was sent: no request of the caller's can have been applied.
      if (err instanceof RequestTimeoutError) throw new ConnectionClosedError(`HELLO to ${addr} timed out`);
      if (err instanceof ConnectionClosedError && err.maybeApplied) throw new ConnectionClosedError(err.message);
      throw err;
    }
    conn.startPings();
    return conn;
  }

  get closed(): boolean {
    return this.closeReason !== null || this.socket.destroyed;
  }

  get inFlight(): number {
    return this.pending.size;
  }

  /**
   * Send one request; resolves to the reply body, rejects with the typed
   * ServerError for an error status, RequestTimeoutError after `timeoutMs`
   * (default the connection's; 0 = none) or ConnectionClosedError.
   */
  request(op: string, args: unknown, timeoutMs?: number, onPush?: PushHandler): Promise<unknown> {
    if (this.closed) {
      return Promise.reject(this.closeReason ?? new ConnectionClosedError(`${this.addr} closed`));
    }
    const rid = this.nextId++;
    let frame: Buffer;
    try {
      frame = encodeFrame([rid, op, args]);
    } catch (err) {
      return Promise.reject(new BadRequestError(`${op} args cannot be packed: ${(err as Error).message}`));
    }
    if (frame.length - 4 > this.peerMaxFrame) {
      // The broker would close the link on it (it cannot resync after a bad length).
      return Promise.reject(new TooLargeError(`${op} frame of ${frame.length - 4} bytes exceeds the broker's limit ${this.peerMaxFrame}`));
    }
    return new Promise((resolve, reject) => {
      const t = timeoutMs ?? this.requestTimeoutMs;
      const timer = t > 0 ? setTimeout(() => this.expire(rid), t) : undefined;
      this.pending.set(rid, { resolve, reject, timer, op });
      if (onPush) this.pushes.set(rid, onPush);
      this.write(frame);
    });
  }

  private expire(rid: number): void {
    const p = this.pending.get(rid);
    if (!p) return;
    this.pending.delete(rid);
    this.pushes.delete(rid);
    p.reject(new RequestTimeoutError(`${p.op} to ${this.addr} timed out`));
    if (p.op !== "PING" && this.pingTimer !== undefined) this.sendPing(); // slow broker or dead link?
  }

  // -- liveness ----------------------------------------------------------------

  private startPings(): void {
    if (this.pingIntervalMs > 0 && this.pingTimer === undefined && !this.closed) {
      this.pingTimer = setInterval(() => this.pingTick(), this.pingIntervalMs / 2);
      this.pingTimer.unref(); // the socket, not the timer, keeps a process alive
    }
  }

  private stopPings(): void {
    if (this.pingTimer !== undefined) clearInterval(this.pingTimer);
    this.pingTimer = undefined;
  }

  private pingTick(): void {
    if (this.closed) { this.stopPings(); return; }
    // Idle in either direction: a subscriber that only receives still has to
    // show the broker it is alive.
    if (performance.now() - Math.min(this.lastRx, this.lastTx) >= this.pingIntervalMs) this.sendPing();
  }

  private sendPing(): void {
    if (this.pingOut || this.closed) return;
    this.pingOut = true;
    this.pingsSent++;
    this.request("PING", {}, this.pingTimeoutMs).then(
      () => { this.pingOut = false; },
      (err) => {
        this.pingOut = false;
        if (err instanceof RequestTimeoutError && !this.closed) {
          this.abort(new ConnectionClosedError(`no pong from ${this.addr} within ${this.pingTimeoutMs} ms; link presumed dead`));
        }
      });
  }

  private write(frame: Buffer): void {
    this.framesSent++;
    if (frame.length >= DIRECT_WRITE_BYTES) {
      // A big frame (a bulk ADD) goes out now, so the broker works on it while
      // this process builds the next one; corking it would gain nothing.
      this.flush();
      if (!this.socket.destroyed) {
        this.lastTx = performance.now();
        this.socket.write(frame);
      }
      return;
    }
    if (this.wbuf.length === 0) setImmediate(() => this.flush());
    this.wbuf.push(frame);
  }

  private flush(): void {
    const buf = this.wbuf;
    this.wbuf = [];
    if (buf.length && !this.socket.destroyed) {
      this.lastTx = performance.now();
      this.socket.write(buf.length === 1 ? buf[0]! : Buffer.concat(buf));
    }
  }

  /** Resolves once the socket's write buffer is below its high-water mark. */
  async waitWritable(): Promise<void> {
    if (!this.socket.writableNeedDrain || this.closed) return;
    await new Promise<void>((resolve) => {
      const done = () => { this.socket.off("drain", done); this.socket.off("close", done); resolve(); };
      this.socket.on("drain", done);
      this.socket.on("close", done);
    });
  }

  private onData(chunk: Buffer): void {
    this.lastRx = performance.now();
    let frames: unknown[];
    try {
      frames = this.decoder.feed(chunk);
    } catch (err) {
      this.abort(err as Error);
      return;
    }
    for (const frame of frames) {
      if (frame instanceof BadFrame || !Array.isArray(frame) || frame.length < 3) {
        // A reply we cannot attribute poisons the pipeline: fail everything.
        this.abort(new ConnectionClosedError(`malformed reply from ${this.addr}`));
        return;
      }
      this.onReply(frame);
    }
  }

  private onReply(frame: unknown[]): void {
    const rid = frame[0] as number;
    const status = frame[1];
    if (status === "push") {
      this.pushes.get(rid)?.(frame[2]);
      return;
    }
    const epoch = frame[3];
    if (typeof epoch === "number" && epoch > this.maxEpoch) {
      this.maxEpoch = epoch;
      this.onEpoch?.(this, epoch);
    }
    if (rid === 0 && status !== "ok") {
      // An error naming no request: the broker says why it closes the link
      // (handshake deadline, idle, oversized frame), or that it is full (BUSY).
      this.abort(unsolicitedError(this.addr, String(status), frame[2]));
      return;
    }
    const p = this.pending.get(rid);
    if (!p) return; // timed out and forgotten
    this.pending.delete(rid);
    if (p.timer) clearTimeout(p.timer);
    if (status === "ok") {
      p.resolve(frame[2]);
    } else {
      this.pushes.delete(rid);
      p.reject(errorFromWire(String(status), frame[2]));
    }
  }

  private fail(err: Error): void {
    if (err instanceof ConnectionClosedError && !err.maybeApplied) {
      // These were sent (or about to be): the broker may have applied them.
      err = new ConnectionClosedError(err.message, { maybeApplied: true });
    }
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(err);
    }
    const pushes = [...this.pushes.values()];
    this.pushes.clear();
    for (const h of pushes) h(null);
  }

  /** Drop the link at once; pending requests fail with `err`. */
  abort(err: Error = new ConnectionClosedError(`connection to ${this.addr} closed`)): void {
    this.stopPings();
    this.closeReason ??= err;
    this.fail(this.closeReason);
    this.socket.destroy();
  }

  /**
   * Half-close: no new requests, send FIN, let requests already sent be
   * answered (a parked long-poll PULL included); aborts after `timeoutMs`.
   */
  async drainClose(timeoutMs = DEFAULT_CONNECT_TIMEOUT_MS): Promise<void> {
    if (this.socket.destroyed) return;
    this.closeReason ??= new ConnectionClosedError(`connection to ${this.addr} closed`);
    this.flush();
    this.socket.end();
    const timer = setTimeout(() => this.abort(new ConnectionClosedError(`${this.addr} did not close after EOF`)), timeoutMs);
    await this.closedPromise;
    clearTimeout(timer);
  }

  /** Close now; pending requests fail with ConnectionClosedError. */
  async close(): Promise<void> {
    this.stopPings();
    this.closeReason ??= new ConnectionClosedError(`connection to ${this.addr} closed`);
    this.fail(this.closeReason);
    this.flush();
    this.socket.destroy();
    await this.closedPromise;
  }
}

/**
 * Errors that mean "the link, not the broker's answer": reconnect and resend.
 * UNAVAILABLE (OwnerUnavailableError) counts as one: the owner is up but lost
 * its storage, so wait for the map to change as for a dead owner.
 */
export function isLinkError(err: unknown): boolean {
  return err instanceof ConnectionClosedError || err instanceof RequestTimeoutError
    || err instanceof OwnerUnavailableError
    || (err instanceof Error && !(err instanceof ShardqError) && "code" in err && typeof (err as { code: unknown }).code === "string");
}

/** A rid-0 error frame: BUSY stays BUSY (backed off and retried), the rest are link failures. */
function unsolicitedError(addr: string, code: string, body: unknown): Error {
  const err = errorFromWire(code, body);
  if (err instanceof BusyError) return err;
  return new ConnectionClosedError(`${addr} closed the connection: ${code}: ${err.message}`);
}
