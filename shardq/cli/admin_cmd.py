"""`shardq status`, `shardq owner`, `shardq forget`: operator commands over the coordinator API."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from shardq.cli import app
from shardq.coordinator.api_client import DEFAULT_URL, CoordinatorApi, CoordinatorCallError

T = TypeVar("T")

COORDINATOR_OPT = typer.Option(DEFAULT_URL, "--coordinator", envvar="SHARDQ_COORDINATOR",
                               help="Coordinator URL.")
TOKEN_OPT = typer.Option(
    None, "--token", envvar=["SHARDQ_CONTROL_TOKEN", "SHARDQ_TOKEN"],
    help="Coordinator token: the control token to change anything, when the cluster has one.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")


def _with_api(coordinator: str, token: str | None, call: Callable[[CoordinatorApi], T]) -> T:
    """Run `call`; a failure is one red line on stderr and exit code 1."""
    try:
        with CoordinatorApi(coordinator, token) as api:
            return call(api)
    except CoordinatorCallError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None


@app.command("status")
def status(coordinator: str = COORDINATOR_OPT, token: str | None = TOKEN_OPT,
           json_out: bool = JSON_OPT) -> None:
    """Brokers, states, slots, queues and jobs per broker, and the epoch.

    Job counts are read from each broker at once (STATS); a broker that does
    not answer within a second keeps the figures of its last heartbeat, and
    the title says how many rows are such (at most about a second old)."""
    data = _with_api(coordinator, token, lambda api: api.status())
    stale = live_counts(data["brokers"], token)
    data["live"] = not stale
    if json_out:
        typer.echo(json.dumps(data))
        return
    age = "live" if not stale else (f"live, but {', '.join(stale)} from the last "
                                    "heartbeat (<= ~1 s old)")
    table = Table(title=f"epoch {data['epoch']} ({age})", box=box.SIMPLE_HEAD,
                  padding=(0, 0, 0, 0), pad_edge=False, show_edge=False)
    for col in ("id", "addr", "state", "weight", "slots", "queues", "waiting", "active",
                "delayed"):
        text = col in ("id", "addr", "state")
        # A header never shrinks below its own width (80 columns cut them to
        # "weig…"), and an address stays whole (it is copied into other
        # commands): with collapsed padding a host:port of 21 characters fits.
        table.add_column(col, justify="left" if text else "right", min_width=len(col),
                         no_wrap=True, overflow="fold")
    for b in data["brokers"]:
        table.add_row(b["id"], b["addr"], _state_markup(b["state"]),
                      *(str(b[k]) for k in ("weight", "slots", "queues", "waiting", "active",
                                            "delayed")))
    console = Console()
    console.print(table)
    for b in data["brokers"]:  # with --replicas 1 (docs/design.md §12)
        if "follower" in b:
            sync = "in sync" if b["in_sync"] else "[yellow]not in sync[/yellow]"
            lag = "" if b.get("lag_ops") is None else f", lag {b['lag_ops']} batches"
            console.print(f"{b['id']} -> follower {b['follower'] or '[red]none[/red]'}: "
                          f"{sync}{lag}", highlight=False)
    for b in data["brokers"]:
        if b.get("problem"):
            console.print(f"[red]{b['id']} {b['state']}:[/red] {b['problem']}", highlight=False)


def live_counts(rows: list[dict[str, Any]], token: str | None,
                timeout: float = 1.0) -> list[str]:
    """Replace each row's queues/waiting/active/delayed with what its broker
    says now; returns the ids of the brokers that did not answer."""
    import asyncio

    from shardq.client.connection import open_connection

    async def ask(addr: str) -> dict[str, Any]:
        conn = await open_connection(addr, token=token, connect_timeout=timeout,
                                     request_timeout=timeout)
        try:
            stats: dict[str, Any] = await conn.request("STATS", {})
            return stats
        finally:
            await conn.aclose()

    async def main() -> list[Any]:
        got: list[Any] = await asyncio.gather(*(ask(r["addr"]) for r in rows),
                                              return_exceptions=True)
        return got

    stale = []
    for row, got in zip(rows, asyncio.run(main()), strict=True):
        if isinstance(got, BaseException):
            stale.append(row["id"])
            continue
        queues = got.get("queues") or {}
        row["queues"] = len(queues)
        for key in ("waiting", "active", "delayed"):
            row[key] = sum(int(q.get(key, 0)) for q in queues.values())
    return stale


@app.command("owner")
def owner(queue: str = typer.Argument(..., help="Queue name."),
          coordinator: str = COORDINATOR_OPT, token: str | None = TOKEN_OPT,
          json_out: bool = JSON_OPT) -> None:
    """Which broker owns a queue, and the epoch at which it got it."""
    data = owner_of(queue, _with_api(coordinator, token, lambda api: api.topology()))
    if json_out:
        typer.echo(json.dumps(data))
        return
    if data["broker"] is None:
        Console(stderr=True).print(f"slot {data['slot']} of {queue!r} is not owned yet "
                                   "(the cluster has not bootstrapped)")
        raise typer.Exit(1)
    Console().print(f"{queue} -> slot {data['slot']} -> {data['broker']} at {data['addr']} "
                    f"(epoch {data['epoch']})", highlight=False)


def owner_of(queue: str, topology: dict[str, Any]) -> dict[str, Any]:
    """`shardq owner --json` (docs/design.md §10); `epoch`: when its slot (or override) changed."""
    from shardq.router import Topology, slot_of

    topo = Topology.from_dict(topology)
    slot = slot_of(queue)
    override = topo.overrides.get(queue)
    broker = topo.owner_of(queue)
    epoch = override[1] if override is not None else topo.slot_epoch(slot)
    addr = topo.addr_of(broker) if broker is not None else None
    return {"queue": queue, "slot": slot, "broker": broker, "addr": addr, "epoch": epoch}


@app.command("forget")
def forget(broker_id: str = typer.Argument(..., help="The lost broker's id, e.g. b3."),
           accept_data_loss: bool = typer.Option(
               False, "--accept-data-loss",
               help="Required: the broker's jobs are gone for good."),
           coordinator: str = COORDINATOR_OPT, token: str | None = TOKEN_OPT,
           json_out: bool = JSON_OPT) -> None:
    """Give a lost broker's slots away, EMPTY (disk lost, docs/design.md §6).

    A dead broker's id is barred. A broker held as lost-storage that is up on
    its new disk keeps its slots, empty, and serves them again at once."""
    if not accept_data_loss:
        Console(stderr=True).print(
            f"[red]refusing:[/red] forgetting {broker_id} drops every job it held. If its disk "
            "is intact, restart it instead (same --id and data dir, or a new --advertise).\n"
            "Pass --accept-data-loss to go ahead.", highlight=False)
        raise typer.Exit(2)
    data = _with_api(coordinator, token, lambda api: api.forget(broker_id))
    if json_out:
        typer.echo(json.dumps(data))
        return
    to = ", ".join(f"{b}: {n}" for b, n in sorted(data["reassigned"].items())) or "none"
    rejoined = data["forgotten"] in data["reassigned"]
    after = ("it serves them again as a new, empty broker" if rejoined
             else "the id is barred" if data.get("barred", True)
             else "the id may register again, as a new broker")
    Console().print(f"forgot {data['forgotten']}: {data['slots']} slots reassigned empty "
                    f"({to}) at epoch {data['epoch']}; {after}", highlight=False)


def _state_markup(state: str) -> str:
    color = {"active": "green", "dead": "red", "lost-storage": "red",
             "joining": "yellow"}.get(state)
    return f"[{color}]{state}[/{color}]" if color else state
