"""Errors the coordinator answers over HTTP, one class per status code.

    CoordinatorError            500 unless a subclass says otherwise
     ├── BadRequest             400: malformed body or arguments
     ├── Unauthorized           401: missing or wrong bearer token
     ├── Forbidden              403: the broker id is barred (forgotten)
     ├── NotFound               404: no such broker
     └── Conflict               409: the request contradicts the current state

These stay inside the coordinator and its HTTP API; the wire codes brokers
and clients exchange are in `shardq.errors`.
"""

from __future__ import annotations

from typing import ClassVar


class CoordinatorError(Exception):
    """A request the coordinator refuses; `status` is the HTTP status code."""

    status: ClassVar[int] = 500


class BadRequest(CoordinatorError):
    status = 400


class Unauthorized(CoordinatorError):
    status = 401


class Forbidden(CoordinatorError):
    status = 403


class NotFound(CoordinatorError):
    status = 404


class Conflict(CoordinatorError):
    status = 409
