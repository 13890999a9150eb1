"""Transport security shared by both processes: TLS credentials and the bearer token.

Contract: pure helpers, no server. `read_token(path)` reads a token file: one RFC 6750 token68
word (letters, digits, `-._~+/`, then optional trailing `=`; a UTF-8 byte order mark and the
surrounding whitespace are dropped), refused when empty, not UTF-8 or holding any other
character, since gRPC could not send it as a header value. `bearer_metadata(token)` is what a
client sends with every call; `token_matches(metadata, token)` reads `Bearer <token>` (the scheme
in any case, RFC 7235) and compares in constant time (`hmac.compare_digest`): the comparison's
duration may tell the token's length, nothing about its characters.
`server_credentials` / `channel_credentials` read PEM files into gRPC credentials (mutual TLS
when the server is given a client CA, or the client a certificate and key; a client without a CA
trusts gRPC's default roots), checking first that each certificate file holds a certificate and
each key belongs to its certificate. `is_loopback(host)` decides whether an address may be served
without TLS and a token; `target_hosts(target)` lists the hosts a gRPC target (every form
`--edge` takes) names, and `check_token_transport` refuses to send a token in plaintext to a
target naming any non-loopback host. Every failure raises `SecurityConfigError` with one line
naming the file or the flags. A token or key file other users may read or write is used, with a
warning naming it and its mode (as OpenSSH refuses such a key; here a warning, since some secret
mounts cannot be made private to one user).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a CLI sets GRPC_VERBOSITY (gelato.cli_common) before gRPC loads
    import grpc

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
# Left open without a token: a container health check or a load balancer must see liveness, and
# `Check` is all they call. `Watch` (a stream that never ends on its own) needs the token: open,
# anyone reaching the port could hold any number of them.
OPEN_METHODS = ("/grpc.health.v1.Health/Check",)


class SecurityConfigError(ValueError):
    """A TLS or token file is missing, unreadable, empty or malformed, or a token would go out in
    plaintext."""


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise SecurityConfigError(f"{what} {path} is empty")
    return data


_WARNED: set[tuple[str, int]] = set()  # (path, mode) said once: the edge reads its key twice (check, bind)


def _warn_if_shared(path: str | Path, what: str) -> None:
    """Warn when other users may read or replace a secret (group or others bits set): a token
    readable by them lets them call the edge; a key, impersonate it or the device."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:  # reading it failed or will fail with its own message
        return
    if os.name == "posix" and mode & 0o077 and (str(path), mode) not in _WARNED:
        _WARNED.add((str(path), mode))
        log.warning("%s %s is open to other users (mode %04o): chmod 600 %s", what, path, mode, path)


# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_TOKEN68_CHAR = re.compile(r"[A-Za-z0-9\-._~+/=]")


def read_token(path: str | Path) -> str:
    data = _read(path, "token file")
    try:
        text = data.decode("utf-8-sig")  # drops a byte order mark (Windows editors write one)
    except UnicodeDecodeError as exc:
        raise SecurityConfigError(
            f"token file {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "the token must be one word of letters, digits and -._~+/ (RFC 6750)"
        ) from None
    token = text.strip()
    if not token:
        raise SecurityConfigError(f"token file {path} is empty")
    if any(c.isspace() for c in token):
        raise SecurityConfigError(f"token file {path}: the token must be one word (no spaces or newlines inside)")
    if not _TOKEN68.fullmatch(token):
        # Name the character, not the token: the rest of it may be a real secret.
        at = next((i for i, c in enumerate(token) if not _TOKEN68_CHAR.fullmatch(c)), None)
        what = f"character {token[at]!r} at position {at + 1}" if at is not None else "'=' anywhere but at the end"
        raise SecurityConfigError(
            f"token file {path}: {what} is not allowed in a bearer token (RFC 6750: letters, digits and "
            "-._~+/, then optional trailing =)"
        )
    _warn_if_shared(path, "token file")  # once it is known to be used
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def token_matches(metadata: Iterable[tuple[str, str | bytes]] | None, token: str) -> bool:
    presented = ""
    for key, value in metadata or ():
        if key.lower() == AUTH_HEADER:
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, credentials = text.strip().partition(" ")
            # RFC 7235: the scheme is case-insensitive, and spaces may precede the credentials.
            presented = credentials.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(presented.encode(), token.encode())


