"""Transport security shared by both processes: TLS credentials and the bearer token.

Contract: pure helpers, no server. `read_token(path)` reads a token file (one line, refused when
empty); `bearer_metadata(token)` is what a client sends with every call; `token_matches(metadata,
token)` compares in constant time (`hmac.compare_digest`), so the comparison's duration says
nothing about the token. `server_credentials` / `channel_credentials` read PEM files into gRPC
credentials (mutual TLS when the server is given a client CA, or the client a certificate and
key). `is_loopback(host)` decides whether an address may be served without TLS and a token. A
missing or unreadable file raises `SecurityConfigError` naming the flag's file.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from pathlib import Path

import grpc

AUTH_HEADER = "authorization"
# Left open without a token: a container health check or a load balancer must see liveness.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class SecurityConfigError(ValueError):
    """A TLS or token file is missing, unreadable or empty."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {path} is empty")
    return data


def read_token(path: str | Path) -> str:
    token = _read(path, "token file").decode("utf-8", errors="strict").strip()
    if any(c.isspace() for c in token):
        raise SecurityConfigError(f"token file {path}: the token must be one word (no spaces or newlines inside)")
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def token_matches(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> bool:
    presented = ""
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            text = value.decode() if isinstance(value, bytes) else value
            presented = text[len("Bearer ") :] if text.startswith("Bearer ") else ""
    return hmac.compare_digest(presented.encode(), token.encode())


def server_credentials(
    cert: str | Path, key: str | Path, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    pair = [(_read(key, "TLS key"), _read(cert, "TLS certificate"))]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=_read(client_ca, "client CA"), require_client_auth=True)


def channel_credentials(
    ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    if (cert is None) != (key is None):
        raise SecurityConfigError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate") if ca else None,
        private_key=_read(key, "TLS key") if key else None,
        certificate_chain=_read(cert, "TLS certificate") if cert else None,
    )


def is_loopback(host: str) -> bool:
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name or a wildcard address: not provably loopback
