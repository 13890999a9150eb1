"""Health is NOT_SERVING until the target is loaded, then SERVING; Info is UNAVAILABLE meanwhile."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gelato.edge.server import EdgeConfig, EdgeServer
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc


def test_health_flips_after_load(pair: dict[str, Path]) -> None:
    async def scenario() -> None:
        server = EdgeServer(EdgeConfig(port=0))
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            req = health_pb2.HealthCheckRequest(service="gelato.v1.Gelato")
            assert (await health.Check(req, timeout=5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                await pb_grpc.GelatoStub(channel).Info(pb.InfoRequest(), timeout=5)
                raise AssertionError("Info answered before the model was loaded")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
            await server.load(str(pair["target"]), "float32", "cpu")
            assert (await health.Check(req, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
            info = await pb_grpc.GelatoStub(channel).Info(pb.InfoRequest(), timeout=5)
            assert info.target_model == str(pair["target"])
        await server.stop(0)

    asyncio.run(scenario())
