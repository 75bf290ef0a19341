"""`GET /ui`: the coordinator's web dashboard (docs/design.md §6, §10).

    GET  /ui                 the page shell: no data, so it is served without the token
    GET  /ui/static/...      its CSS and JS (vendored, works offline)
    GET  /ui/api/cluster     brokers (and their replication), slot picture, moves in
                             flight, throughput chart
    GET  /ui/api/queues      ?q=&sort=depth|rate|name&page=  one page of the queue table
    GET  /ui/api/queue       ?queue=  one queue: counts, paused, limits, groups, actions
    GET  /ui/api/jobs        ?queue=&state=&page=  one page of a queue's jobs in a state
    GET  /ui/api/job         ?queue=&id=  one job's detail
    POST /ui/api/action      {action, ...} -> {message}; only with `--ui-actions`

The `/ui/api/` routes answer server-rendered HTML fragments that the page's
script swaps in; like every coordinator route they need `Authorization:
Bearer <token>` when the coordinator has one, so without it the shell shows
a token prompt and nothing else. The script keeps the token in the tab's
sessionStorage and never puts it in a URL.

Cluster and queue tables come from the heartbeat stats (snapshot.py), never
from asking brokers, so they cost the same at 10,000 queues. What stats do
not carry (paused flags, limits, jobs) is read from the owners through the
Python client (brokers.py) for the rows on screen only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from html import escape
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from shardq.errors import (
    BadRequestError,
    BusyError,
    JobStateError,
    NotFoundError,
    ShardqError,
    TooLargeError,
    TryAgainError,
    UnavailableError,
)
from shardq.router import Topology

from ..bodies import json_object
from ..errors import BadRequest, CoordinatorError
from ..membership import Membership, natural_key
from ..rebalance import Rebalancer
from ..stats import StatsBook
from . import actions, views
from .brokers import BrokerReader
from .snapshot import Snapshots, Throughput

log = logging.getLogger("shardq.coordinator.ui")

HERE = Path(__file__).parent
PUBLIC_PATHS = ("/ui", "/ui/")
PUBLIC_PREFIXES = ("/ui/static/",)
VERSION = "3"  # cache-busts the static files when they change


class ActionsDisabled(CoordinatorError):
    status = 403


def is_public(path: str) -> bool:
    """The shell and its static files hold no data: served without the token."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class Dashboard:
    """The dashboard's state and routes; `run()` samples the chart, `aclose()` ends.

    Args:
        membership: the topology and the brokers.
        rebalancer: for drain, undrain and rebalance actions and move progress.
        book: the heartbeat stats.
        token: the coordinator's token, also the one brokers take (HELLO).
        actions: serve `POST /ui/api/action` (`--ui-actions`); else read-only.
    """

    def __init__(self, membership: Membership, rebalancer: Rebalancer, book: StatsBook, *,
                 token: str | None = None, actions: bool = False) -> None:
        self.m = membership
        self.rb = rebalancer
        self.actions = actions
        self.snapshots = Snapshots(book, lambda: membership.topology)
        self.throughput = Throughput(self.snapshots)
        self.brokers = BrokerReader(self._broker_addrs, lambda: membership.epoch, token)
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined)
        self._env.filters["n"] = views.fmt_number
        self._env.filters["rate"] = views.fmt_rate
        self._env.filters["ms_time"] = views.fmt_ms_time
        self._env.filters["pretty"] = views.pretty
        self._env.filters["short"] = views.short

    def _broker_addrs(self) -> list[str]:
        topo = self.m.topology
        return [topo.brokers[bid].addr for bid in sorted(topo.brokers, key=natural_key)]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Sample the throughput chart while open; close the broker client after."""
        sampler = asyncio.create_task(self.throughput.run())
        try:
            yield
        finally:
            sampler.cancel()
            await asyncio.wait([sampler])
            await self.brokers.aclose()

    # -- routes ------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        """The routes to add to the coordinator's app (see the module docstring)."""
        fragments = {"cluster": self.cluster, "queues": self.queues, "queue": self.queue,
                     "jobs": self.jobs, "job": self.job}
        return [
            Route("/ui", self.shell, methods=["GET"]),
            Route("/ui/", self.shell, methods=["GET"]),
            Mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static"),
            *(Route(f"/ui/api/{name}", _fragment(self._noting(handler)), methods=["GET"])
              for name, handler in fragments.items()),
            Route("/ui/api/action", _answer(self._noting(self.action)), methods=["POST"]),
        ]

    def _noting(self, handler: Handler) -> Handler:
        """`handler`, after telling the broker reader which address it was reached at."""
        async def noted(request: Request) -> Response:
            self.brokers.note_server(request.scope.get("server"))
            return await handler(request)
        return noted

    def _render(self, name: str, **context: Any) -> Response:
        html = self._env.get_template(name).render(actions=self.actions, **context)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    async def shell(self, request: Request) -> Response:
        html = self._env.get_template("shell.html").render(version=VERSION)
        # The page runs only its own script and talks only to its origin.
        csp = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; frame-ancestors 'none'")
        return HTMLResponse(html, headers={"Content-Security-Policy": csp,
                                           "Cache-Control": "no-store"})

    async def cluster(self, request: Request) -> Response:
        snap = self.snapshots.current()
        topo: Topology = self.m.topology
        # With --replicas 1 the replication book publishes its records here
        # (coordinator/replication.py); the page reads them as `/replication` does.
        repl = self.m.replication_view
        model = views.cluster_model(topo, snap, self.rb.progress(),
                                    list(self.throughput.points), self.m.stats_of,
                                    None if repl is None else repl())
        return self._render("cluster.html", **model)

    async def queues(self, request: Request) -> Response:
        snap = self.snapshots.current()
        p = request.query_params
        page = views.queue_page(snap, query=p.get("q", ""), sort=p.get("sort", "depth"),
                                page=_int(p.get("page"), 1), size=views.PAGE_SIZE)
        extra = await self.brokers.queue_flags([r.name for r in page.rows])
        parts = self.m.topology.partitions
        logical = {r.name: views.logical_queue(r.name, parts) for r in page.rows}
        return self._render("queues.html", page=page, flags=extra, logical=logical)

    async def queue(self, request: Request) -> Response:
        name = _required(request, "queue")
        detail = await self.brokers.queue_detail(name)
        row = self.snapshots.current().row(name)
        return self._render("queue.html", queue=name, detail=detail, row=row,
                            states=views.JOB_STATES)

    async def jobs(self, request: Request) -> Response:
        p = request.query_params
        if not p.get("queue"):
            return HTMLResponse('<p class="muted">Type a queue name above, or pick a queue '
                                'in <a href="#queues">Queues</a>.</p>')
        name = p["queue"]
        state = p.get("state", "waiting")
        if state not in views.JOB_STATES:
            raise BadRequest(f"state must be one of {', '.join(views.JOB_STATES)}")
        page_no = _int(p.get("page"), 1)
        listing = await self.brokers.jobs(name, state, page_no, views.PAGE_SIZE)
        return self._render("jobs.html", queue=name, state=state, listing=listing)

    async def job(self, request: Request) -> Response:
        name, job_id = _required(request, "queue"), _required(request, "id")
        job = await self.brokers.job(name, job_id)
        return self._render("job.html", queue=name, job=job)

    async def action(self, request: Request) -> Response:
        if not self.actions:
            raise ActionsDisabled("the dashboard is read-only (start the coordinator with "
                                  "--ui-actions to allow actions)")
        # A JSON body cannot be sent cross-site without a CORS preflight, which
        # this server never grants: a page elsewhere cannot act through a browser.
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise BadRequest("actions take a JSON body (Content-Type: application/json)")
        body = await json_object(request)
        message = await actions.run(self, body)
        log.info("dashboard action %s: %s", body.get("action"), message)
        return JSONResponse({"ok": True, "message": message})


