"""The coordinator's HTTP API (docs/design.md §6, §8): thin starlette routes over `Membership`.

    GET  /healthz                    {ok, term, epoch, bootstrapped, pid}
    GET  /topology                   topology JSON, docs/design.md §5
    GET  /status                     `shardq status --json`, docs/design.md §10
    GET  /stats                      cluster stats JSON (stats.py, docs/design.md §10)
    GET  /metrics                    the same as Prometheus text (metrics.py)
    POST /brokers/register           {id, addr, weight?, storage?, zone?} -> {term, epoch,
                                     state, heartbeat_ms} (zone: follower placement,
                                     replication.py; heartbeat_ms: how often to beat)
    POST /brokers/heartbeat          {id, stats?, storage?} -> {term, epoch, state,
                                     heartbeat_ms}
                                     `storage`: the data directory's identity; a broker
                                     that owns slots under another one is `lost-storage`
    POST /brokers/leave              {id} -> {term, epoch, state}
    POST /brokers/{id}/forget        {accept_data_loss: true} -> {term, epoch, forgotten, slots,
                                                                  reassigned: {broker: n}}
    POST /brokers/{id}/drain         {leaving?: bool} -> {term, epoch, state, slots, moves}
                                     off the ring; its slots move away; `drained` once empty
    POST /brokers/{id}/undrain       {} -> {term, epoch, state, moves}   back on the ring
    GET  /rebalance                  progress {running, total, done, failed, skipped, pending,
                                     slots_moved, moves_in_flight: [...], errors, ...}
    POST /rebalance                  {dry_run?: bool} -> the plan {epoch, activate, moves:
                                     [{source, target, slots, first, last}], slots,
                                     load_before, load_after, started}
    POST /rebalance/cancel           {} -> progress; moves not started are dropped
    GET  /tenants                    cluster-wide tenant limits with each broker's share
    POST /tenants/{name}/rate_limit  {queues, max|null, per_ms} -> the tenant's limit
                                     (null max removes it); brokers get their shares
                                     as `leases` in heartbeat answers (tenants.py)
    GET  /ui, /ui/api/...            the web dashboard (ui/dashboard.py); the page shell
                                     and its static files are the only routes served
                                     without the token (they hold no data)
    GET  /replication                {primary: {follower, in_sync, repl_epoch, lag_ops,
                                     failover?}} (--replicas 1; replication.py)
    POST /replication/out-of-sync    {primary, follower, repl_epoch} -> {primary, follower,
                                     in_sync, repl_epoch, fenced, epoch}: compare-and-set
    POST /replication/in-sync        the same body and answer
    POST /brokers/{id}/failover      {} -> {primary, to, epoch, took_ms}: planned switchover

Errors answer `{"error": message}` with 400 (malformed), 401 (token),
403 (barred id), 404 (unknown broker), 409 (conflicting state, or a data
directory that belongs to another broker).

Membership methods are synchronous and persist before returning, and the
handlers never await between reading and changing state, so requests are
applied one at a time without a lock and each answer is already durable.
The rebalancer's moves run as tasks on the same loop and change state the
same way (synchronously, between their awaits). The first heartbeat of a
broker that joined after bootstrap (not its registration: a broker that
never heartbeats never gets slots) starts a scale-out rebalance, unless
the coordinator runs with `--no-auto-rebalance`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .bodies import json_object
from .errors import BadRequest, CoordinatorError
from .failover import Failover
from .links import BrokerLinks
from .membership import Membership
from .metrics import render as render_metrics
from .moves import MoveExecutor, MovePolicy
from .rebalance import Rebalancer
from .replication import ReplicationBook
from .stats import StatsBook
from .tenants import TenantBook
from .ui import Dashboard, is_public

log = logging.getLogger("shardq.coordinator")

MAX_BODY = 16 * 1024 * 1024
T = TypeVar("T")


def default_rebalancer(membership: Membership, token: str | None = None, *,
                       policy: MovePolicy | None = None, concurrency: int = 2,
                       throttle_ms: int = 0, auto: bool = True) -> Rebalancer:
    """A rebalancer sending handoff ops over real broker connections (HELLO with `token`)."""
    links = BrokerLinks(lambda b: membership.topology.addr_of(b), token)
    executor = MoveExecutor(membership, links.send, policy, on_close=links.aclose,
                            epoch_of=links.epoch)
    return Rebalancer(membership, executor, concurrency=concurrency, throttle_ms=throttle_ms,
                      auto=auto)


def create_app(membership: Membership, *, token: str | None = None,
               check_interval_ms: int = 1000, rebalancer: Rebalancer | None = None,
               stats: StatsBook | None = None, tenants: TenantBook | None = None,
               control_token: str | None = None, ui_actions: bool = False,
               replication: ReplicationBook | None = None,
               link_token: str | None = None) -> Starlette:
    """The ASGI app; its lifespan runs the liveness check every `check_interval_ms`,
    recovers unfinished moves at start and stops the rebalancer at the end.

    Args:
        membership: the state it serves and changes.
        token: when set, every request needs `Authorization: Bearer <token>`
            (and brokers get it in HELLO from the default rebalancer).
        control_token: when set, only it may change anything (POST: register,
            heartbeat, moves, forget, ...) and brokers get it in HELLO; the
            client `token` then only reads (GET: topology, status, stats).
        check_interval_ms: how often silent brokers are looked for.
        rebalancer: runs moves; default: `default_rebalancer(membership, token)`.
        stats: keeps the brokers' heartbeat stats for /stats and /metrics;
            default: a fresh `StatsBook()`.
        tenants: cluster-wide tenant limits and their leases; default: kept
            in memory only (the server passes one persisted in its store).
        ui_actions: let the dashboard at /ui act (retry, pause, drain...);
            without it the dashboard is read-only.
        replication: the replication records (`--replicas 1`); None: none.
        link_token: what the failover's broker links send in HELLO (the
            coordinator token, README "Security and limits"); default: the
            control token, else `token`.
    """
    m = membership
    rb = rebalancer or default_rebalancer(membership, control_token or token)
    book = stats or StatsBook()
    tb = _tenant_book(tenants, m)
    ui = Dashboard(m, rb, book, token=token, actions=ui_actions)
    fo_links = BrokerLinks(lambda b: m.topology.addr_of(b), link_token or control_token or token)
    failover = (Failover(m, replication, fo_links.send)
                if replication is not None and replication.enabled else None)

    lifespan = _lifespan(m, rb, ui, fo_links, check_interval_ms, failover)
    routes = [
        *_read_routes(m, replication),
        *_queue_routes(m, rb),
        *_broker_routes(m, rb, book, tb, replication),
        *_rebalance_routes(m, rb),
        *_tenant_routes(tb),
        *_stats_routes(m, book, replication),
        *_replication_routes(m, replication, failover),
        *ui.routes(),
    ]
    middleware = ([Middleware(BearerAuth, token=token, control_token=control_token,
                              public=is_public)]
                  if token or control_token else [])
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={CoordinatorError: _error_response},
        lifespan=lifespan,
        max_body_size=MAX_BODY,
    )


def _lifespan(m: Membership, rb: Rebalancer, ui: Dashboard, fo_links: BrokerLinks,
              check_interval_ms: int, failover: Failover | None
              ) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """Liveness loop and dashboard while serving; recover moves at start, close at end."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(_liveness_loop(m, check_interval_ms / 1000.0, failover))
        try:
            await rb.recover()
            async with ui.running():
                yield
        finally:
            task.cancel()
            await asyncio.wait([task])
            await rb.aclose()
            await fo_links.aclose()

    return lifespan


