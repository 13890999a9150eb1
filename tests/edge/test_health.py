"""Health is NOT_SERVING until the target is loaded, then SERVING; Info is UNAVAILABLE meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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


def test_endless_streams_are_capped_and_free_their_place(pair: dict[str, Path]) -> None:
    """Health's Watch and reflection never end on their own: past the cap, one more is refused
    RESOURCE_EXHAUSTED at once; a stream that ends frees its place; an overlong service name is
    refused INVALID_ARGUMENT (a watcher would hold it for as long as it watches)."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from gelato.edge.endless import MAX_SERVICE_NAME_CHARS, REFLECTION, WATCH

    async def refused(call: grpc.aio.Call) -> grpc.StatusCode:
        try:
            async for _ in call:  # type: ignore[attr-defined]
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        raise AssertionError("the stream ended without an error")

    async def scenario() -> None:
        server = EdgeServer(EdgeConfig(port=0))
        server.stream_cap.limit = 2
        port = await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            long_name = health_pb2.HealthCheckRequest(service="x" * (MAX_SERVICE_NAME_CHARS + 1))
            assert await refused(health.Watch(long_name, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
            try:
                await health.Check(long_name, timeout=5)
                raise AssertionError("Check answered an overlong service name")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            req = health_pb2.HealthCheckRequest(service="")
            watches = [health.Watch(req, timeout=10) for _ in range(2)]
            for w in watches:
                assert (await w.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await refused(health.Watch(req, timeout=10)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            watches[0].cancel()
            for _ in range(500):  # the server sees the cancel a moment later (up to 10 s on a busy machine)
                if server.stream_cap.active[WATCH] < 2:
                    break
                await asyncio.sleep(0.02)
            again = health.Watch(req, timeout=10)
            assert (await again.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING

            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            streams = [stub.ServerReflectionInfo(timeout=10) for _ in range(2)]
            for s in streams:
                await s.write(ask)
                assert (await s.read()).list_services_response.service
            # Refused at its start, before any message: nothing is written to it (a write racing
            # the refusal raised it, or a core write failure that hides it).
            extra = stub.ServerReflectionInfo(timeout=10)
            assert await refused(extra) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert server.stream_cap.active[REFLECTION] == 2

            for call in (*watches[1:], again, *streams):
                call.cancel()
        await server.stop(0)

    asyncio.run(scenario())


def test_a_health_watcher_does_not_hold_the_shutdown() -> None:
    """A health `Watch` never ends on its own: with no session open, gRPC's stop waited for it to
    the end of the grace period plus its backstop (6 s for a 5 s grace). The watcher gets
    NOT_SERVING, then its stream ends, and the edge stops at once; a reflection stream too, ended
    UNAVAILABLE."""
    import time

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def scenario() -> tuple[list[int], float, grpc.StatusCode]:
        server = EdgeServer(EdgeConfig(port=0))
        port = await server.start()
        seen: list[int] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            asks: asyncio.Queue[reflection_pb2.ServerReflectionRequest | None] = asyncio.Queue()

            async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                while (ask := await asks.get()) is not None:
                    yield ask

            browse = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(requests())
            await asks.put(reflection_pb2.ServerReflectionRequest(list_services=""))
            await browse.read()
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

            async def follow() -> None:
                try:
                    async for reply in watch:
                        seen.append(reply.status)
                except grpc.aio.AioRpcError:
                    pass  # ended by the edge: how is not the point

            watching = asyncio.ensure_future(follow())
            while not seen:
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            await server.stop(5.0)
            took = time.perf_counter() - t0
            await asyncio.wait_for(watching, 5)
            browsed = await asyncio.wait_for(browse.code(), 5)
        return seen, took, browsed

    seen, took, browsed = asyncio.run(scenario())
    assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, seen
    assert took < 2.0, took
    assert browsed == grpc.StatusCode.UNAVAILABLE
