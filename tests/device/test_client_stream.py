"""The device's stream writes when the edge ends the stream under them (device/client.py).

grpc.aio reports a write that fails because the call ended meanwhile as INTERNAL "Internal error
from Core" and drops the status the server sent. A send-ahead device writes while the edge may be
ending its stream (shutting down), so such a write must read as the stream going away
(UNAVAILABLE, which fails the session over), never as an edge fault. A real grpc.aio server here
ends each stream UNAVAILABLE after two messages while the real `EdgeClient` keeps writing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gelato.device.client import EdgeClient, EdgeError, _write_error
from gelato.v1 import gelato_pb2 as pb

SESSION = "/gelato.v1.Gelato/Session"
BLOCK = pb.DeviceMessage(draft=pb.DraftBlock(round=0, ids=list(range(8))))


async def _cut_after_two(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    seen = 0
    async for _ in requests:
        seen += 1
        if seen == 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "edge shutting down")
    yield b""


async def _server() -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(_cut_after_two)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("gelato.v1.Gelato", {"Session": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _write_until_refused(client: EdgeClient, writes: int = 2000) -> EdgeError | None:
    call = client.stub.Session()
    try:
        for _ in range(writes):
            await client._write(call, BLOCK)
    except EdgeError as exc:
        return exc
    finally:
        call.cancel()
    return None


def test_a_write_cut_by_the_edge_reads_as_unavailable() -> None:
    async def run() -> list[EdgeError | None]:
        server, address = await _server()
        client = EdgeClient(address, connect_timeout_s=5)
        try:
            await client.connect()
            return [await _write_until_refused(client) for _ in range(30)]
        finally:
            await client.close()
            await server.stop(None)

    errors = asyncio.run(run())
    assert all(e is not None for e in errors), "every stream is cut after two messages"
    assert {e.code for e in errors if e is not None} == {grpc.StatusCode.UNAVAILABLE}, [str(e) for e in errors]


def test_only_the_core_write_failure_is_mapped() -> None:
    """Raw grpc.aio writes into the same server: the failures it really raises, mapped one by one.
    The edge's own statuses (here UNAVAILABLE; an INTERNAL with its own details) pass unchanged."""

    async def run() -> list[grpc.aio.AioRpcError]:
        server, address = await _server()
        seen: list[grpc.aio.AioRpcError] = []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                session = channel.stream_stream(SESSION)
                for _ in range(30):
                    call = session()
                    try:
                        for _ in range(2000):
                            await call.write(BLOCK.SerializeToString())
                    except grpc.aio.AioRpcError as exc:
                        seen.append(exc)
                    except asyncio.InvalidStateError:
                        pass  # the call had ended before the write began: its status is the edge's
                    call.cancel()
        finally:
            await server.stop(None)
        return seen

    seen = asyncio.run(run())
    # What the mapping is for: grpc.aio does raise it here (were it gone, the mapping would be moot).
    assert any(exc.details() == "Internal error from Core" for exc in seen), [exc.details() for exc in seen]
    for exc in seen:
        mapped = _write_error(exc)
        if exc.details() == "Internal error from Core":
            assert mapped.code == grpc.StatusCode.UNAVAILABLE
            assert "ended while a message was being sent" in mapped.details
        else:
            assert (mapped.code, mapped.details) == (exc.code(), exc.details())

    own = grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(), "verify failed")
    assert _write_error(own).code == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE])
def test_other_write_failures_keep_their_status(code: grpc.StatusCode) -> None:
    exc = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "Internal error from Core")
    assert _write_error(exc).code == code
