"""While the target loads, an open from a device that speaks another protocol version is refused
FAILED_PRECONDITION at once (it can never be served); one that speaks this edge's gets UNAVAILABLE
(the model is still loading: wait and ask again). The version was checked only once the model was
there, so a device of another version was told to wait for as long as the load took."""

from __future__ import annotations

import asyncio

import grpc

from gelato.edge.server import EdgeConfig, EdgeServer
from gelato.types import PROTOCOL_VERSION
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc


def test_another_protocol_is_refused_while_the_target_loads() -> None:
    async def status(channel: grpc.aio.Channel, version: int) -> tuple[grpc.StatusCode, str]:
        call = pb_grpc.GelatoStub(channel).Session(timeout=10)
        await call.write(pb.DeviceMessage(open=pb.OpenSession(protocol_version=version, prefix_ids=[5, 6])))
        await call.done_writing()
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return await call.code(), await call.details() or ""

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        server = EdgeServer(EdgeConfig(port=0))  # never given a target: loading for ever
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return [await status(channel, v) for v in (PROTOCOL_VERSION + 1, PROTOCOL_VERSION)]
        finally:
            await server.stop(0)

    (other, same) = asyncio.run(scenario())
    assert other[0] == grpc.StatusCode.FAILED_PRECONDITION and f"this edge speaks {PROTOCOL_VERSION}" in other[1]
    assert same[0] == grpc.StatusCode.UNAVAILABLE and "loading" in same[1]