def _read_routes(m: Membership, replication: ReplicationBook | None) -> list[Route]:
    """Health, topology and status: the read-only views of the membership."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "term": m.term, "epoch": m.epoch,
                             "bootstrapped": m.bootstrapped, "pid": os.getpid()})

    async def topology(request: Request) -> Response:
        return Response(m.topology_json(), media_type="application/json")

    async def status(request: Request) -> Response:
        return JSONResponse(_status(m, replication))

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/topology", topology, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
    ]


def _queue_routes(m: Membership, rb: Rebalancer) -> list[Route]:
    """Declare a partitioned queue; pin a queue to a broker."""

    async def move_queue(request: Request) -> Response:
        name = request.path_params["name"]
        to = _field(await _json_body(request), "to", str)
        return _logged(m, f"queue {name} pinned to {to}", lambda: rb.move_queue(name, to),
                       always=True)

    async def declare(request: Request) -> Response:
        name = request.path_params["name"]
        partitions = _field(await _json_body(request), "partitions", int)
        return _logged(m, f"queue {name} declared with {partitions} partitions",
                       lambda: m.declare_queue(name, partitions), always=True)

    return [
        Route("/queues/{name}/declare", declare, methods=["POST"]),
        Route("/queues/{name}/move", move_queue, methods=["POST"]),
    ]


def _broker_routes(m: Membership, rb: Rebalancer, book: StatsBook, tb: TenantBook,
                   replication: ReplicationBook | None) -> list[Route]:
    """What brokers call: register, heartbeat, leave; and forget one for good."""

    async def register(request: Request) -> Response:
        body = await _json_body(request)
        bid = _field(body, "id", str)
        addr, weight = _field(body, "addr", str), _field(body, "weight", int, 1)
        storage = _field(body, "storage", str, None)
        _note_zone(replication, bid, body)  # before the registration can trigger placement
        return _logged(m, f"broker {bid} registered at {addr}",
                       lambda: m.register(bid, addr, weight, storage), always=True)

    async def heartbeat(request: Request) -> Response:
        body = await _json_body(request)
        bid = _field(body, "id", str)
        stats = _field(body, "stats", dict, None)
        storage = _field(body, "storage", str, None)
        _note_zone(replication, bid, body)

        def beat() -> dict[str, Any]:
            answer = m.heartbeat(bid, stats, storage)
            book.observe(bid, stats)
            # Scale out once a joining broker heartbeats: it is up and has our map.
            answer = m.answer(bid) if rb.notice(bid) else answer
            leases = tb.heartbeat(bid, stats, m.topology)
            return answer if leases is None else {**answer, "leases": leases}

        return _logged(m, f"broker {bid} is back", beat)

    async def leave(request: Request) -> Response:
        bid = _field(await _json_body(request), "id", str)
        return _logged(m, f"broker {bid} left", lambda: m.leave(bid), always=True)

    async def forget(request: Request) -> Response:
        bid = request.path_params["broker_id"]
        accept = _field(await _json_body(request), "accept_data_loss", bool, False)
        return _logged(m, f"broker {bid} forgotten", lambda: m.forget(bid, accept), always=True)

    return [
        Route("/brokers/register", register, methods=["POST"]),
        Route("/brokers/heartbeat", heartbeat, methods=["POST"]),
        Route("/brokers/leave", leave, methods=["POST"]),
        Route("/brokers/{broker_id}/forget", forget, methods=["POST"]),
    ]


def _rebalance_routes(m: Membership, rb: Rebalancer) -> list[Route]:
    """Drain, undrain and rebalance: the routes over the rebalancer."""

    async def drain(request: Request) -> Response:
        bid = request.path_params["broker_id"]
        leaving = _field(await _json_body(request, empty_ok=True), "leaving", bool, False)
        return _logged(m, f"broker {bid} drains", lambda: rb.drain(bid, leaving), always=True)

    async def undrain(request: Request) -> Response:
        bid = request.path_params["broker_id"]
        return _logged(m, f"broker {bid} undrained", lambda: rb.undrain(bid), always=True)

    async def rebalance_progress(request: Request) -> Response:
        return JSONResponse(rb.progress())

    async def rebalance(request: Request) -> Response:
        dry_run = _field(await _json_body(request, empty_ok=True), "dry_run", bool, False)
        if dry_run:
            return JSONResponse({**rb.plan(), "started": False})
        return _logged(m, "rebalance requested", lambda: rb.start("requested"))

    async def rebalance_cancel(request: Request) -> Response:
        return JSONResponse(rb.cancel())

    return [
        Route("/brokers/{broker_id}/drain", drain, methods=["POST"]),
        Route("/brokers/{broker_id}/undrain", undrain, methods=["POST"]),
        Route("/rebalance", rebalance_progress, methods=["GET"]),
        Route("/rebalance", rebalance, methods=["POST"]),
        Route("/rebalance/cancel", rebalance_cancel, methods=["POST"]),
    ]


def _tenant_book(tenants: TenantBook | None, m: Membership) -> TenantBook:
    return tenants if tenants is not None else TenantBook(None, m.term)


def _tenant_routes(tb: TenantBook) -> list[Route]:
    """Cluster-wide tenant rate limits (docs/design.md §11, tenants.py)."""

    async def tenants(request: Request) -> Response:
        return JSONResponse(tb.view())

    async def set_tenant(request: Request) -> Response:
        name = request.path_params["name"]
        body = await _json_body(request)
        answer = tb.set(name, body.get("queues"), body.get("max"), body.get("per_ms", 1000))
        log.info("tenant %s rate limit: %s", name, answer)
        return JSONResponse(answer)

    return [
        Route("/tenants", tenants, methods=["GET"]),
        Route("/tenants/{name}/rate_limit", set_tenant, methods=["POST"]),
    ]


def _status(m: Membership, replication: ReplicationBook | None) -> dict[str, Any]:
    body = m.status()
    if replication is not None and replication.enabled:
        replication.status_rows(body["brokers"])
        body["failovers"] = dict(replication.failovers)
    return body


def _replication_routes(m: Membership, rep: ReplicationBook | None,
                        failover: Failover | None) -> list[Route]:
    """The replication records and their compare-and-set (replication.py)."""

    def book() -> ReplicationBook:
        if rep is None or not rep.enabled:
            raise BadRequest("this coordinator runs with --replicas 0")
        return rep

    async def view(request: Request) -> Response:
        return JSONResponse(book().view() if rep is not None and rep.enabled else {})

    async def switchover(request: Request) -> Response:
        if failover is None:
            raise BadRequest("this coordinator runs with --replicas 0")
        bid = request.path_params["broker_id"]
        answer = await failover.planned(bid)
        log.warning("planned failover of %s: %s", bid, answer)
        return JSONResponse(answer)

    async def cas(request: Request) -> Response:
        body = await _json_body(request)
        primary, follower = _field(body, "primary", str), _field(body, "follower", str)
        epoch = _field(body, "repl_epoch", int)
        b = book()
        if request.url.path.endswith("/in-sync"):
            return JSONResponse(b.in_sync(primary, follower, epoch))
        return JSONResponse(b.out_of_sync(primary, follower, epoch))

    return [
        Route("/replication", view, methods=["GET"]),
        Route("/brokers/{broker_id}/failover", switchover, methods=["POST"]),
        Route("/replication/out-of-sync", cas, methods=["POST"]),
        Route("/replication/in-sync", cas, methods=["POST"]),
    ]


def _stats_routes(m: Membership, book: StatsBook,
                  rep: ReplicationBook | None = None) -> list[Route]:
    """GET /stats and GET /metrics: the heartbeat stats over the current topology."""

    async def cluster_stats(request: Request) -> Response:
        return JSONResponse(book.view(m.topology).to_json())

    async def metrics(request: Request) -> Response:
        text = render_metrics(book.view(m.topology))
        if rep is not None and rep.enabled:
            text += _replication_metrics(rep)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/stats", cluster_stats, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def _logged(m: Membership, what: str, call: Callable[[], dict[str, Any]],
            always: bool = False) -> Response:
    """Run a state change; log it when it moved the epoch (or `always`)."""
    before = m.epoch
    answer = call()
    if always or m.epoch != before:
        state = answer.get("state")
        epoch = f"epoch {before} -> {m.epoch}" if m.epoch != before else f"epoch {m.epoch}"
        log.info("%s%s: %s", what, f" ({state})" if state else "", epoch)
    return JSONResponse(answer)


def _replication_metrics(rep: ReplicationBook) -> bytes:
    """`shardq_replication_*` and `shardq_failovers_total` (docs/design.md §12)."""
    lines = ["# HELP shardq_replication_in_sync 1 when the broker's follower is in sync.",
             "# TYPE shardq_replication_in_sync gauge"]
    lag = ["# HELP shardq_replication_lag_ops Batches shipped to the follower and not yet "
           "acknowledged.", "# TYPE shardq_replication_lag_ops gauge"]
    for primary, rec in sorted(rep.state.items()):
        lines.append(f'shardq_replication_in_sync{{broker="{primary}"}} '
                     f'{1 if rec.get("in_sync") else 0}')
        value = rep.lag_ops(primary)
        if value is not None:
            lag.append(f'shardq_replication_lag_ops{{broker="{primary}"}} {value}')
    fo = ["# HELP shardq_failovers_total Failovers by result.",
          "# TYPE shardq_failovers_total counter"]
    for result in ("ok", "refused"):
        fo.append(f'shardq_failovers_total{{result="{result}"}} {rep.failovers.get(result, 0)}')
    return ("\n".join([*lines, *lag, *fo]) + "\n").encode()


async def _liveness_loop(m: Membership, interval_s: float,
                         failover: Failover | None = None) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            dead = m.check_liveness()
        except Exception:
            log.exception("liveness check failed")
            continue
        if dead:
            log.warning("missed heartbeats, marked dead: %s (epoch %d)", ", ".join(dead), m.epoch)
        if failover is not None:
            try:
                await failover.tick()
            except Exception:
                log.exception("replication check failed")


async def _error_response(request: Request, exc: Exception) -> Response:
    status = exc.status if isinstance(exc, CoordinatorError) else 500
    return JSONResponse({"error": str(exc)}, status_code=status)


_json_body = json_object


_MISSING: Any = object()


def _note_zone(replication: ReplicationBook | None, bid: str, body: dict[str, Any]) -> None:
    """A broker's `--zone` label, for follower placement (replication.py)."""
    zone = _field(body, "zone", str, None)
    if replication is not None:
        replication.note_zone(bid, zone)


