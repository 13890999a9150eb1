"""A stream's read that times out makes grpc.aio cancel the whole call: a write in flight on it
then raised `asyncio.CancelledError`, which no handler of the send-ahead loop catches (the run
ended in a traceback, this prompt's tokens and the remaining prompts lost). It is an `EdgeError`
now (a VerifyError, so the loop keeps what it has); a task that is itself cancelled still is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gelato.device.client_errors import StreamIO
from gelato.device.generate import VerifyError
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc


class _Hung(pb_grpc.GelatoServicer):
    """An edge that is alive but neither reads nor answers."""

    async def Session(self, request_iterator: object, context: object) -> AsyncIterator[pb.EdgeMessage]:
        await asyncio.sleep(30)
        if False:  # an async generator that yields nothing
            yield pb.EdgeMessage()


class _IO(StreamIO):
    deadline_s = 60.0

    def __init__(self, timeout_s: float) -> None:
        self.verdict_timeout_s = timeout_s


async def _with_hung_call(body):  # type: ignore[no-untyped-def]
    server = grpc.aio.server()
    pb_grpc.add_GelatoServicer_to_server(_Hung(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        return await body(pb_grpc.GelatoStub(channel).Session())
    finally:
        await channel.close()
        await server.stop(0)


def test_a_write_stalled_when_a_read_times_out_ends_as_an_edge_error() -> None:
    big = pb.DeviceMessage(draft=pb.DraftBlock(round=1, ids=list(range(200_000))))  # ~0.6 MB

    async def body(call: grpc.aio.StreamStreamCall) -> tuple[BaseException, BaseException]:
        recv = asyncio.ensure_future(_IO(0.5)._read(call))
        writer = _IO(10.0)
        try:
            for _ in range(50):  # the stream's window fills: a write stalls until the read times out
                await writer._write(call, big)
        except BaseException as exc:
            wrote: BaseException = exc
        else:
            raise AssertionError("50 writes of 0.6 MB went through to an edge that reads nothing")
        with pytest.raises(VerifyError) as read:
            await recv
        return wrote, read.value

    wrote, read = asyncio.run(_with_hung_call(body))
    assert isinstance(wrote, VerifyError), repr(wrote)
    assert wrote.code == grpc.StatusCode.DEADLINE_EXCEEDED and "cancelled on this side" in str(wrote)
    assert read.code == grpc.StatusCode.DEADLINE_EXCEEDED and "no answer from the edge" in str(read)


def test_a_read_whose_own_task_is_cancelled_is_still_cancelled() -> None:
    async def body(call: grpc.aio.StreamStreamCall) -> None:
        task = asyncio.ensure_future(_IO(10.0)._read(call))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(_with_hung_call(body))


def _verify_failing_under_a_failing_predraft() -> None:
    """`_verify_pipelined` where the transport fails (a VerifyError) while the pre-draft on the
    drafter thread raises too."""
    from gelato.device.generate import _verify_pipelined
    from gelato.types import DraftBlock

    class _Drafter:
        def predraft(self, *args: object) -> int:
            raise RuntimeError("pre-draft failed")

    async def verify(block: DraftBlock) -> object:
        await asyncio.sleep(0.05)
        raise VerifyError("the edge went away")

    async def offload(fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.to_thread(fn, *args)

    async def run() -> None:
        await _verify_pipelined(_Drafter(), DraftBlock(round=1, ids=(), q=()), verify, 2, offload, ())  # type: ignore[arg-type]

    asyncio.run(run())


def test_a_failed_verify_is_not_replaced_by_the_pre_drafts_error() -> None:
    """The transport failed (a VerifyError: the generation ends "error", keeping its tokens) while
    the pre-draft on the drafter thread raised too: the pre-draft's error, re-raised on the way
    out, replaced the VerifyError and the generation raised instead."""
    with pytest.raises(VerifyError, match="went away"):
        _verify_failing_under_a_failing_predraft()


def test_the_pre_drafts_error_behind_a_failed_verify_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Not raised (the transport's error is the round's), but not dropped without a word either:
    a drafter that fails while pre-drafting is a fault of its own."""
    import logging

    with caplog.at_level(logging.WARNING, logger="gelato.device.generate"), pytest.raises(VerifyError):
        _verify_failing_under_a_failing_predraft()
    assert "pre-drafting failed while the verdict's transport failed too: RuntimeError: pre-draft failed" in caplog.text
