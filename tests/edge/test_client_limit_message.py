"""`--max-sessions-per-client`: the refusal names the client clipped (a certificate with 500 SANs
made a 9,918-character name, put whole into the status: past gRPC's 8 KiB metadata limit, the
device got a transport error instead of RESOURCE_EXHAUSTED); unique-local IPv6 addresses count
by their /64, as global ones do (each address of a host's network got the limit anew)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gelato.edge.clients import client_of
from gelato.edge.config import EdgeConfig
from gelato.edge.service import GelatoService, _Stream
from gelato.edge.statuses import MAX_DETAILS


class _Aborted(Exception):
    pass


class _Context:
    """What the handler asks of a call: its peer, its auth context, and an abort that ends it."""

    def __init__(self, peer: str, auth: dict[str, list[bytes]]) -> None:
        self._peer, self._auth = peer, auth
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


async def _nothing() -> AsyncIterator[bytes]:
    if False:
        yield b""


def test_a_client_over_its_limit_is_named_clipped() -> None:
    peer = "ipv4:10.0.0.7:5"
    sans = [f"dns:host{i}.fleet.example".encode() for i in range(500)]
    auth = {"x509_subject": [b""], "x509_pem_cert": [b"PEM"], "x509_subject_alternative_name": sans}
    assert len(client_of(peer, auth)) > 8192

    async def run() -> _Context:
        service = GelatoService(EdgeConfig(max_sessions_per_client=1))
        service.streams.add(_Stream(None, client_of(peer, auth)))
        context = _Context(peer, auth)
        with pytest.raises(_Aborted):
            await service.Session(_nothing(), context)  # type: ignore[arg-type]
        return context

    context = asyncio.run(run())
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-sessions-per-client 1" in context.details and "characters)" in context.details
    assert len(context.details) <= MAX_DETAILS


@pytest.mark.parametrize(
    ("a", "b"),
    [("fd00:1:2:3::1", "fd00:1:2:3:aaaa::2"), ("fc12::5", "fc12::6")],
)
def test_unique_local_addresses_count_by_their_64(a: str, b: str) -> None:
    first, second = client_of(f"ipv6:%5B{a}%5D:7", {}), client_of(f"ipv6:%5B{b}%5D:7", {})
    assert first == second and first.endswith("/64")
    assert client_of("ipv6:%5Bfd00:1:2:4::1%5D:7", {}) != client_of("ipv6:%5Bfd00:1:2:3::1%5D:7", {})
