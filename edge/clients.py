"""Who a Session stream's client is, for `--max-sessions-per-client`.

Contract: `client_of(peer, auth)` names the client behind a call from what gRPC tells the handler
(`context.peer()`, `context.auth_context()`). Under mutual TLS it is the certificate the client
presented: named by its subject (its subject alternative names when the subject is empty) and told
apart by the certificate's SHA-256 (`cert:CN=dev-7 sha256:1f2e...`), so devices behind one NAT,
and devices whose certificates share a subject, are different clients, and one device is one
client over any number of connections. Otherwise it is the IP address without the port
(`ip:10.0.0.7`; an IPv4 address mapped into IPv6, or behind a NAT64 gateway's well-known prefix,
as IPv4; a global or unique-local IPv6 address by its /64, since
one host may use any address of its network: `ip:2a00:1450:4001:81c::/64`); any other transport as the
peer string itself (gRPC names every Unix-socket peer `unix:`: one client). A bearer token names no
one: every device of a deployment carries the same one. Pure: no gRPC import, tested on its own.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

# RFC 6052's well-known NAT64 prefix: an IPv4 client reaching an IPv6-only edge through a gateway
# arrives as 64:ff9b::a.b.c.d (all such clients in one /64: counted by the IPv4 address instead).
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Unique local addresses (RFC 4193, a site's private network): a host picks any address of its /64
# as freely as with a global one (counted one by one, each address of it got the limit anew).
ULA = ipaddress.IPv6Network("fc00::/7")


def client_of(peer: str, auth: Mapping[str, Iterable[bytes]]) -> str:
    """The client behind a call (module docstring)."""
    pem = _first(auth, "x509_pem_cert")
    cn = _first(auth, "x509_common_name")
    subject = _first(auth, "x509_subject") or (f"CN={cn}" if cn else "")
    if pem or subject:
        name = subject or ",".join(_all(auth, "x509_subject_alternative_name")) or "no subject"
        digest = f" sha256:{hashlib.sha256(pem.encode()).hexdigest()[:16]}" if pem else ""
        return f"cert:{name}{digest}"
    return _address(peer)


def _all(auth: Mapping[str, Iterable[bytes]], key: str) -> list[str]:
    """The non-empty values of an auth-context property (a certificate without a subject gives
    an empty one)."""
    return [text for v in auth.get(key, ()) if (text := v.decode(errors="replace"))]


def _first(auth: Mapping[str, Iterable[bytes]], key: str) -> str:
    values = _all(auth, key)
    return values[0] if values else ""


def _address(peer: str) -> str:
    """`ipv4:1.2.3.4:5678` -> `ip:1.2.3.4`; `ipv6:%5B::1%5D:5678` (gRPC escapes the brackets)
    -> `ip:::1`; else the peer as is."""
    kind, _, rest = unquote(peer).partition(":")
    host = rest.rpartition(":")[0]
    if kind == "ipv6":
        host = host.removeprefix("[").removesuffix("]")
    elif kind != "ipv4":
        return peer
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        if address in NAT64:  # an IPv4 client through a NAT64 gateway: the address it embeds
            return f"ip:{ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)}"
        if address.is_global or address in ULA:
            return f"ip:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ip:{address}"
