"""The outcome a session's end is logged with (`event: session_end`): OK only after the device's
close message; a stream that ends with none — the device half-closed, or cancelled its call, which
gRPC often shows the edge as the stream's end — is WITHOUT_CLOSE, not OK."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from gelato.edge.server import EdgeConfig, EdgeServer
from gelato.models import LoadedModel
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from tests.edge.test_batched_grpc import open_msg


def _ends(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.fields["outcome"] for r in caplog.records if getattr(r, "fields", {}).get("event") == "session_end"]


def _outcomes(pair: dict[str, Path], fingerprint: str, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.set_level(logging.INFO, logger="gelato.edge")

    async def scenario() -> None:
        server = EdgeServer(EdgeConfig(port=0))
        port = await server.start()
        await server.load(str(pair["target"]), "float32", "cpu")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for n, ending in enumerate(("close", "half-close", "cancel"), 1):
                call = pb_grpc.GelatoStub(channel).Session()
                await call.write(open_msg(fingerprint, 5, 8))
                assert (await call.read()).HasField("opened")
                if ending == "close":
                    await call.write(pb.DeviceMessage(close=pb.CloseSession()))
                    await call.done_writing()
                    assert await call.code() == grpc.StatusCode.OK
                elif ending == "half-close":
                    await call.done_writing()
                    assert await call.code() == grpc.StatusCode.OK
                else:
                    call.cancel()
                for _ in range(100):  # the edge logs the end once its handler has seen it
                    if len(_ends(caplog)) == n:
                        break
                    await asyncio.sleep(0.02)
        await server.stop(0)

    asyncio.run(scenario())
    return _ends(caplog)


def test_only_a_close_ends_a_session_ok(
    pair: dict[str, Path], drafter_model: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    assert _outcomes(pair, drafter_model.fingerprint, caplog) == ["OK", "WITHOUT_CLOSE", "WITHOUT_CLOSE"]
