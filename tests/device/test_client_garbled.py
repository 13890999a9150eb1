"""An edge answer whose bytes do not parse, or none at all (device/client.py, device/client_errors.py).

grpc.aio does not raise for a response it cannot deserialize: it logs "Exception deserializing
message!" and hands back None. Read as a message, that None failed the device's whole run with an
AttributeError (`None.WhichOneof`), outside every error the generation and the run handle: the
tokens so far were lost. A real grpc.aio server here answers with truncated protobuf bytes; the
real `EdgeClient` must end the generation (or the Info) with a precise INTERNAL `EdgeError`. A
stream the edge ends with status OK mid-session was "edge answered OK: stream ended early"
(an error blamed on the edge, with the code of success)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError

from gelato.device.client import EdgeClient
from gelato.device.client_errors import EdgeError
from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant
from gelato.device.policy import parse_policy
from gelato.models import LoadedModel, encode_prompt
from gelato.power import NullMeter
from gelato.types import SamplingParams
from gelato.v1 import gelato_pb2 as pb

# An EdgeMessage's field 2 (a verdict) announcing 5 bytes, 2 of them there: a DecodeError.
TRUNCATED = b"\x12\x05\x08\x01"


async def _garbled_session(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield TRUNCATED


async def _ends_ok(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for _ in requests:
        return
    yield b""  # a generator: never reached


async def _garbled_info(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return TRUNCATED


async def _server(session: Any = _garbled_session) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    handlers = {
        "Session": grpc.stream_stream_rpc_method_handler(session),
        "Info": grpc.unary_unary_rpc_method_handler(_garbled_info),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("gelato.v1.Gelato", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_the_bytes_really_do_not_parse() -> None:
    with pytest.raises(DecodeError):
        pb.EdgeMessage.FromString(TRUNCATED)
    with pytest.raises(DecodeError):
        pb.InfoResponse.FromString(TRUNCATED)


def test_an_info_answer_that_does_not_parse_is_internal() -> None:
    async def run() -> EdgeError:
        server, address = await _server()
        client = EdgeClient(address, connect_timeout_s=5.0)
        try:
            with pytest.raises(EdgeError) as info:
                await client.info()
            return info.value
        finally:
            await client.close()
            await server.stop(None)

    err = asyncio.run(run())
    assert err.code == grpc.StatusCode.INTERNAL and not err.by_edge
    assert "do not parse" in str(err) and "edge answered" not in str(err)


@pytest.mark.parametrize(
    ("session", "needle"), [(_garbled_session, "do not parse"), (_ends_ok, "(status OK) while the session went on")]
)
def test_a_session_answer_that_does_not_parse_ends_the_generation_internal(
    drafter_model: LoadedModel, session: Any, needle: str
) -> None:
    """The open's answer is garbled, or the stream ends OK without one: the generation fails
    INTERNAL (not failed over: another open of the same edge would fare the same), the run's
    handlers get an `EdgeError` that does not say the edge answered."""

    async def run() -> EdgeError:
        server, address = await _server(session)
        client = EdgeClient(address, connect_timeout_s=5.0, failovers=2)
        try:
            prompt = encode_prompt(drafter_model.tokenizer, "Ava has 12 apples.")
            drafter = Drafter(drafter_model, SamplingParams())
            acct = EnergyAccountant(NullMeter(), None)
            with pytest.raises(EdgeError) as info:
                await client.generate(drafter, prompt, 8, parse_policy("fixed-4"), acct)
            return info.value
        finally:
            await client.close()
            await server.stop(None)

    err = asyncio.run(run())
    assert err.code == grpc.StatusCode.INTERNAL and not err.by_edge
    assert needle in str(err) and "edge answered" not in str(err), str(err)
