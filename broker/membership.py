"""The broker's link to the coordinator: register, heartbeat, follow the topology.

The broker serves from its own persisted slots whether or not this agent
ever reaches the coordinator (docs/design.md §3, §6: the coordinator is not on the
data path). The agent only keeps the coordinator informed and hands every
newer topology to the broker through `on_topology`.

Logging follows the link, not the attempts: one line when the coordinator
becomes unreachable, refuses us, or comes back, never one per retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx

from shardq import coordinator_http

log = logging.getLogger("shardq.broker.membership")

REQUEST_TIMEOUT_S = 3.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
BARRED_RETRY_S = 10.0
MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS = 10, 60_000  # what an answer's heartbeat_ms may ask


class _Rejected(Exception):
    """The coordinator answered, but not 2xx."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class MembershipAgent:
    """Registers a broker with the coordinator and keeps it alive there.

    Args:
        broker_id: this broker's `--id`.
        advertise: the `host:port` clients should use.
        weight: ring weight.
        coordinator_url: e.g. ``http://127.0.0.1:7070``.
        token: bearer token for the coordinator, if it has one.
        get_stats: returns the stats sent with each heartbeat, shaped
            ``{"queues": {name: {"waiting", "active", "delayed", "completed",
            "failed"}}, ...}``; called on the event loop, keep it cheap.
        on_topology: called with each topology dict (docs/design.md §5) whose epoch
            is newer than the last one delivered; never with epoch 0 (no
            map yet). Called on the event loop.
        heartbeat_ms: the longest interval between heartbeats; shorter when
            the coordinator's answer asks for it (`heartbeat_ms`, a quarter
            of its timeout).
        on_leases: called with the `leases` of each heartbeat answer (tenant
            rate-limit shares, coordinator/tenants.py). Called on the event loop.
        storage: the data directory's storage identity, sent with register and
            every heartbeat so the coordinator never hands this broker slots
            owned under another disk.
        zone: `--zone`, sent with register and every heartbeat (a restarted
            coordinator learns it again), for follower placement
            (docs/design.md §12).
    """

    def __init__(self, *, broker_id: str, advertise: str, weight: int, coordinator_url: str,
                 token: str | None, get_stats: Callable[[], dict[str, Any]],
                 on_topology: Callable[[dict[str, Any]], None], heartbeat_ms: int = 1000,
                 on_leases: Callable[[dict[str, Any]], None] | None = None,
                 storage: str | None = None, zone: str | None = None) -> None:
        self._id = broker_id
        self._zone = zone
        self._storage = storage
        self._advertise = advertise
        self._weight = weight
        self._base_url = coordinator_http.base_url(coordinator_url)
        self._token = token
        self._get_stats = get_stats
        self._on_topology = on_topology
        self._on_leases = on_leases
        self._configured_s = max(heartbeat_ms, MIN_HEARTBEAT_MS) / 1000.0
        self._interval_s = self._configured_s
        self._term = 0
        self._epoch_seen = 0  # epoch of the last topology handed to on_topology
        self._link = "new"  # last logged link state
        self._left = False
        self._wake = asyncio.Event()
        self._in_flight = asyncio.Lock()

    @property
    def heartbeat_interval_s(self) -> float:
        """The interval between heartbeats now."""
        return self._interval_s

    @property
    def term(self) -> int:
        """The coordinator term of the last answer (0 until the first one)."""
        return self._term

    @property
    def topology_epoch(self) -> int:
        """The epoch of the last topology delivered to `on_topology` (0: none yet)."""
        return self._epoch_seen

    async def run(self) -> None:
        """Register (retrying with backoff), then heartbeat every `heartbeat_ms`.

        Never raises on coordinator trouble; returns after `leave()`; cancel-safe.
        """
        async with coordinator_http.async_client(self._base_url, self._token,
                                                 timeout_s=REQUEST_TIMEOUT_S) as http:
            while not self._left:
                await self._register(http)
                await self._heartbeat_until_unknown(http)

    async def leave(self) -> None:
        """Tell the coordinator we are stopping; stops `run()`. Never raises.

        Waits for a heartbeat in flight, so it cannot land after the leave
        and revive us.
        """
        self._left = True
        self._wake.set()
        async with self._in_flight, coordinator_http.async_client(
            self._base_url, self._token, timeout_s=REQUEST_TIMEOUT_S,
        ) as http:
            try:
                await _post(http, "/brokers/leave", {"id": self._id})
            except (httpx.HTTPError, _Rejected, ValueError) as e:
                log.warning("could not tell the coordinator that %s leaves: %s", self._id, e)

    # -- loops ---------------------------------------------------------------

    async def _register(self, http: httpx.AsyncClient) -> None:
        """Until registered (or left)."""
        backoff = BACKOFF_MIN_S
        body = {"id": self._id, "addr": self._advertise, "weight": self._weight,
                "storage": self._storage, **self._zone_field()}
        while not self._left:
            try:
                answer = await self._post(http, "/brokers/register", body)
            except (httpx.HTTPError, _Rejected, ValueError) as e:
                delay = self._failed(e, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                await self._sleep(delay)
                continue
            self._link_up(answer, "registered")
            await self._follow(http, answer)
            return

    def _zone_field(self) -> dict[str, str]:
        return {"zone": self._zone} if self._zone else {}

    async def _heartbeat_until_unknown(self, http: httpx.AsyncClient) -> None:
        """Heartbeat until left, or until the coordinator no longer knows us (re-register)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._left:
            next_at += self._interval_s
            await self._sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at, loop.time())
            if self._left:
                return
            try:
                answer = await self._post(http, "/brokers/heartbeat",
                                          {"id": self._id, "stats": self._stats(),
                                           "storage": self._storage, **self._zone_field()})
            except _Rejected as e:
                if e.status in (403, 404):
                    self._set_link(f"rejected {e.status}", logging.WARNING,
                                   f"coordinator refused heartbeat ({e}); registering again")
                    return
                self._failed(e, 0.0)
                continue
            except (httpx.HTTPError, ValueError) as e:
                self._failed(e, 0.0)
                continue
            self._link_up(answer, "heartbeat")
            await self._follow(http, answer)
            self._leases(answer)

    async def _follow(self, http: httpx.AsyncClient, answer: dict[str, Any]) -> None:
        """Fetch and deliver the topology when the answer names a newer epoch."""
        epoch = answer.get("epoch")
        if not isinstance(epoch, int) or epoch <= self._epoch_seen:
            return
        try:
            async with self._in_flight:
                r = await http.get("/topology")
            r.raise_for_status()
            topology = r.json()
        except (httpx.HTTPError, ValueError) as e:
            log.warning("could not fetch topology epoch %d: %s", epoch, e)
            return
        new_epoch = topology.get("epoch") if isinstance(topology, dict) else None
        if not isinstance(new_epoch, int) or new_epoch <= self._epoch_seen:
            return
        try:
            self._on_topology(topology)
        except Exception:
            # Not advancing _epoch_seen makes the next heartbeat try again.
            log.exception("on_topology failed for epoch %d", new_epoch)
            return
        self._epoch_seen = new_epoch

    # -- helpers -------------------------------------------------------------

    async def _post(self, http: httpx.AsyncClient, path: str, body: dict[str, Any]
                    ) -> dict[str, Any]:
        """POST unless we left; one request at a time (see `leave`)."""
        async with self._in_flight:
            if self._left:
                return {}
            return await _post(http, path, body)

    def _leases(self, answer: dict[str, Any]) -> None:
        leases = answer.get("leases")
        if self._on_leases is None or not isinstance(leases, dict):
            return
        try:
            self._on_leases(leases)
        except Exception:
            log.exception("applying tenant leases failed; keeping the last ones")

    def _stats(self) -> dict[str, Any]:
        try:
            return self._get_stats()
        except Exception:
            log.exception("get_stats failed; sending empty stats")
            return {}

    def _failed(self, e: Exception, backoff: float) -> float:
        """Log a failed call once per link state; return how long to wait."""
        if isinstance(e, _Rejected) and e.status == 403:
            self._set_link("barred", logging.ERROR,
                           f"coordinator refuses broker {self._id}: {e}")
            return BARRED_RETRY_S
        if isinstance(e, _Rejected):
            self._set_link(f"rejected {e.status}", logging.ERROR,
                           f"coordinator rejected broker {self._id}: {e}")
            return max(backoff, 1.0)
        self._set_link("down", logging.WARNING,
                       f"coordinator {self._base_url} unreachable ({e!r}); "
                       "serving on the last topology and retrying")
        return backoff

    def _adopt_interval(self, heartbeat_ms: object) -> None:
        """Beat at least as often as the coordinator asks: its timeout decides what is late."""
        if isinstance(heartbeat_ms, int) and MIN_HEARTBEAT_MS <= heartbeat_ms <= MAX_HEARTBEAT_MS:
            self._interval_s = min(self._configured_s, heartbeat_ms / 1000.0)

    def _link_up(self, answer: dict[str, Any], how: str) -> None:
        term = answer.get("term")
        if isinstance(term, int) and term != self._term:
            if self._term:
                log.info("coordinator restarted: term %d -> %d", self._term, term)
            self._term = term
        self._adopt_interval(answer.get("heartbeat_ms"))
        if answer.get("state") == "lost-storage":
            self._set_link("held", logging.WARNING,
                           f"coordinator holds broker {self._id} as lost-storage: its slots "
                           f"are owned under another data directory than this one "
                           f"(storage {self._storage}); not serving them")
            return
        self._set_link("up", logging.INFO,
                       f"broker {self._id} {how} with coordinator {self._base_url} "
                       f"(term {self._term}, epoch {answer.get('epoch')}, "
                       f"state {answer.get('state')})")

    def _set_link(self, state: str, level: int, message: str) -> None:
        if state != self._link:
            self._link = state
            log.log(level, "%s", message)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, cut short by `leave()`."""
        if seconds <= 0 or self._left:
            return
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass


async def _post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    # default=str: a stats value JSON cannot encode must not stop the heartbeat.
    content = json.dumps(body, default=str).encode()
    r = await http.post(path, content=content, headers={"Content-Type": "application/json"})
    if r.status_code >= 400:
        raise _Rejected(r.status_code, _error_text(r))
    answer = r.json()
    if not isinstance(answer, dict):
        raise ValueError(f"unexpected answer from {path}: {answer!r}")
    return answer


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:200]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return error
    return str(body)[:200]
