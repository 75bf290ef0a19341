"""The `shardq` command: one typer app, one module per sub-command group."""

from __future__ import annotations

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


def _register() -> None:
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
        scale_cmd,  # noqa: F401
        stats_cmd,  # noqa: F401
    )


_register()


def main() -> None:
    app()
