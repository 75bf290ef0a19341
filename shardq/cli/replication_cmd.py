"""`shardq failover BROKER`: a planned switchover to the broker's follower (docs/design.md §12)."""

from __future__ import annotations

import json

import typer

from shardq.cli import app
from shardq.cli.admin_cmd import COORDINATOR_OPT, JSON_OPT, TOKEN_OPT, _with_api


@app.command("failover")
def failover(broker_id: str = typer.Argument(..., help="The primary to switch over, e.g. b2."),
             coordinator: str = COORDINATOR_OPT, token: str | None = TOKEN_OPT,
             json_out: bool = JSON_OPT) -> None:
    """Switch a broker's slots to its in-sync follower (with --replicas 1), for
    maintenance: no answered write is lost; its writes pause until clients
    follow the new map. The broker stays up, owning nothing; a rebalance
    gives it slots again."""
    data = _with_api(coordinator, token, lambda api: api.failover(broker_id))
    if json_out:
        typer.echo(json.dumps(data))
        return
    typer.echo(f"{broker_id}: its slots are served by {data['to']} from epoch {data['epoch']} "
               f"(switchover took {data['took_ms']} ms at the coordinator)")
