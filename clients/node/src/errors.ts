/**
 * Every error shardq raises, one class per wire code (docs/protocol.md "Error codes").
 *
 *     ShardqError
 *      ├── ServerError              an error code answered by a broker (`code`, `body`)
 *      │    ├── MovedError          MOVED: another broker owns the slot (after the redirect budget)
 *      │    ├── TryAgainError       TRYAGAIN: slot frozen/importing (after the 5 s budget)
 *      │    ├── StaleTermError      STALE_TERM: coordinator command from an older term
 *      │    ├── BusyError           BUSY: broker over its limits (after the budget)
 *      │    ├── LockLostError       LOCK_LOST: token stale or lock expired
 *      │    ├── AuthError           AUTH: missing or wrong token
 *      │    ├── BadRequestError     BAD_REQUEST: malformed frame or arguments
 *      │    ├── TooLargeError       TOO_LARGE: frame or job data over the limit
 *      │    ├── NotFoundError       NOT_FOUND: no such job, queue or scheduler
 *      │    └── UnknownServerError  a code this client does not know
 *      ├── UnavailableError         (client side) owner unreachable past the budget
 *      ├── ConnectionClosedError    (client side) the link closed under a request
 *      └── RequestTimeoutError      (client side) no reply within the request timeout
 */

export class ShardqError extends Error {
  override name = "ShardqError";
}

export class ServerError extends ShardqError {
  override name = "ServerError";
  /** The wire code (`"MOVED"`, `"BAD_REQUEST"`, ...). */
  readonly code: string;
  /** The reply body as the broker sent it. */
  readonly body: unknown;

  constructor(code: string, message: string, body?: unknown) {
    super(message || code);
    this.code = code;
    this.body = body;
  }
}

export class MovedError extends ServerError {
  override name = "MovedError";
  constructor(
    readonly slot: number,
    readonly owner: string,
    readonly addr: string,
    readonly epoch: number,
    readonly queue: string | null = null,
    body?: unknown,
  ) {
    super("MOVED", `slot ${slot} moved to ${owner} at ${addr} (epoch ${epoch})`, body);
  }
}

export class TryAgainError extends ServerError {
  override name = "TryAgainError";
  constructor(message: string, readonly retryAfterMs: number = 10, body?: unknown) {
    super("TRYAGAIN", message, body);
  }
}

export class BusyError extends ServerError {
  override name = "BusyError";
  constructor(message: string, readonly retryAfterMs: number = 50, body?: unknown) {
    super("BUSY", message, body);
  }
}

function simple(code: string, className: string) {
  const cls = class extends ServerError {
    override name = className;
    constructor(message: string = code, body?: unknown) {
      super(code, message, body);
    }
  };
  Object.defineProperty(cls, "name", { value: className });
  return cls;
}

export const StaleTermError = simple("STALE_TERM", "StaleTermError");
export type StaleTermError = InstanceType<typeof StaleTermError>;
export const LockLostError = simple("LOCK_LOST", "LockLostError");
export type LockLostError = InstanceType<typeof LockLostError>;
export const AuthError = simple("AUTH", "AuthError");
export type AuthError = InstanceType<typeof AuthError>;
export const BadRequestError = simple("BAD_REQUEST", "BadRequestError");
export type BadRequestError = InstanceType<typeof BadRequestError>;
export const TooLargeError = simple("TOO_LARGE", "TooLargeError");
export type TooLargeError = InstanceType<typeof TooLargeError>;
export const NotFoundError = simple("NOT_FOUND", "NotFoundError");
export type NotFoundError = InstanceType<typeof NotFoundError>;

export class UnknownServerError extends ServerError {
  override name = "UnknownServerError";
  constructor(code: string, body: unknown) {
    super(code, `${code}: ${describe(body)}`, body);
  }
}

export class UnavailableError extends ShardqError {
  override name = "UnavailableError";
  constructor(readonly broker: string, reason = "") {
    super(`broker ${broker} unavailable${reason ? ": " + reason : ""}`);
  }
}

export class ConnectionClosedError extends ShardqError {
  override name = "ConnectionClosedError";
}

export class RequestTimeoutError extends ShardqError {
  override name = "RequestTimeoutError";
}

function describe(body: unknown): string {
  if (typeof body === "string") return body;
  try {
    return JSON.stringify(body, (_k, v) => (typeof v === "bigint" ? v.toString() : v));
  } catch {
    return String(body);
  }
}

function num(v: unknown, dflt: number): number {
  return typeof v === "number" ? v : typeof v === "bigint" ? Number(v) : dflt;
}

/** Turn a wire `[code, body]` into its typed error. */
export function errorFromWire(code: string, body: unknown): ServerError {
  const b = body !== null && typeof body === "object" && !(body instanceof Uint8Array)
    ? (body as Record<string, unknown>) : {};
  const message = typeof body === "string" ? body : typeof b["message"] === "string" ? (b["message"] as string) : code;
  switch (code) {
    case "MOVED":
      return new MovedError(num(b["slot"], -1), String(b["owner"] ?? ""), String(b["addr"] ?? ""),
        num(b["epoch"], 0), typeof b["queue"] === "string" ? (b["queue"] as string) : null, body);
    case "TRYAGAIN":
      return new TryAgainError(message, num(b["retry_after_ms"], 10), body);
    case "BUSY":
      return new BusyError(message, num(b["retry_after_ms"], 50), body);
    case "STALE_TERM":
      return new StaleTermError(message, body);
    case "LOCK_LOST":
      return new LockLostError(message, body);
    case "AUTH":
      return new AuthError(message, body);
    case "BAD_REQUEST":
      return new BadRequestError(message, body);
    case "TOO_LARGE":
      return new TooLargeError(message, body);
    case "NOT_FOUND":
      return new NotFoundError(message, body);
    default:
      return new UnknownServerError(code, body);
  }
}
