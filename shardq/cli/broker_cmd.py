"""`shardq broker`: run one broker process."""

from __future__ import annotations

import asyncio
import logging
import os

import typer

from shardq.cli import app


# shape: a typer option list (one parameter a flag, with its help);
# the body only builds the config and calls serve.
@app.command("broker")
def broker(
    broker_id: str = typer.Option("b1", "--id", help="Stable broker id, e.g. b1."),
    port: int = typer.Option(
        7101, help="TCP port; 0 binds a free port and prints READY host:port."),
    data_dir: str = typer.Option("./shardq-data",
                                 help="Directory for this broker's SQLite file."),
    coordinator: str | None = typer.Option(
        None, help="Coordinator URL; without it the broker owns all slots (standalone)."),
    bind: str = typer.Option("127.0.0.1", help="Address to listen on."),
    advertise: str | None = typer.Option(
        None, help="host:port clients should use (default: bind address and bound port)."),
    weight: int = typer.Option(1, min=1, help="Ring weight (share of slots)."),
    zone: str | None = typer.Option(
        None, envvar="SHARDQ_ZONE",
        help="Failure-domain label (rack, zone): with --replicas 1 the coordinator "
             "places followers in another zone than their primary when it can (empty: "
             "none)."),
    fast: bool = typer.Option(
        False, "--fast",
        help="Answer writes BEFORE they are committed: a crash may lose the last few ms of "
             "answered writes. Default is durable (answer after fsync)."),
    token: str | None = typer.Option(
        None, envvar="SHARDQ_TOKEN",
        help="Client token producers and workers must send (prefer --token-file or the "
             "environment: a command line is visible to every local user)."),
    token_file: str | None = typer.Option(None, help="Read the client token from this file."),
    control_token: str | None = typer.Option(
        None, envvar="SHARDQ_CONTROL_TOKEN",
        help="Control token of the coordinator and the other brokers: only it may send "
             "handoff and term ops. Without it the client token may."),
    control_token_file: str | None = typer.Option(
        None, help="Read the control token from this file."),
    coordinator_token: str | None = typer.Option(
        None, envvar="SHARDQ_COORDINATOR_TOKEN",
        help="The coordinator's own token: with it, only a HELLO carrying it may send term "
             "and ownership ops (handoff steps, failover); other control peers may not."),
    coordinator_token_file: str | None = typer.Option(
        None, help="Read the coordinator token from this file."),
    ssl_cert: str | None = typer.Option(
        None, help="PEM certificate: the listener speaks TLS, and links to other brokers "
                   "present it."),
    ssl_key: str | None = typer.Option(None, help="PEM private key of --ssl-cert."),
    ssl_ca: str | None = typer.Option(
        None, help="PEM CA that signed the other brokers' and the coordinator's certificates: "
                   "links to them use TLS and verify them."),
    ssl_client_ca: str | None = typer.Option(
        None, help="Mutual TLS for control: a control connection must present a client "
                   "certificate signed by this CA (and the coordinator's CN for term ops)."),
    metrics_port: int | None = typer.Option(None, help="Serve Prometheus /metrics on this port."),
    max_jobs: int = typer.Option(10_000_000, min=1, help="Over this many jobs, adds get BUSY."),
    max_memory: int = typer.Option(
        0, min=0, help="Over this RSS in bytes, adds get BUSY (0: off)."),
    max_frame: int = typer.Option(16 * 1024 * 1024, min=1024, help="Largest frame in bytes."),
    max_job_data: int = typer.Option(1024 * 1024, min=1, help="Largest job data in bytes."),
    max_connections: int = typer.Option(
        10_000, min=1, help="Most client connections; one more is answered BUSY and closed."),
    handshake_timeout: float = typer.Option(
        5.0, min=0.01, help="Seconds a new connection has to send HELLO."),
    idle_timeout: float = typer.Option(
        300.0, min=0.01, help="Close a connection that sent nothing for this many seconds "
                              "(clients ping every few seconds when idle)."),
    disk_free_limit: int = typer.Option(
        64 * 1024 * 1024, min=0,
        help="Refuse adds (BUSY) while the data dir's filesystem has less free space, in "
             "bytes (0: off); acks and reads go on."),
    verify: bool = typer.Option(
        False, "--verify", help="At start, run SQLite's full integrity_check (slower) instead "
                                "of quick_check."),
    salvage: bool = typer.Option(
        False, "--salvage", help="Start on a damaged data file: leave damaged records out, "
                                 "list them in broker.db.quarantine.jsonl, count them in STATS."),
    drain_on_term: bool = typer.Option(False, help="On SIGTERM, move all slots away first."),
    log_level: str = typer.Option("WARNING", envvar="SHARDQ_LOG_LEVEL"),
) -> None:
    """Run one broker. With no options: b1 on 127.0.0.1:7101, data in ./shardq-data,
    standalone (it owns every slot), as `redis-server` does."""
    import uvloop

    from shardq import failpoints, tls
    from shardq.broker.engine import BrokerConfig
    from shardq.broker.server import ListenerOptions, serve
    from shardq.broker.store import ForeignStorageError
    from shardq.secrets import TokenError, resolve, resolve_pair

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    failpoints.configure(os.environ.get("SHARDQ_FAILPOINTS"))
    try:
        token, control_token = resolve_pair(token, token_file, control_token, control_token_file)
        coordinator_token = resolve(coordinator_token, coordinator_token_file)
    except TokenError as exc:
        raise typer.BadParameter(str(exc)) from None
    tls_opts = tls.TlsOptions(ca=ssl_ca, cert=ssl_cert, key=ssl_key, client_ca=ssl_client_ca)
    if ssl_client_ca is not None and ssl_cert is None:
        raise typer.BadParameter("--ssl-client-ca needs --ssl-cert (a TLS listener)")
    try:
        listener = ListenerOptions(ssl=tls_opts.server_context(),
                                   control_needs_cert=ssl_client_ca is not None,
                                   coordinator_token=coordinator_token)
        tls.set_link_context(tls_opts.link_context())
    except tls.TlsConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    config = BrokerConfig(
        broker_id=broker_id, data_dir=data_dir, advertise=advertise or "", durable=not fast,
        token=token, max_jobs=max_jobs, max_memory=max_memory, max_frame=max_frame,
        max_job_data=max_job_data, max_connections=max_connections, coordinator=coordinator,
        handshake_timeout_s=handshake_timeout, idle_timeout_s=idle_timeout,
        disk_free_limit=disk_free_limit, verify=verify, salvage=salvage,
        weight=weight, zone=_zone(zone), drain_on_term=drain_on_term, control_token=control_token,
        ack_journal=os.environ.get("SHARDQ_ACK_JOURNAL") or None)
    clock = None
    offset_file = os.environ.get("SHARDQ_TEST_WALL_OFFSET_FILE")  # tests only: a stepped wall
    if offset_file:
        from shardq.broker.clock import BrokerClock, offset_wall

        clock = BrokerClock(offset_wall(offset_file))
    from shardq.broker.integrity import CorruptionError

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, bind, port, metrics_port=metrics_port, clock=clock,
                             listener=listener))
    except CorruptionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ForeignStorageError as e:
        logging.getLogger("shardq.broker").error("refusing to start: %s", e)
        raise typer.Exit(2) from None


def _zone(zone: str | None) -> str | None:
    """A zone label: 1-64 printable characters with no spaces (it is shown in
    /status and compared by the coordinator as it is); empty is none (an
    environment that has no zone to give, as a pod on a node without one)."""
    if not zone:
        return None
    if not 1 <= len(zone) <= 64 or not zone.isprintable() or any(c.isspace() for c in zone):
        raise typer.BadParameter(f"--zone must be 1-64 printable characters without spaces, "
                                 f"got {zone!r}")
    return zone