Handler = Callable[[Request], Awaitable[Response]]


# A broker's refusal as the dashboard's answer; anything else from a broker is 502.
_STATUS_OF_ERROR: tuple[tuple[type[ShardqError], int], ...] = (
    (BadRequestError, 400), (TooLargeError, 400), (NotFoundError, 404),
    (JobStateError, 409), (TryAgainError, 503), (BusyError, 503), (UnavailableError, 503))


def _status_of(exc: Exception) -> int:
    if isinstance(exc, CoordinatorError):
        return exc.status
    return next((code for kind, code in _STATUS_OF_ERROR if isinstance(exc, kind)), 502)


def _fragment(handler: Handler) -> Handler:
    """A fragment route: a failed read shows as a message in the page, not a blank."""
    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except (CoordinatorError, ShardqError) as e:
            return HTMLResponse(f'<p class="error">{escape(str(e))}</p>',
                                status_code=_status_of(e))
    return guarded


def _answer(handler: Handler) -> Handler:
    """The action route: every refusal is `{"error": message}` with its status."""
    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except (CoordinatorError, ShardqError) as e:
            return JSONResponse({"error": str(e)}, status_code=_status_of(e))
    return guarded


def _int(raw: str | None, default: int) -> int:
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"expected an integer, got {raw!r}") from None
    if value < 1:
        raise BadRequest(f"expected a positive integer, got {value}")
    return value


def _required(request: Request, name: str) -> str:
    value = request.query_params.get(name, "")
    if not value:
        raise BadRequest(f"missing query parameter {name!r}")
    return value
