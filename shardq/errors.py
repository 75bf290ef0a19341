"""Every error shardq raises, one class per wire code (docs/design.md §4).

    ShardqError
     ├── ServerError                  an error code answered by a broker
     │    ├── MovedError              MOVED: another broker owns the slot
     │    ├── TryAgainError           TRYAGAIN: slot frozen/importing (after retries)
     │    ├── StaleTermError          STALE_TERM: coordinator command from an older term
     │    ├── BusyError               BUSY: broker over its job/memory limit (after retries)
     │    ├── LockLostError           LOCK_LOST: token stale or lock expired
     │    ├── AuthError               AUTH: missing or wrong token
     │    ├── BadRequestError         BAD_REQUEST: malformed frame or arguments
     │    ├── TooLargeError           TOO_LARGE: frame or job data over the limit
     │    ├── NotFoundError           NOT_FOUND: no such job, queue or scheduler
     │    ├── OwnerUnavailableError   UNAVAILABLE: the map's owner cannot serve the slot
     │    │                           (its storage was lost); retried like a dead link
     │    ├── JobStateError           JOB_STATE: the job's state does not allow the action
     │    └── UnknownServerError      any code this client does not know
     ├── UnavailableError             (client side) owner unreachable past the budget
     ├── ConnectionClosedError        (client side) the connection closed under a request
     └── TlsError                     (client side) the TLS handshake failed: the peer's
                                      certificate is not trusted, or one side speaks
                                      TLS and the other does not (not retried)

    TimeoutError
     └── RequestTimeoutError          (client side) a sent request got no reply in time

`UnavailableError.maybe_applied`, `ConnectionClosedError.maybe_applied` and
`RequestTimeoutError.maybe_applied` say whether a request was sent before
the failure, so the broker may have applied it: the outcome is unknown.
Resending with the same job id (ids are made by the client) is safe: an add
whose id exists changes nothing, and a resent ACK/FAIL answers as the first.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ShardqError(Exception):
    """Root of every shardq exception."""


class ServerError(ShardqError):
    """An error code answered by a broker; `body` is the reply body."""

    code: ClassVar[str] = "ERROR"

    def __init__(self, message: str = "", body: Any = None) -> None:
        super().__init__(message or self.code)
        self.body = body

    def to_body(self) -> Any:
        """The wire body for this error (a message string by default)."""
        return self.body if self.body is not None else str(self)

    def to_item(self) -> list[Any]:
        """This error as one item's outcome in a bulk reply: `[code, body]`."""
        return [self.code, self.to_body()]


class MovedError(ServerError):
    code = "MOVED"

    def __init__(self, slot: int, owner: str, addr: str, epoch: int,
                 queue: str | None = None) -> None:
        super().__init__(f"slot {slot} moved to {owner} at {addr} (epoch {epoch})")
        self.slot, self.owner, self.addr, self.epoch, self.queue = slot, owner, addr, epoch, queue

    def to_body(self) -> Any:
        body = {"slot": self.slot, "owner": self.owner, "addr": self.addr, "epoch": self.epoch}
        if self.queue is not None:
            body["queue"] = self.queue
        return body


class TryAgainError(ServerError):
    code = "TRYAGAIN"

    def __init__(self, message: str = "slot is frozen for a handoff",
                 retry_after_ms: int = 10) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def to_body(self) -> Any:
        return {"retry_after_ms": self.retry_after_ms, "message": str(self)}


class StaleTermError(ServerError):
    code = "STALE_TERM"


class BusyError(ServerError):
    code = "BUSY"

    def __init__(self, message: str = "broker is over its limits",
                 retry_after_ms: int = 50) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def to_body(self) -> Any:
        return {"retry_after_ms": self.retry_after_ms, "message": str(self)}


class LockLostError(ServerError):
    code = "LOCK_LOST"


class AuthError(ServerError):
    code = "AUTH"


class BadRequestError(ServerError):
    code = "BAD_REQUEST"


class TooLargeError(ServerError):
    code = "TOO_LARGE"


class NotFoundError(ServerError):
    code = "NOT_FOUND"


class OwnerUnavailableError(ServerError):
    """The broker the map names for a slot will not serve it (its storage is lost).

    Clients retry it as they retry an unreachable owner, then raise
    `UnavailableError` with this message: the queue is unavailable, never empty.
    """

    code = "UNAVAILABLE"


class JobStateError(ServerError):
    """A job action refused for the job's state (removing an active job,
    promoting one that is not delayed, ...); `job_id` and `state` say which."""

    code = "JOB_STATE"

    def __init__(self, job_id: str, state: str, why: str, message: str | None = None) -> None:
        super().__init__(message or f"job {job_id!r} is {state}: {why}")
        self.job_id, self.state = job_id, state

    def to_body(self) -> Any:
        return {"id": self.job_id, "state": self.state, "message": str(self)}


class UnknownServerError(ServerError):
    """A code this client version does not know."""

    def __init__(self, code: str, body: Any) -> None:
        super().__init__(f"{code}: {body!r}", body)
        self.code_name = code


class UnavailableError(ShardqError):
    """The owner of a queue could not be reached within the retry budget.

    `maybe_applied` is true when some attempt was sent and never answered:
    the broker may have applied it (retry with the same id; it is safe).
    """

    def __init__(self, broker: str, reason: str = "", *, maybe_applied: bool = False) -> None:
        unknown = "; the request may have been applied (outcome unknown)" if maybe_applied else ""
        super().__init__(f"broker {broker} unavailable{': ' + reason if reason else ''}{unknown}")
        self.broker = broker
        self.maybe_applied = maybe_applied


class ConnectionClosedError(ShardqError):
    """The connection closed while a request was in flight (`maybe_applied`),
    or before it could be sent."""

    def __init__(self, message: str = "", *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class TlsError(ShardqError):
    """The TLS handshake with `addr` failed; retrying cannot help (wrong or
    missing `ssl_ca`, a cleartext peer, a refused client certificate)."""

    def __init__(self, addr: str, reason: str) -> None:
        super().__init__(f"TLS with {addr} failed: {reason}")
        self.addr = addr
        self.reason = reason


class RequestTimeoutError(TimeoutError):
    """A request was sent and no reply came within its timeout."""

    maybe_applied = True


_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        MovedError, TryAgainError, StaleTermError, BusyError, LockLostError,
        AuthError, BadRequestError, TooLargeError, NotFoundError, OwnerUnavailableError,
        JobStateError,
    )
}


def error_from_wire(code: str, body: Any) -> ServerError:
    """Turn a wire `[code, body]` into its typed exception."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return UnknownServerError(code, body)
    if cls is MovedError:
        b = body if isinstance(body, dict) else {}
        return MovedError(int(b.get("slot", -1)), str(b.get("owner", "")), str(b.get("addr", "")),
                          int(b.get("epoch", 0)), b.get("queue"))
    if cls is JobStateError:
        b = body if isinstance(body, dict) else {}
        return JobStateError(str(b.get("id", "")), str(b.get("state", "")), "",
                             str(b.get("message", code)))
    if cls is TryAgainError or cls is BusyError:
        b = body if isinstance(body, dict) else {}
        return cls(str(b.get("message", code)), int(b.get("retry_after_ms", 10)))
    return cls(str(body) if body is not None else code, body)
