"""The `shardq` command: one typer app, one module per sub-command group."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="shardq",
    help="shardq: a sharded, durable job-queue broker cluster.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """shardq: a sharded, durable job-queue broker cluster."""


# Server processes are started by the hundred (tests, `cluster up`, scale out):
# `shardq broker ...` / `shardq coordinator ...` import only their own module,
# not the whole CLI (rich tables, the bench and deploy helpers): a broker is
# READY in ~0.22 s instead of ~0.45 s. Anything else, and any importer, gets
# every command.
_SERVER_COMMANDS = {"broker": "broker_cmd", "coordinator": "coordinator_cmd"}


def _server_command_module(argv: list[str]) -> str | None:
    if len(argv) < 2:
        return None
    entry = Path(argv[0])
    started_as_shardq = entry.name == "shardq" or (
        entry.name == "__main__.py" and entry.parent.name == "shardq")
    return _SERVER_COMMANDS.get(argv[1]) if started_as_shardq else None


def _register() -> None:
    only = _server_command_module(sys.argv)
    if only is not None:
        importlib.import_module(f"shardq.cli.{only}")
        return
    # Each module adds its commands to `app`; imported here so `shardq --help`
    # lists them all and each stays a small file.
    from shardq.cli import (
        admin_cmd,  # noqa: F401
        bench_cmd,  # noqa: F401
        broker_cmd,  # noqa: F401
        cluster_cmd,  # noqa: F401
        coordinator_cmd,  # noqa: F401
        demo_cmd,  # noqa: F401
        deploy_cmd,  # noqa: F401
        jobs_cmd,  # noqa: F401
        replication_cmd,  # noqa: F401
        scale_cmd,  # noqa: F401
        stats_cmd,  # noqa: F401
        tls_cmd,  # noqa: F401
        worker_cmd,  # noqa: F401
    )


_register()


def cluster_registry() -> Path:
    """Where `cluster up` leaves a pointer per coordinator URL, for `scale`
    (coordinator/cluster_control.py): $SHARDQ_STATE_DIR/clusters, default
    ~/.local/state/shardq/clusters."""
    import os

    base = os.environ.get("SHARDQ_STATE_DIR") or str(Path.home() / ".local" / "state" / "shardq")
    return Path(base) / "clusters"


def main() -> None:
    _tls_from_env()
    app()


def _tls_from_env() -> None:
    """Admin commands reach a TLS cluster with SHARDQ_SSL_CA (and, for mutual
    TLS, SHARDQ_SSL_CERT/SHARDQ_SSL_KEY); server commands then set their own
    from their --ssl-* options (shardq/tls.py)."""
    import os

    ca, cert = os.environ.get("SHARDQ_SSL_CA"), os.environ.get("SHARDQ_SSL_CERT")
    if not ca and not cert:
        return
    from shardq import tls

    try:
        tls.set_link_context(tls.client_context(ca or None, cert or None,
                                                os.environ.get("SHARDQ_SSL_KEY") or None))
    except tls.TlsConfigError as exc:
        sys.exit(f"error: SHARDQ_SSL_*: {exc}")
