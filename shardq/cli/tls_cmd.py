"""`shardq dev-certs DIR`: a test CA and certificates for TLS (shardq/devcerts.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shardq.cli import app


@app.command("dev-certs")
def dev_certs(
    out: Annotated[Path, typer.Argument(help="Directory to write the CA and certificates to.")],
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="A name or IP the broker/coordinator certificates are valid for "
                       "(repeat; default 127.0.0.1 and localhost).")] = None,
) -> None:
    """Make a test CA, broker and coordinator certificates and a client certificate
    (for development and tests; needs `pip install shardq[tls]`)."""
    from shardq.devcerts import make_dev_certs

    try:
        written = make_dev_certs(out, tuple(host) if host else ("127.0.0.1", "localhost"))
    except ImportError:
        typer.echo("error: dev-certs needs the cryptography package: pip install 'shardq[tls]'",
                   err=True)
        raise typer.Exit(2) from None
    for path in written:
        typer.echo(str(path))
    typer.echo(f"broker: --ssl-cert {out}/broker.pem --ssl-key {out}/broker.key "
               f"--ssl-ca {out}/ca.pem [--ssl-client-ca {out}/ca.pem]", err=True)
    typer.echo(f"client: shardq.connect(..., ssl_ca='{out}/ca.pem')", err=True)
