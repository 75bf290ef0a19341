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
 */
import net from "node:net";
import { BadFrame, DEFAULT_MAX_FRAME, FrameDecoder, encodeFrame } from "./codec.js";
import {
  BadRequestError, ConnectionClosedError, RequestTimeoutError, ShardqError, TooLargeError, errorFromWire,
} from "./errors.js";

export const PROTOCOL_VERSION = 1;
export const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
export const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;
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
  private readonly decoder: FrameDecoder;
  private readonly pending = new Map<number, Pending>();
  private readonly pushes = new Map<number, PushHandler>();
  private nextId = 1;
  private wbuf: Buffer[] = [];
  private closeReason: Error | null = null;
  private readonly closedPromise: Promise<void>;

  private constructor(
    readonly addr: string,
    private readonly socket: net.Socket,
    private readonly onEpoch: ((conn: Connection, epoch: number) => void) | undefined,
    readonly requestTimeoutMs: number,
    maxFrame: number,
  ) {
    this.decoder = new FrameDecoder(maxFrame);
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    this.closedPromise = new Promise((resolve) => {
      socket.on("close", () => {
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
  } = {}): Promise<Connection> {
    const [host, port] = splitAddr(addr);
    const connectTimeout = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect({ host, port });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new RequestTimeoutError(`connect to ${addr} timed out`));
      }, connectTimeout);
      s.once("connect", () => { clearTimeout(timer); s.removeAllListeners("error"); resolve(s); });
      s.once("error", (err) => { clearTimeout(timer); reject(new ConnectionClosedError(`connect to ${addr} failed: ${err.message}`)); });
    });
    const conn = new Connection(addr, socket, opts.onEpoch, opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS, DEFAULT_MAX_FRAME);
    const hello: Record<string, unknown> = { version: PROTOCOL_VERSION, client: opts.clientName ?? `shardq-node/${process.pid}` };
    if (opts.token !== undefined) hello["token"] = opts.token;
    try {
      const reply = (await conn.request("HELLO", hello, connectTimeout)) as Record<string, unknown> | null;
      if (reply && typeof reply === "object") {
        conn.brokerId = String(reply["broker_id"] ?? "");
        const epoch = reply["epoch"];
        if (typeof epoch === "number" && epoch > conn.maxEpoch) conn.maxEpoch = epoch;
        if (typeof reply["max_frame"] === "number") conn.peerMaxFrame = reply["max_frame"];
      }
    } catch (err) {
      conn.abort(new ConnectionClosedError("HELLO failed"));
      throw err;
    }
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
  }

  private write(frame: Buffer): void {
    this.framesSent++;
    if (frame.length >= DIRECT_WRITE_BYTES) {
      // A big frame (a bulk ADD) goes out now, so the broker works on it while
      // this process builds the next one; corking it would gain nothing.
      this.flush();
      if (!this.socket.destroyed) this.socket.write(frame);
      return;
    }
    if (this.wbuf.length === 0) setImmediate(() => this.flush());
    this.wbuf.push(frame);
  }

  private flush(): void {
    const buf = this.wbuf;
    this.wbuf = [];
    if (buf.length && !this.socket.destroyed) {
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
    const p = this.pending.get(rid);
    if (!p) return; // timed out, or an unsolicited frame (rid 0: a refusal before close)
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
    this.closeReason ??= new ConnectionClosedError(`connection to ${this.addr} closed`);
    this.fail(this.closeReason);
    this.flush();
    this.socket.destroy();
    await this.closedPromise;
  }
}

export function isLinkError(err: unknown): boolean {
  return err instanceof ConnectionClosedError || err instanceof RequestTimeoutError
    || (err instanceof Error && !(err instanceof ShardqError) && "code" in err && typeof (err as { code: unknown }).code === "string");
}