def _field(body: dict[str, Any], name: str, kind: type[T], default: T = _MISSING) -> T:
    value = body.get(name, default)
    if value is _MISSING:
        raise BadRequest(f"missing field {name!r}")
    if value is default:
        return value
    # JSON true is not a weight of 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"field {name!r} must be {kind.__name__}, got {value!r}")
    return value


class BearerAuth:
    """Refuses an HTTP request without the bearer token its method needs,
    except to the paths `public` accepts (the dashboard's shell and static files).

    With a control token, it alone may change state (any method but GET and
    HEAD, 403 for the client token); the client token, or no token when
    there is none, may read. Without one, the client token may do all.
    """

    _READS = frozenset({"GET", "HEAD"})

    def __init__(self, app: ASGIApp, token: str | None, control_token: str | None = None,
                 public: Callable[[str], bool] = lambda path: False) -> None:
        self.app = app
        self._client = b"Bearer " + token.encode() if token else None
        self._control = b"Bearer " + control_token.encode() if control_token else None
        self._public = public

    def _allowed(self, got: bytes, method: str) -> int:
        """0 when allowed, else the HTTP status to answer."""
        if self._control is not None and hmac.compare_digest(got, self._control):
            return 0
        client_ok = self._client is None or hmac.compare_digest(got, self._client)
        if self._control is None:
            return 0 if client_ok else 401
        if method in self._READS:
            return 0 if client_ok else 401
        return 403 if client_ok and got else 401

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._public(scope["path"]):
            got = dict(scope["headers"]).get(b"authorization", b"")
            status = self._allowed(got, scope.get("method", "GET"))
            if status:
                message = ("this needs the control token" if status == 403
                           else "missing or wrong bearer token")
                response = JSONResponse({"error": message}, status_code=status,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
