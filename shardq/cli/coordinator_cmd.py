"""`shardq coordinator`: run the coordinator process (DESIGN §6)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from shardq.cli import app


@app.command("coordinator")
def coordinator(
    data_dir: Annotated[Path, typer.Option(help="Directory for the coordinator's SQLite file.")],
    port: int = typer.Option(
        7070, help="HTTP port; 0 binds a free port and prints READY host:port."),
    bind: str = typer.Option("127.0.0.1", help="Address to listen on."),
    advertise: str | None = typer.Option(
        None, help="host:port brokers and clients should use to reach the coordinator."),
    expect: int = typer.Option(
        1, min=1, help="Brokers to wait for before the first slot assignment (bootstrap)."),
    token: str | None = typer.Option(
        None, envvar="SHARDQ_TOKEN", help="Require `Authorization: Bearer T` on every request."),
    heartbeat_timeout_ms: int = typer.Option(
        5000, min=1, help="A broker silent this long is marked dead (it keeps its slots)."),
    log_level: str = typer.Option("INFO", envvar="SHARDQ_LOG_LEVEL"),
) -> None:
    """Run the coordinator: membership, topology and status over HTTP."""
    from shardq.coordinator import CoordinatorConfig, serve

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(CoordinatorConfig(
        data_dir=data_dir, port=port, bind=bind, advertise=advertise, expect=expect,
        token=token, heartbeat_timeout_ms=heartbeat_timeout_ms))
