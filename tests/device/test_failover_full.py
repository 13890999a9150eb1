"""A re-open that a replica refuses as full (RESOURCE_EXHAUSTED: its session, KV or waiting-room
limit) is one attempt of `--failovers`, not the generation's end: a fleet that lost a replica
re-opens at once, and round_robin may hand a re-open to a replica already full while another has
room. A first open refused so still fails its prompt at once, as before."""

from __future__ import annotations

import time

import grpc
import pytest

from gelato.device.client_errors import EdgeError
from gelato.models import LoadedModel
from gelato.v1 import gelato_pb2 as pb
from tests.device.test_client_stream import _generate, _Stream

FULL = "edge is at its session limit (64 open): try again later"


class _Full(_Stream):
    """A replica at its limit: the open is read, then the stream ends RESOURCE_EXHAUSTED."""

    async def _take(self, msg: pb.DeviceMessage) -> None:
        assert msg.WhichOneof("kind") == "open"
        self.replies.put_nowait(None)

    async def read(self) -> pb.EdgeMessage:
        await self.replies.get()
        raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), FULL)

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    async def details(self) -> str:
        return FULL


def test_a_reopen_refused_as_full_is_tried_again(target: LoadedModel, drafter_model: LoadedModel) -> None:
    ref = _generate(target, drafter_model, [_Stream(target)], failovers=0)
    streams = [_Stream(target, cut_after=2), _Full(target), _Stream(target)]
    t0 = time.monotonic()
    res = _generate(target, drafter_model, streams, failovers=2)
    assert (res.token_ids, res.stats.stop_reason, res.error, res.failovers) == (
        ref.token_ids,
        ref.stats.stop_reason,
        "",
        1,
    )
    assert time.monotonic() - t0 >= 0.5  # a pause before asking again (the edge said: later)
    # With no attempt left the refusal ends the generation, with the tokens so far and why.
    res = _generate(target, drafter_model, [_Stream(target, cut_after=2), _Full(target)], failovers=1)
    assert res.stats.stop_reason == "error" and "RESOURCE_EXHAUSTED" in res.error and "session limit" in res.error
    assert res.token_ids == ref.token_ids[: len(res.token_ids)]


def test_a_first_open_refused_as_full_fails_at_once(target: LoadedModel, drafter_model: LoadedModel) -> None:
    with pytest.raises(EdgeError, match="RESOURCE_EXHAUSTED"):
        _generate(target, drafter_model, [_Full(target), _Stream(target)], failovers=2)


def test_a_reopen_reaching_another_target_ends_the_generation(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """A re-open that lands on a replica serving another target (a new checkpoint mid-upgrade):
    its tokens would continue the generation with that target's decoding, no longer the output
    of the one it began with. The generation ends there, its tokens kept, saying why; it is not
    tried again (the third replica, right, is never asked), and no re-open is counted."""
    ref = _generate(target, drafter_model, [_Stream(target)], failovers=0)
    never = _Stream(target)
    streams = [_Stream(target, cut_after=2), _Stream(target, target_name="tiny-target-v2"), never]
    res = _generate(target, drafter_model, streams, failovers=2)
    assert res.stats.stop_reason == "error" and res.failovers == 0 and never.session is None
    assert "FAILED_PRECONDITION" in res.error and "serves target 'tiny-target-v2'" in res.error, res.error
    assert "not 'tiny-target'" in res.error
    assert 0 < len(res.token_ids) < len(ref.token_ids) and res.token_ids == ref.token_ids[: len(res.token_ids)]
    assert res.target_model == "tiny-target"


def test_a_reopen_compares_the_end_tokens_in_effect(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """A fleet partway through a software upgrade: the replica that began the generation names
    the target's end tokens, the one that takes the re-open is older and names none (the device
    then ends at its drafter's, the same here). Same target: it goes on. One naming other end
    tokens is another target."""
    ref = _generate(target, drafter_model, [_Stream(target)], failovers=0)
    ends = tuple(sorted(set(drafter_model.eos_token_ids)))
    assert ends  # the tiny pair has an end token, or this would compare nothing
    for first_eos, then_eos in ((ends, None), (None, ends)):
        streams = [_Stream(target, cut_after=2, eos_ids=first_eos), _Stream(target, eos_ids=then_eos)]
        res = _generate(target, drafter_model, streams, failovers=1)
        assert (res.token_ids, res.error, res.failovers) == (ref.token_ids, "", 1)
    streams = [_Stream(target, cut_after=2, eos_ids=ends), _Stream(target, eos_ids=(*ends, 7))]
    res = _generate(target, drafter_model, streams, failovers=1)
    assert res.stats.stop_reason == "error" and "FAILED_PRECONDITION" in res.error and "end tokens" in res.error


def test_an_edge_refusing_the_last_reopen_is_an_edge_that_answered(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """The wait for a restarting edge ran out unanswered, then the last re-open reached an edge
    that refused it as full: an edge is there. The next prompt's open that finds none at once
    (a transient) must still wait for it; marked "waited in vain", it ended the whole run."""
    import asyncio

    from gelato.device.client import EdgeClient
    from gelato.device.drafter import Drafter
    from gelato.device.policy import parse_policy
    from gelato.models import encode_prompt
    from gelato.types import SamplingParams
    from gelato.wire import MODEL_LOADING

    async def run() -> tuple[bool, str]:
        client = EdgeClient("127.0.0.1:1", failovers=1, edge_wait_s=0.3, connect_timeout_s=0.1)
        opened = iter([_Stream(target, cut_after=2), _Full(target)])

        async def connect(timeout_s: float | None = None) -> None:
            return None

        class Stub:
            def Session(self, **kwargs: object) -> _Stream:
                return next(opened)

            async def Info(self, request: pb.InfoRequest, **kwargs: object) -> pb.InfoResponse:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), MODEL_LOADING
                )

        client.connect = connect  # type: ignore[method-assign]
        client.stub = Stub()  # type: ignore[assignment]
        try:
            prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")
            res = await client.generate(Drafter(drafter_model, SamplingParams()), prompt, 20, parse_policy("fixed-4"))
            return client._waited_in_vain, res.error
        finally:
            await client.close()

    in_vain, error = asyncio.run(run())
    assert "RESOURCE_EXHAUSTED" in error and in_vain is False  # `hopeless` reads it at the next first open
