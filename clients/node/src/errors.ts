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
 *      │    ├── OwnerUnavailableError UNAVAILABLE: the map's owner lost its storage;
 *      │    │                       retried like an unreachable owner, then UnavailableError
 *      │    ├── JobStateError       JOB_STATE: the job's state does not allow the action
 *      │    └── UnknownServerError  a code this client does not know
 *      ├── UnavailableError         (client side) owner unreachable past the budget
 *      ├── ConnectionClosedError    (client side) the link closed under a request
 *      └── RequestTimeoutError      (client side) no reply within the request timeout
 *
 * `maybeApplied` (UnavailableError, ConnectionClosedError, RequestTimeoutError)
 * is true when a request was sent and never answered: the broker may have
 * applied it, the outcome is unknown. Resending with the same job id is safe
 * (client-made ids; a resent ACK/FAIL answers as the first did).
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

/**
 * UNAVAILABLE: the broker the map names for the slot will not serve it (its
 * storage was lost, docs/design.md §3.2). The router retries it like an
 * unreachable owner and then throws UnavailableError: the queue is
 * unavailable, never empty.
 */
export const OwnerUnavailableError = simple("UNAVAILABLE", "OwnerUnavailableError");
export type OwnerUnavailableError = InstanceType<typeof OwnerUnavailableError>;

/** JOB_STATE: a job action refused for the job's state; `jobId` and `state` say which. */
export class JobStateError extends ServerError {
  override name = "JobStateError";
  readonly jobId: string;
  readonly state: string;
  constructor(jobId: string, state: string, message?: string, body?: unknown) {
    super("JOB_STATE", message ?? `job ${JSON.stringify(jobId)} is ${state}`, body);
    this.jobId = jobId;
    this.state = state;
  }
}

export class UnknownServerError extends ServerError {
  override name = "UnknownServerError";
  constructor(code: string, body: unknown) {
    super(code, `${code}: ${describe(body)}`, body);
  }
}

/**
 * The owner of a queue could not be reached (or could not serve, UNAVAILABLE)
 * within the retry budget. `maybeApplied`: some attempt was sent and never
 * answered, so the broker may have applied it (resend with the same id).
 */
export class UnavailableError extends ShardqError {
  override name = "UnavailableError";
  readonly maybeApplied: boolean;
  constructor(readonly broker: string, reason = "", opts: { maybeApplied?: boolean } = {}) {
    const unknown = opts.maybeApplied ? "; the request may have been applied (outcome unknown)" : "";
    super(`broker ${broker} unavailable${reason ? ": " + reason : ""}${unknown}`);
    this.maybeApplied = opts.maybeApplied ?? false;
  }
}

/** The link closed under a request (`maybeApplied`), or before it could be sent. */
export class ConnectionClosedError extends ShardqError {
  override name = "ConnectionClosedError";
  readonly maybeApplied: boolean;
  constructor(message = "", opts: { maybeApplied?: boolean } = {}) {
    super(message);
    this.maybeApplied = opts.maybeApplied ?? false;
  }
}

/** The TLS handshake failed (certificate not trusted, or a cleartext peer): not retried. */
export class TlsError extends ShardqError {
  override name = "TlsError";
  constructor(readonly addr: string, readonly reason: string) {
    super(`TLS with ${addr} failed: ${reason}`);
  }
}

/** A sent request got no reply in time: it may have been applied. */
export class RequestTimeoutError extends ShardqError {
  override name = "RequestTimeoutError";
  readonly maybeApplied = true;
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
    case "UNAVAILABLE":
      return new OwnerUnavailableError(message, body);
    case "JOB_STATE":
      return new JobStateError(String(b["id"] ?? ""), String(b["state"] ?? ""), message, body);
    default:
      return new UnknownServerError(code, body);
  }
}
