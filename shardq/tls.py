"""TLS for every shardq listener and link, with the stdlib `ssl` module.

TLS is optional (README "Security and limits"). Options follow httpx and
redis-py: `ssl_ca` (the CA that signed the peer's certificate: the peer is
verified against it, host name included), `ssl_cert` + `ssl_key` (this
side's certificate: a server's, or a client's for mutual TLS) and, on a
broker, `ssl_client_ca`: a control connection must then present a client
certificate signed by it (docs/design.md §4).

A server process (broker, coordinator) also dials: a broker calls other
brokers (handoff copy, replication, flows) and the coordinator's HTTP API;
the coordinator calls brokers. Those outbound links use the process's
*link context*, set once by the entry point (`set_link_context`) from the
same CLI options, so each of the many internal callers need not carry it
(the one piece of process-wide state here; library callers pass contexts).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

# Certificate names of the roles `shardq dev-certs` issues (CN of the subject).
COORDINATOR_CN = "shardq-coordinator"


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """The TLS options of one process (all paths to PEM files)."""

    ca: str | None = None  # verify peers (servers, and links this process dials) against it
    cert: str | None = None  # this process's certificate (chain)
    key: str | None = None  # its private key
    client_ca: str | None = None  # a server: control connections need a cert signed by it

    @property
    def serves(self) -> bool:
        """Whether this process's listeners speak TLS (it has a certificate)."""
        return self.cert is not None

    def server_context(self) -> ssl.SSLContext | None:
        """The listener's context, or None when the listener speaks cleartext."""
        if self.cert is None:
            return None
        return server_context(self.cert, self.key, client_ca=self.client_ca)

    def link_context(self) -> ssl.SSLContext | None:
        """The context for links this process dials, or None (cleartext)."""
        if self.ca is None and self.cert is None:
            return None
        return client_context(self.ca, self.cert, self.key)


class TlsConfigError(ValueError):
    """A TLS option that cannot be used (missing file, key not matching, no key)."""


def client_context(ca: str | Path | None = None, cert: str | Path | None = None,
                   key: str | Path | None = None) -> ssl.SSLContext:
    """A context that verifies the server against `ca` (the system CAs when None)
    and, given `cert`, presents it (mutual TLS).

    Raises:
        TlsConfigError: a file cannot be read or the key does not match.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(ca) if ca is not None else None)
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"TLS client options unusable: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(cert: str | Path, key: str | Path | None = None, *,
                   client_ca: str | Path | None = None) -> ssl.SSLContext:
    """A listener's context presenting `cert`; with `client_ca`, client
    certificates signed by it are verified when offered (CERT_OPTIONAL: a
    client connection needs none, a control connection is refused without
    one by the broker, broker/server.py).

    Raises:
        TlsConfigError: a file cannot be read or the key does not match.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
        if client_ca is not None:
            ctx.load_verify_locations(cafile=str(client_ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"TLS server options unusable: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def peer_common_name(peercert: object) -> str | None:
    """The subject CN of a verified peer certificate (`getpeercert()`), or None."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


_link: ssl.SSLContext | None = None


def set_link_context(ctx: ssl.SSLContext | None) -> None:
    """Set the context of this process's own outbound links (entry points only)."""
    global _link
    _link = ctx


def link_context() -> ssl.SSLContext | None:
    """The context set by `set_link_context`, or None (cleartext links)."""
    return _link
