"""Generate's runs (`streamed_runs`, edge/streaming.py) over a real session and batcher: the next
message's run starts while the one before is being sent (and its forwards meanwhile are not in the
time the device waited for), a stream that ends under a send leaves no run decoding for nobody,
no unretrieved error and no status made of a failure nobody receives, and a run with an error is
the last."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

import grpc
import pytest

from gelato.edge.batcher import Batcher, Run
from gelato.edge.model_thread import ModelThread
from gelato.edge.sessions import StatusError
from gelato.edge.streaming import streamed_runs
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams
from gelato.v1 import gelato_pb2 as pb
from tests.edge.test_batcher_runs import _session, _single_steps, _with_batcher


def _nothing() -> None:
    pass


def _status(exc: Exception) -> StatusError:
    return StatusError(grpc.StatusCode.INTERNAL, f"failed: {exc}")


def test_the_next_run_starts_while_the_one_before_is_sent(target: LoadedModel) -> None:
    """Four messages of three tokens: each run after the first starts before the message before
    it is sent (the send takes a while here), and the tokens are those of single steps."""
    session, stepped = _session(target, SamplingParams(), "ran"), _session(target, SamplingParams(), "stepped")
    events: list[str] = []

    async def body(batcher: Batcher) -> tuple[list[int], list[int]]:
        async def run(steps: int, eos: frozenset[int], received: float) -> Run:
            events.append(f"start {session.rounds}")
            return await batcher.run(session, steps, frozenset(), received)

        tokens: list[int] = []
        req = pb.Generate(round=0, max_tokens=12, tokens_per_message=3)
        async for message in streamed_runs(session, req, time.perf_counter(), run, _nothing, _status):
            await asyncio.sleep(0.05)  # the send: the event loop is free meanwhile
            events.append(f"sent {message.verdict.round}")
            tokens += [message.verdict.next_token, *message.verdict.more_tokens]
        return tokens, [v.next_token for v in await _single_steps(batcher, stepped, 12)]

    tokens, single = _with_batcher(ModelThread(), lambda: 1, body)
    assert tokens == single
    assert events == ["start 0", "start 3", "sent 0", "start 6", "sent 3", "start 9", "sent 6", "sent 9"]


def test_a_stream_ended_under_a_send_cancels_its_next_run(target: LoadedModel) -> None:
    """The consumer stops after the first message (its send failed): the run started meanwhile is
    cancelled, its failure (it broke before it was cancelled) neither logged by asyncio nor made a
    status (no INTERNAL incident for a stream nobody reads); a run cancelled while it decodes
    stops short of its tokens, and the batcher serves the session on."""
    session = _session(target, SamplingParams())
    unretrieved: list[dict[str, Any]] = []
    statuses: list[Exception] = []

    def failed(exc: Exception) -> StatusError:
        statuses.append(exc)
        return _status(exc)

    async def body(batcher: Batcher) -> tuple[int, int]:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx))
        calls = [0]

        async def run(steps: int, eos: frozenset[int], received: float) -> Run:
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("the forward broke")
            return await batcher.run(session, steps, frozenset(), received)

        req = pb.Generate(round=0, max_tokens=200, tokens_per_message=4)
        runs = streamed_runs(session, req, 0.0, run, _nothing, failed)
        async with contextlib.aclosing(runs):
            async for _ in runs:
                await asyncio.sleep(0.01)  # the second run fails meanwhile; then the send fails
                break
        second = session.rounds
        req = pb.Generate(round=second, max_tokens=300, tokens_per_message=100)
        third = streamed_runs(session, req, 0.0, run, _nothing, failed)
        async with contextlib.aclosing(third):
            async for _ in third:
                while session.rounds <= second + 100:  # the next run is decoding
                    await asyncio.sleep(0.001)
                break
        await asyncio.sleep(0.05)
        gc.collect()
        await batcher.verify(session, DraftBlock(session.rounds, ()), time.perf_counter())
        return second, session.rounds

    second, rounds = _with_batcher(ModelThread(), lambda: 1, body)
    assert second == 4  # the first message's run; the second failed without a step
    # The third Generate's second run was cancelled mid-way: short of its 100 tokens (and the verify).
    assert second + 100 < rounds < second + 200 + 1
    assert unretrieved == [] and statuses == []


def test_a_failure_is_made_a_status_once_the_message_before_is_sent(target: LoadedModel) -> None:
    session = _session(target, SamplingParams())
    events: list[str] = []

    def failed(exc: Exception) -> StatusError:
        events.append("status")
        return _status(exc)

    async def body(batcher: Batcher) -> StatusError:
        async def run(steps: int, eos: frozenset[int], received: float) -> Run:
            if session.rounds:
                raise RuntimeError("the forward broke")
            return await batcher.run(session, steps, frozenset(), received)

        req = pb.Generate(round=0, max_tokens=20, tokens_per_message=2)
        with pytest.raises(StatusError) as raised:
            async for _ in streamed_runs(session, req, 0.0, run, _nothing, failed):
                await asyncio.sleep(0.02)  # the second run fails meanwhile
                events.append("sent")
        return raised.value

    status = _with_batcher(ModelThread(), lambda: 1, body)
    assert events == ["sent", "status"] and status.code == grpc.StatusCode.INTERNAL, events


def test_forwards_run_during_the_send_before_are_not_waited_for(target: LoadedModel) -> None:
    """A slow send (50 ms) of each message: the first message's compute_ms is its forwards' time,
    each later one's leaves out what ran while the message before was being sent."""
    session = _session(target, SamplingParams())
    forwards: list[float] = []

    async def body(batcher: Batcher) -> list[float]:
        async def run(steps: int, eos: frozenset[int], received: float) -> Run:
            done = await batcher.run(session, steps, frozenset(), received)
            forwards.append(sum(v.compute_ms for v in done.verdicts))
            return done

        reported = []
        req = pb.Generate(round=0, max_tokens=9, tokens_per_message=3)
        async for message in streamed_runs(session, req, 0.0, run, _nothing, _status):
            reported.append(message.verdict.compute_ms)
            await asyncio.sleep(0.05)
        return reported

    reported = _with_batcher(ModelThread(), lambda: 1, body)
    assert len(reported) == len(forwards) == 3 and reported[0] == forwards[0] > 0
    assert all(0.0 <= r < f for r, f in zip(reported[1:], forwards[1:], strict=True)), (reported, forwards)


def test_a_run_with_an_error_is_the_last(target: LoadedModel) -> None:
    session = _session(target, SamplingParams())
    broken = RuntimeError("the step after them broke")

    async def body(batcher: Batcher) -> tuple[list[Any], int]:
        calls = [0]

        async def run(steps: int, eos: frozenset[int], received: float) -> Run:
            calls[0] += 1
            done = await batcher.run(session, steps, frozenset(), received)
            return Run(done.verdicts, broken if calls[0] == 2 else None)

        req = pb.Generate(round=0, max_tokens=20, tokens_per_message=2)
        messages = [m async for m in streamed_runs(session, req, 0.0, run, _nothing, _status)]
        return messages, calls[0]

    messages, calls = _with_batcher(ModelThread(), lambda: 1, body)
    assert [m.error for m in messages] == [None, broken] and calls == 2  # the service makes it a status
    assert [(m.verdict.round, len(m.verdict.more_tokens)) for m in messages] == [(0, 1), (2, 1)]
