"""The one way to build an HTTP client for the coordinator's API.

Everything that calls the coordinator over HTTP (the Python client's
topology and admin calls, the CLI's `CoordinatorApi`, a broker's membership
agent and its drain on SIGTERM, the local cluster supervisor) gets its
`httpx` client here, so the base URL, the timeout and the bearer header are
built in one place (docs/design.md §6, §8).

    async with coordinator_http.async_client(url, token, timeout_s=5.0) as http:
        r = await http.get("/topology")
"""

from __future__ import annotations

import httpx

DEFAULT_TIMEOUT_S = 10.0


def base_url(url: str) -> str:
    """`url` without trailing slashes, so paths can start with '/'."""
    return url.rstrip("/")


def headers(token: str | None) -> dict[str, str]:
    """The bearer header when the cluster has a token (none otherwise)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def async_client(url: str, token: str | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for the coordinator at `url` (close it: `aclose()`
    or `async with`)."""
    return httpx.AsyncClient(base_url=base_url(url), headers=headers(token), timeout=timeout_s)


def sync_client(url: str, token: str | None = None, *,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> httpx.Client:
    """An `httpx.Client` for the coordinator at `url` (close it: `close()` or `with`)."""
    return httpx.Client(base_url=base_url(url), headers=headers(token), timeout=timeout_s)
