"""A call without the token is refused before its request is read: a unary-request method (`Info`,
health's `Watch`) was refused only once its one request message arrived, so a caller without the
token could hold such calls open by never sending it (any number of them, each kept on the edge's
event loop), and tell the methods that exist (hanging) from those that do not (refused at once).
The health-only port refuses `Watch` the same way."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gelato.security import channel_credentials
from tests.conftest import EdgeProcess
from tests.edge.test_cli import free_port
from tests.edge.test_security import pki, secure_edge  # noqa: F401 (fixtures)

METHODS = ("/gelato.v1.Gelato/Info", "/grpc.health.v1.Health/Watch", "/gelato.v1.Gelato/Session")


def _silent(stop: threading.Event) -> Iterator[bytes]:
    stop.wait(30)  # sends no request, and does not half-close either, until the test ends
    yield from ()


def _code_without_a_request(channel: grpc.Channel, method: str) -> grpc.StatusCode:
    stop = threading.Event()
    try:
        call = channel.stream_stream(method)(_silent(stop), timeout=8)
        with pytest.raises(grpc.RpcError) as info:
            next(call)
        return info.value.code()
    finally:
        stop.set()


@pytest.mark.parametrize("method", METHODS)
def test_no_token_no_request_is_refused_at_once(
    pki: dict[str, Path],  # noqa: F811 (the fixture)
    secure_edge: EdgeProcess,  # noqa: F811 (the fixture)
    method: str,
) -> None:
    with grpc.secure_channel(secure_edge.address, channel_credentials(pki["ca.crt"])) as channel:
        assert _code_without_a_request(channel, method) == grpc.StatusCode.UNAUTHENTICATED


def test_the_health_port_refuses_watch_before_its_request(pair: dict[str, Path]) -> None:
    port = free_port()
    edge = EdgeProcess(["--target", str(pair["target"]), "--health-port", str(port)])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            code = _code_without_a_request(channel, "/grpc.health.v1.Health/Watch")
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        edge.stop()
