"""Certificates made at test time (a CA, a server certificate for localhost/127.0.0.1, two client
certificates), written as PEM files: nothing secret is committed."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    usage: list | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.with_suffix(".key").write_bytes(pem)
        path.with_suffix(".key").chmod(0o600)  # as openssl and make-secrets.sh leave a key: the user's alone


def make_pki(folder: Path, ca_name: str = "gelato-test-ca") -> dict[str, Path]:
    """ca.crt, server.crt/.key (localhost, 127.0.0.1), client.crt/.key and client2.crt/.key (two
    devices), all signed by the CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    _write(folder / "ca", ca)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    _write(
        folder / "server",
        _cert("localhost", server_key, ca_name, ca_key, sans=sans, usage=[ExtendedKeyUsageOID.SERVER_AUTH]),
        server_key,
    )
    for stem, cn in (("client", "gelato-device"), ("client2", "gelato-device-2")):
        client_key = ec.generate_private_key(ec.SECP256R1())
        _write(
            folder / stem,
            _cert(cn, client_key, ca_name, ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]),
            client_key,
        )
    return {p.stem + p.suffix: p for p in folder.iterdir()}
