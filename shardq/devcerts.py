"""`shardq dev-certs DIR`: a test CA and certificates for TLS on one machine.

Writes, in DIR (keys mode 0600):

    ca.pem, ca.key                    the CA (pass ca.pem as --ssl-ca / --ssl-client-ca)
    broker.pem, broker.key            for brokers: CN shardq-broker
    coordinator.pem, coordinator.key  for the coordinator: CN shardq-coordinator
    client.pem, client.key            a client certificate (mutual TLS): CN shardq-client

The broker and coordinator certificates name `hosts` (127.0.0.1 and
localhost) and serve as both server and client certificates, so one
`--ssl-cert` covers a process's listener and the links it dials; the CN
tells a broker whether a control connection is the coordinator's. For
development and tests only: the CA key is kept in DIR, valid for a year.
Needs the `cryptography` package (`pip install shardq[tls]`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Any

from shardq.tls import COORDINATOR_CN

VALID_DAYS = 365
BROKER_CN = "shardq-broker"
# file stem -> (CN, also a server certificate)
CERTS = {"broker": (BROKER_CN, True), "coordinator": (COORDINATOR_CN, True),
         "client": ("shardq-client", False)}


def make_dev_certs(out: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> list[Path]:
    """Write the CA and the certificates into `out`; returns the files written.

    Raises:
        ImportError: the `cryptography` package is not installed.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # a little clock skew is fine
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shardq dev CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    written = [_write(out / "ca.pem", _pem_cert(ca)), _write_key(out / "ca.key", ca_key)]

    def issue(stem: str, cn: str, server: bool) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if server:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [_san(h) for h in hosts]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        written.append(_write(out / f"{stem}.pem", _pem_cert(cert)))
        written.append(_write_key(out / f"{stem}.key", key))

    for stem, (cn, server) in CERTS.items():
        issue(stem, cn, server)
    return written


def _san(host: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = cert.public_bytes(serialization.Encoding.PEM)
    return data


def _write_key(path: Path, key: Any) -> Path:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return _write(path, pem, mode=0o600)


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path
