"""Generate's runs (`streamed_runs`, edge/streaming.py) over a real session and batcher: the next
message's run starts while the one before is being sent, a stream that ends under a send leaves
no run decoding for nobody and no unretrieved error, and a run with an error is the last."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

import grpc

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
        async for done in streamed_runs(session, req, time.perf_counter(), run, _nothing):
            await asyncio.sleep(0.05)  # the send: the event loop is free meanwhile
            events.append(f"sent {done.verdicts[0].round}")
            tokens += [v.next_token for v in done.verdicts]
        return tokens, [v.next_token for v in await _single_steps(batcher, stepped, 12)]

    tokens, single = _with_batcher(ModelThread(), lambda: 1, body)
    assert tokens == single
    assert events == ["start 0", "start 3", "sent 0", "start 6", "sent 3", "start 9", "sent 6", "sent 9"]


def test_a_stream_ended_under_a_send_cancels_its_next_run(target: LoadedModel) -> None:
    """The consumer stops after the first message (its send failed): the run started meanwhile is
    cancelled, and its error (the run failed before it was cancelled) never logged; a run cancelled
    while it decodes stops short of its tokens, and the batcher serves the session on."""
    session = _session(target, SamplingParams())
    unretrieved: list[dict[str, Any]] = []

    async def body(batcher: Batcher) -> tuple[int, int]:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx))
        calls = [0]

        async def run(steps: int, eos: frozenset[int], received: float) -> Run:
            calls[0] += 1
            if calls[0] == 2:
                raise StatusError(grpc.StatusCode.OUT_OF_RANGE, "past the reservation")
            return await batcher.run(session, steps, frozenset(), received)

        runs = streamed_runs(session, pb.Generate(round=0, max_tokens=200, tokens_per_message=4), 0.0, run, _nothing)
        async with contextlib.aclosing(runs):
            async for _ in runs:
                await asyncio.sleep(0.01)  # the second run fails meanwhile; then the send fails
                break
        second = session.rounds
        req = pb.Generate(round=second, max_tokens=300, tokens_per_message=100)
        third = streamed_runs(session, req, 0.0, run, _nothing)
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
    assert unretrieved == []


def test_a_run_with_an_error_is_the_last(target: LoadedModel) -> None:
    session = _session(target, SamplingParams())
    broken = RuntimeError("the step after them broke")

    async def body(batcher: Batcher) -> tuple[list[Run], int]:
        calls = [0]

        async def run(steps: int, eos: frozenset[int], received: float) -> Run:
            calls[0] += 1
            done = await batcher.run(session, steps, frozenset(), received)
            return Run(done.verdicts, broken if calls[0] == 2 else None)

        req = pb.Generate(round=0, max_tokens=20, tokens_per_message=2)
        runs = [r async for r in streamed_runs(session, req, 0.0, run, _nothing)]
        return runs, calls[0]

    runs, calls = _with_batcher(ModelThread(), lambda: 1, body)
    assert [r.error for r in runs] == [None, broken] and calls == 2
    assert [v.round for r in runs for v in r.verdicts] == [0, 1, 2, 3]
