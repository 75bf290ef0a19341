"""`shardq stats [--watch]`: throughput, per-broker load, busiest queues (docs/design.md §8).

Reads the coordinator's `GET /stats` (docs/design.md §10), which it aggregates
from the brokers' heartbeats: numbers are at most about a heartbeat (1 s)
old, and rates are per second over the last heartbeat interval.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shardq.cli import app
from shardq.cli.admin_cmd import COORDINATOR_OPT, JSON_OPT, TOKEN_OPT, _state_markup
from shardq.coordinator.api_client import (
    CoordinatorApi,
    CoordinatorCallError,
    CoordinatorUnreachable,
)


class SortBy(StrEnum):
    """How `shardq stats` picks the busiest queues."""

    WAITING = "waiting"  # backlog first
    RATE = "rate"  # added/s + completed/s first


@app.command("stats")
def stats(
    watch: bool = typer.Option(False, "--watch", help="Refresh every --interval until Ctrl-C."),
    interval: float = typer.Option(1.0, "--interval", min=0.1,
                                   help="Seconds between refreshes with --watch."),
    count: int = typer.Option(0, "--count", min=0,
                              help="With --watch: stop after N refreshes (0: until Ctrl-C)."),
    top: int = typer.Option(10, "--top", min=1, help="How many of the busiest queues to list."),
    sort: SortBy = typer.Option(SortBy.WAITING, "--sort",
                                help="Busiest queues by backlog (waiting) or by rate."),
    coordinator: str = COORDINATOR_OPT, token: str | None = TOKEN_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Aggregated throughput, depth and load per broker and queue (`GET /stats`).

    With --json, prints the `GET /stats` JSON (one line per refresh with --watch).
    p99 latency shows '-' until brokers report it.
    """
    err = Console(stderr=True)
    try:
        with CoordinatorApi(coordinator, token) as api:
            if not watch:
                data = api.stats()
                if json_out:
                    typer.echo(json.dumps(data))
                else:
                    Console().print(render(data, top, sort))
                return
            _watch(api, interval, count, lambda d: render(d, top, sort), json_out)
    except CoordinatorCallError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        return


def _watch(api: CoordinatorApi, interval: float, count: int,
           draw: Callable[[dict[str, Any]], RenderableType], json_out: bool) -> None:
    """Refresh until Ctrl-C or `count` refreshes. An unreachable coordinator is
    shown and retried; a refusal (token, ...) ends the command.

    On a terminal the tables redraw in place (rich.live); piped, each refresh
    is printed after the last, so a log keeps every frame.
    """
    n = 0
    console = Console()
    live = (Live(console=console, auto_refresh=False)
            if console.is_terminal and not json_out else None)
    if live is not None:
        live.start()
    try:
        while True:
            started = time.monotonic()
            try:
                data: dict[str, Any] | None = api.stats()
                problem = None
            except CoordinatorUnreachable as e:
                data, problem = None, str(e)
            if json_out:
                typer.echo(json.dumps(data if data is not None else {"error": problem}))
            else:
                shown = draw(data) if data is not None else Text(f"{problem} (retrying)",
                                                                 style="red")
                if live is not None:
                    live.update(shown, refresh=True)
                else:
                    console.print(shown)
            n += 1
            if count and n >= count:
                return
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    finally:
        if live is not None:
            live.stop()


def render(data: dict[str, Any], top: int = 10, sort: SortBy = SortBy.WAITING) -> Group:
    """Three tables from a `GET /stats` answer: cluster, brokers, busiest queues."""
    return Group(_cluster_table(data), _broker_table(data), _queue_table(data, top, sort))


def _cluster_table(data: dict[str, Any]) -> Table:
    t = data["totals"]
    states: dict[str, int] = {}
    for b in data["brokers"].values():
        states[b["state"]] = states.get(b["state"], 0) + 1
    brokers = ", ".join(f"{n} {_state_markup(s)}" for s, n in sorted(states.items())) or "none"
    table = _table(f"cluster, epoch {data['epoch']}: {brokers}",
                   ("added/s", "completed/s", "waiting", "active", "delayed", "completed",
                    "failed"))
    table.add_row(_rate(t["added_per_s"]), _rate(t["completed_per_s"]),
                  *(_int(t[k]) for k in ("waiting", "active", "delayed", "completed_total",
                                         "failed_total")))
    return table


def _broker_table(data: dict[str, Any]) -> Table:
    table = _table("brokers", ("broker", "state", "queues", "waiting", "active", "added/s",
                               "completed/s", "completed", "failed"))
    for bid, b in data["brokers"].items():
        t = b["totals"]
        table.add_row(bid, _state_markup(b["state"]), _int(len(b["queues"])),
                      *(_int(t[k]) for k in ("waiting", "active")),
                      _rate(t["added_per_s"]), _rate(t["completed_per_s"]),
                      _int(t["completed_total"]), _int(t["failed_total"]))
    return table


def _queue_table(data: dict[str, Any], top: int, sort: SortBy) -> Table:
    rows = [(name, bid, q) for bid, b in data["brokers"].items()
            for name, q in b["queues"].items()]

    def rate(q: dict[str, Any]) -> float:
        return float(q["added_per_s"] + q["completed_per_s"])

    if sort is SortBy.RATE:
        rows.sort(key=lambda r: (-rate(r[2]), -r[2]["waiting"], r[0]))
    else:
        rows.sort(key=lambda r: (-r[2]["waiting"], -rate(r[2]), r[0]))
    table = _table(f"busiest queues (top {top} of {len(rows)}, by {sort.value})",
                   ("queue", "broker", "waiting", "active", "delayed", "added/s",
                    "completed/s", "failed", "p99 ms"))
    for name, bid, q in rows[:top]:
        p99 = q["p99_ms"]
        table.add_row(name, bid, *(_int(q[k]) for k in ("waiting", "active", "delayed")),
                      _rate(q["added_per_s"]), _rate(q["completed_per_s"]),
                      _int(q["failed_total"]), "-" if p99 is None else f"{p99:.1f}")
    return table


def _table(title: str, columns: tuple[str, ...]) -> Table:
    # Numbers never wrap or get cut; on a narrow terminal a long queue name folds.
    # No padding: the box already puts one space between columns (fits 80 wide).
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", padding=0,
                  pad_edge=False)
    for col in columns:
        if col == "queue":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="left" if col in ("broker", "state") else "right",
                             no_wrap=True)
    return table


def _int(n: int) -> str:
    return f"{n:,}"


def _rate(r: float) -> str:
    return f"{r:,.1f}"
