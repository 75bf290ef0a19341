"""`shardq coordinator`: run the coordinator process (docs/design.md §6)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from shardq.cli import app


# shape: a typer option list (one parameter a flag, with its help);
# the body only builds the config and serves.
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
        None, envvar="SHARDQ_TOKEN", help="Client token: require `Authorization: Bearer T` "
        "on every request (with --control-token, on reads only)."),
    token_file: str | None = typer.Option(None, help="Read the client token from this file."),
    control_token: str | None = typer.Option(
        None, envvar="SHARDQ_CONTROL_TOKEN",
        help="Control token: only it may change state over HTTP, and it is sent to brokers."),
    control_token_file: str | None = typer.Option(
        None, help="Read the control token from this file."),
    coordinator_token: str | None = typer.Option(
        None, envvar="SHARDQ_COORDINATOR_TOKEN",
        help="Sent to brokers in HELLO instead of the control token; brokers started with "
             "it accept term and ownership ops only from this coordinator."),
    coordinator_token_file: str | None = typer.Option(
        None, help="Read the coordinator token from this file."),
    ssl_cert: str | None = typer.Option(
        None, help="PEM certificate: serve HTTPS, and present it to brokers (mutual TLS)."),
    ssl_key: str | None = typer.Option(None, help="PEM private key of --ssl-cert."),
    ssl_ca: str | None = typer.Option(
        None, help="PEM CA that signed the brokers' certificates: links to brokers use TLS "
                   "and verify them."),
    heartbeat_timeout_ms: int = typer.Option(
        5000, min=1, help="A broker silent this long is marked dead (it keeps its slots)."),
    rebalance_concurrency: int = typer.Option(
        2, min=1, help="Handoffs (moves of up to 64 slots) run at once."),
    rebalance_throttle_ms: int = typer.Option(
        0, min=0, help="Minimum time between the starts of two handoffs."),
    auto_rebalance: bool = typer.Option(
        True, help="Activate brokers that join after bootstrap and move slots onto them."),
    handoff_copy_timeout_s: float = typer.Option(
        600.0, min=1.0, help="How long a handoff's snapshot copy may take."),
    handoff_retry_budget_s: float = typer.Option(
        30.0, min=0.0,
        help="A handoff step failing this long before the commit point aborts the handoff."),
    handoff_copy_rate: int = typer.Option(
        0, min=0, help="Jobs/s one handoff's copy may stream (0: unpaced); pacing trades "
                       "a longer move for less CPU taken from serving."),
    ui_actions: bool = typer.Option(
        False, "--ui-actions",
        help="Let the dashboard at /ui retry, remove and promote jobs, pause queues, drain "
             "brokers... (each asks for confirmation); without it the dashboard is read-only."),
    replicas: int = typer.Option(
        0, min=0, max=1,
        help="1: every broker gets a follower on another broker; a write is answered once "
             "both disks have it, and a dead broker's slots fail over to its follower "
             "(docs/design.md §12). 0: no replication."),
    log_level: str = typer.Option("INFO", envvar="SHARDQ_LOG_LEVEL"),
) -> None:
    """Run the coordinator: membership, topology, handoffs and status over HTTP."""
    from shardq import failpoints, tls
    from shardq.coordinator import CoordinatorConfig, serve
    from shardq.secrets import TokenError, resolve, resolve_pair

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    failpoints.configure(os.environ.get("SHARDQ_FAILPOINTS"))
    try:
        token, control_token = resolve_pair(token, token_file, control_token, control_token_file)
        coordinator_token = resolve(coordinator_token, coordinator_token_file)
    except TokenError as exc:
        raise typer.BadParameter(str(exc)) from None
    opts = tls.TlsOptions(ca=ssl_ca, cert=ssl_cert, key=ssl_key)
    try:
        opts.server_context()  # a bad file is refused here, not inside uvicorn
        tls.set_link_context(opts.link_context())
    except tls.TlsConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    serve(CoordinatorConfig(
        data_dir=data_dir, port=port, bind=bind, advertise=advertise, expect=expect,
        token=token, control_token=control_token, heartbeat_timeout_ms=heartbeat_timeout_ms,
        rebalance_concurrency=rebalance_concurrency, rebalance_throttle_ms=rebalance_throttle_ms,
        auto_rebalance=auto_rebalance, handoff_copy_timeout_s=handoff_copy_timeout_s,
        handoff_retry_budget_s=handoff_retry_budget_s, handoff_copy_rate=handoff_copy_rate,
        ui_actions=ui_actions,
        replicas=replicas, coordinator_token=coordinator_token, ssl_cert=ssl_cert,
        ssl_key=ssl_key))
