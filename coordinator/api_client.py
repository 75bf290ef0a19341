"""A small synchronous client for the coordinator's HTTP API, used by the CLI."""

from __future__ import annotations

from typing import Any

import httpx

from shardq import coordinator_http

DEFAULT_URL = "http://127.0.0.1:7070"


class CoordinatorCallError(Exception):
    """A coordinator call failed; the message says why, for a human."""


class CoordinatorUnreachable(CoordinatorCallError):
    """No answer (refused, timed out, DNS...)."""


class CoordinatorRefused(CoordinatorCallError):
    """An answer with an error status; `status` is the HTTP code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CoordinatorApi:
    """Calls `GET /status`, `GET /topology`, `POST /brokers/{id}/forget|drain|undrain`,
    `GET|POST /rebalance`...

    Args:
        url: the coordinator's base URL.
        token: bearer token, if the coordinator has one.
        timeout_s: per-request timeout.
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None,
                 timeout_s: float = 10.0) -> None:
        self.url = coordinator_http.base_url(url)
        self._http = coordinator_http.sync_client(self.url, token, timeout_s=timeout_s)

    def __enter__(self) -> CoordinatorApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status")

    def topology(self) -> dict[str, Any]:
        return self._call("GET", "/topology")

    def stats(self) -> dict[str, Any]:
        """`GET /stats`: the cluster stats of docs/design.md §10."""
        return self._call("GET", "/stats")

    def healthz(self) -> dict[str, Any]:
        return self._call("GET", "/healthz")

    def forget(self, broker_id: str) -> dict[str, Any]:
        return self._call("POST", f"/brokers/{broker_id}/forget", {"accept_data_loss": True})

    def drain(self, broker_id: str, leaving: bool = False) -> dict[str, Any]:
        return self._call("POST", f"/brokers/{broker_id}/drain", {"leaving": leaving})

    def move_queue(self, queue: str, to: str) -> dict[str, Any]:
        return self._call("POST", f"/queues/{queue}/move", {"to": to})

    def undrain(self, broker_id: str) -> dict[str, Any]:
        return self._call("POST", f"/brokers/{broker_id}/undrain", {})

    def leave(self, broker_id: str) -> dict[str, Any]:
        return self._call("POST", "/brokers/leave", {"id": broker_id})

    def rebalance(self, dry_run: bool = False) -> dict[str, Any]:
        return self._call("POST", "/rebalance", {"dry_run": dry_run})

    def rebalance_progress(self) -> dict[str, Any]:
        return self._call("GET", "/rebalance")

    def rebalance_cancel(self) -> dict[str, Any]:
        return self._call("POST", "/rebalance/cancel", {})

    def failover(self, broker_id: str) -> dict[str, Any]:
        return self._call("POST", f"/brokers/{broker_id}/failover", {})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        try:
            r = self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise CoordinatorUnreachable(f"cannot reach the coordinator at {self.url}: {e}") from e
        try:
            answer = r.json()
        except ValueError:
            answer = None
        if r.status_code >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise CoordinatorRefused(
                r.status_code,
                f"coordinator answered {r.status_code}: {message or r.text[:200]}")
        if not isinstance(answer, dict):
            raise CoordinatorRefused(r.status_code, f"unexpected answer to {path}: {r.text[:200]}")
        return answer
