"""An edge gone for good mid-run is waited for once: the generation that lost it waits up to
`--edge-wait-s` (and fails), and the next generation's first open that finds no edge ends the
run at once. It waited the whole time again (twice the wait, and more attempts, before the run
ended as unreachable). An edge that answers again clears it."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gelato.device.client import EdgeClient
from gelato.device.client_errors import EdgeUnreachable
from gelato.device.drafter import Drafter
from gelato.device.policy import parse_policy
from gelato.models import LoadedModel, encode_prompt
from gelato.types import SamplingParams
from gelato.v1 import gelato_pb2 as pb
from tests.device.test_client_stream import _Stream

WAIT_S = 1.0


def test_a_second_generation_does_not_wait_again_for_a_gone_edge(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    gone = [False]
    infos: list[float] = []

    async def run() -> tuple[str, float]:
        client = EdgeClient("127.0.0.1:1", failovers=2, edge_wait_s=WAIT_S, connect_timeout_s=0.05)

        async def connect(timeout_s: float | None = None) -> None:
            if gone[0]:
                raise EdgeUnreachable(client.target, timeout_s or client.connect_timeout_s, False)

        first = _Stream(target, cut_after=2)

        class Stub:
            def Session(self, **kwargs: object) -> _Stream:
                gone[0] = True  # the edge dies with the first session: no later connect succeeds
                return first

            async def Info(self, request: pb.InfoRequest, **kwargs: object) -> pb.InfoResponse:
                infos.append(time.monotonic())
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "")

        client.connect = connect  # type: ignore[method-assign]
        client.stub = Stub()  # type: ignore[assignment]
        try:
            prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")
            drafter, policy = Drafter(drafter_model, SamplingParams()), parse_policy("fixed-4")
            res = await client.generate(drafter, prompt, 20, policy)
            t0 = time.monotonic()
            with pytest.raises(EdgeUnreachable):
                await client.generate(drafter, prompt, 20, policy)
            return res.error, time.monotonic() - t0
        finally:
            await client.close()

    error, second_s = asyncio.run(run())
    assert "re-opening the session failed" in error  # the first generation waited, then failed
    assert second_s < 0.5 * WAIT_S, second_s  # the second did not wait again
