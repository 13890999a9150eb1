"""Who a Session stream's client is, for `--max-sessions-per-client`.

Contract: `client_of(peer, auth)` names the client behind a call from what gRPC tells the handler
(`context.peer()`, `context.auth_context()`): under mutual TLS the subject of the certificate it
presented (`cert:CN=gelato-device`), since devices behind one NAT share an address but not a
certificate; otherwise its IP address without the port (`ip:10.0.0.7`; an IPv4 address mapped
into IPv6 is written as IPv4, so a dual-stack listener counts one client once), and any other
transport (a Unix socket) as the peer string itself. A bearer token names no one: every device
of a deployment carries the same one. Pure: no gRPC import, tested on its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

# What gRPC's auth context calls a verified peer certificate's subject; older cores give the
# common name only.
_SUBJECT_KEYS = ("x509_subject", "x509_common_name")


def client_of(peer: str, auth: Mapping[str, Iterable[bytes]]) -> str:
    """The client behind a call (module docstring)."""
    for key in _SUBJECT_KEYS:
        values = [v.decode(errors="replace") for v in auth.get(key, ())]
        if values:
            name = values[0] if key == "x509_subject" else f"CN={values[0]}"
            return f"cert:{name}"
    return _address(peer)


def _address(peer: str) -> str:
    """`ipv4:1.2.3.4:5678` -> `ip:1.2.3.4`; `ipv6:[::1]:5678` -> `ip:::1`; else the peer as is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].removeprefix("[").removesuffix("]")
    else:
        return peer
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return f"ip:{address}"
