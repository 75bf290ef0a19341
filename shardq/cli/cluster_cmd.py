"""`shardq cluster up`: run a local cluster (coordinator + N brokers) under one supervisor."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from shardq.cli import app

cluster_app = typer.Typer(help="Run a local cluster.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


# shape: a typer option list (one parameter a flag, with its help);
# the body only starts the processes.
@cluster_app.command("up")
def up(
    n: int = typer.Option(3, "-n", "--brokers", min=1, help="Number of brokers (b1..bN)."),
    data_dir: Annotated[Path, typer.Option(
        help="Root data dir (DIR/coordinator, DIR/bI, DIR/logs).")] = Path("shardq-data"),
    base_port: int = typer.Option(
        7101, min=0, help="bI listens on BASE+I-1; 0 gives each broker a free port."),
    coordinator_port: int = typer.Option(7070, min=0, help="Coordinator HTTP port; 0: a free one."),
    fast: bool = typer.Option(
        False, "--fast",
        help="Start brokers with --fast (answer before commit; see `shardq broker --help`)."),
    token: str | None = typer.Option(
        None, envvar="SHARDQ_TOKEN", help="Token for the coordinator and brokers."),
    ui_actions: bool = typer.Option(
        False, "--ui-actions", help="Let the coordinator's dashboard (/ui) act on queues, "
                                    "jobs and brokers (see `shardq coordinator --help`)."),
    replicas: int = typer.Option(
        0, min=0, max=1, help="1: each broker follows another and failovers are automatic "
                              "(`shardq coordinator --replicas`)."),
    ssl_ca: str | None = typer.Option(
        None, help="PEM CA of the certificates below: every link is TLS and verified."),
    ssl_cert: str | None = typer.Option(
        None, help="PEM certificate for the brokers (and the coordinator, unless "
                   "--ssl-coordinator-cert): listeners speak TLS, the URL is https."),
    ssl_key: str | None = typer.Option(None, help="PEM private key of --ssl-cert."),
    ssl_client_ca: str | None = typer.Option(
        None, help="Brokers require a client certificate signed by it on control "
                   "connections (mutual TLS)."),
    ssl_coordinator_cert: str | None = typer.Option(
        None, help="The coordinator's own certificate (`shardq dev-certs`: coordinator.pem)."),
    ssl_coordinator_key: str | None = typer.Option(
        None, help="PEM private key of --ssl-coordinator-cert."),
) -> None:
    """Start the coordinator and N brokers; restart any that dies; Ctrl-C stops all.

    Prints `READY http://host:port` (the coordinator URL) once every broker is active.
    """
    import uvloop

    from shardq import tls
    from shardq.cli import cluster_registry
    from shardq.coordinator.supervisor import ChildFailed, ClusterConfig, run_cluster

    config = ClusterConfig(brokers=n, data_dir=data_dir, base_port=base_port,
                           coordinator_port=coordinator_port, fast=fast, token=token,
                           ui_actions=ui_actions, registry=cluster_registry(),
                           replicas=replicas, ssl_ca=ssl_ca, ssl_cert=ssl_cert, ssl_key=ssl_key,
                           ssl_client_ca=ssl_client_ca, ssl_coordinator_cert=ssl_coordinator_cert,
                           ssl_coordinator_key=ssl_coordinator_key)
    if ssl_cert and not ssl_ca:
        raise typer.BadParameter("--ssl-cert needs --ssl-ca (the children verify each other)")
    try:  # the supervisor's own calls to the coordinator
        tls.set_link_context(tls.TlsOptions(ca=ssl_ca).link_context())
    except tls.TlsConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    console = Console(stderr=True)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_cluster(config, sys.stdout, console))
    except* ChildFailed as group:
        for e in group.exceptions:
            console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