def _check_certificates(path: str | Path, what: str) -> None:
    """`path` holds at least one PEM certificate (gRPC would only fail later, without naming it)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise SecurityConfigError(f"{what} {path}: no PEM certificate in it{_ssl_reason(exc)}") from None


def _check_pair(cert: str | Path, key: str | Path, server: bool) -> None:
    """The certificate file holds a certificate and the key file the private key of its first one,
    as OpenSSL reads them (the check gRPC makes only when binding or connecting)."""
    _check_certificates(cert, "TLS certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    try:  # the password callback answers at once: never an interactive passphrase prompt
        context.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            raise SecurityConfigError(f"TLS key {key} does not belong to the certificate {cert}") from None
        if b"ENCRYPTED" in _read(key, "TLS key"):
            raise SecurityConfigError(f"TLS key {key} is encrypted: gRPC needs an unencrypted PEM key") from None
        raise SecurityConfigError(f"TLS key {key}: not a PEM private key{_ssl_reason(exc)}") from None


def _ssl_reason(exc: Exception) -> str:
    """` (OpenSSL's reason)`, e.g. ` (no certificate or crl found)`, or "" when it gives none."""
    reason = getattr(exc, "reason", None)
    return f" ({reason.lower().replace('_', ' ')})" if isinstance(reason, str) and reason else ""


def server_credentials(
    cert: str | Path, key: str | Path, client_ca: str | Path | None = None
) -> grpc.ServerCredentials:
    import grpc

    pair = [(_read(key, "TLS key"), _read(cert, "TLS certificate"))]
    _check_pair(cert, key, server=True)
    roots = _read(client_ca, "client CA") if client_ca else None
    if client_ca:
        _check_certificates(client_ca, "client CA")
    _warn_if_shared(key, "TLS key")  # once every file is known to be used
    if roots is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=roots, require_client_auth=True)


def channel_credentials(
    ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS to the edge: trusting `ca`, or without one gRPC's default roots (the Mozilla set grpcio
    bundles, or the file named by GRPC_DEFAULT_SSL_ROOTS_FILE_PATH); `cert`/`key` for mutual TLS."""
    import grpc

    if (cert is None) != (key is None):
        raise SecurityConfigError("a client certificate needs its key, and a key its certificate")
    roots = _read(ca, "CA certificate") if ca else None
    if ca:
        _check_certificates(ca, "CA certificate")
    private_key = _read(key, "TLS key") if key else None
    chain = _read(cert, "TLS certificate") if cert else None
    if cert and key:
        _check_pair(cert, key, server=False)
        _warn_if_shared(key, "TLS key")
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=private_key, certificate_chain=chain)


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name or a wildcard address: not provably loopback


LOCAL_SCHEMES = ("unix", "unix-abstract")  # a socket on this machine: nothing goes over a network


def target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names, as written: `HOST:PORT`, `[V6]:PORT`,
    `dns:[//AUTHORITY/]HOST[:PORT]`, `ipv4:A[:P],B[:P]`, `ipv6:[A]:P,[B]:P`; [] for a `unix:`
    socket. A part it cannot read comes back as it is (and so counts as not loopback)."""
    scheme, sep, rest = target.partition(":")
    scheme = scheme.lower() if sep else ""
    if scheme in LOCAL_SCHEMES:
        return []
    if scheme == "dns":
        if rest.startswith("//"):  # dns://AUTHORITY/HOST:PORT: the authority is the DNS server
            rest = rest[2:].partition("/")[2]
        return [_host_of(rest)]
    if scheme in ("ipv4", "ipv6"):
        return [_host_of(part) for part in rest.split(",")]
    return [_host_of(target)]


def _host_of(address: str) -> str:
    address = address.strip()
    if address.startswith("["):
        return address[1:].partition("]")[0]
    if address.count(":") > 1:  # a bare IPv6 address (an ipv6: target without ports)
        return address
    return address.rpartition(":")[0] if ":" in address else address


def target_is_loopback(target: str) -> bool:
    """True when every host `target` names is loopback (or it is a local socket)."""
    return all(is_loopback(host) for host in target_hosts(target))


def check_token_transport(target: str, tls: bool, token: str | None, insecure: bool = False) -> None:
    """Refuse (SecurityConfigError) to send `token` in plaintext to a target naming any
    non-loopback host unless `insecure`: anyone on the path could read it and use the edge."""
    if token and not tls and not insecure and not target_is_loopback(target):
        raise SecurityConfigError(
            f"refusing to send the bearer token (--auth-token-file) in plaintext to {target}: anyone on the "
            "path could read it; connect with TLS (--tls for the default CA roots, or --tls-ca CA), or pass "
            "--insecure to accept that"
        )
