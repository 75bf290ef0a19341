"""The one way to build an HTTP client for the coordinator's API.

Everything that calls the coordinator over HTTP (the Python client's
topology and admin calls, the CLI's `CoordinatorApi`, a broker's membership
agent and its drain on SIGTERM, the local cluster supervisor) gets its
`httpx` client here, so the base URL, the timeout, the bearer header and
TLS (an `https://` URL is verified against `ssl_context`, else the
process's link context, shardq/tls.py, else the system CAs) are built in
one place (docs/design.md §6, §8).

    async with coordinator_http.async_client(url, token, timeout_s=5.0) as http:
        r = await http.get("/topology")
"""

from __future__ import annotations

import ssl

import httpx

from shardq.tls import link_context

DEFAULT_TIMEOUT_S = 10.0


def base_url(url: str) -> str:
    """`url` without trailing slashes, so paths can start with '/'."""
    return url.rstrip("/")


def headers(token: str | None) -> dict[str, str]:
    """The bearer header when the cluster has a token (none otherwise)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def verify(ssl_context: ssl.SSLContext | None = None) -> ssl.SSLContext | bool:
    """httpx's `verify=`: the given context, the process's link context, or True."""
    ctx = ssl_context if ssl_context is not None else link_context()
    return ctx if ctx is not None else True


def async_client(url: str, token: str | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for the coordinator at `url` (close it: `aclose()`
    or `async with`)."""
    return httpx.AsyncClient(base_url=base_url(url), headers=headers(token), timeout=timeout_s,
                             verify=verify(ssl_context))


def sync_client(url: str, token: str | None = None, *,
                timeout_s: float = DEFAULT_TIMEOUT_S,
                ssl_context: ssl.SSLContext | None = None) -> httpx.Client:
    """An `httpx.Client` for the coordinator at `url` (close it: `close()` or `with`)."""
    return httpx.Client(base_url=base_url(url), headers=headers(token), timeout=timeout_s,
                        verify=verify(ssl_context))
