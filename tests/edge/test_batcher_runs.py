"""Streamed decoding's runs (`Batcher.run`, edge/batcher.py): a session alone on the edge steps on
the model thread without a round trip through the event loop per token, with the verdicts single
steps give, and yields the model thread to anyone else who needs it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from gelato.edge.batcher import Batcher
from gelato.edge.kv_pool import KVPool
from gelato.edge.metrics import EdgeMetrics
from gelato.edge.model_thread import ModelThread
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams, Verdict

PREFIX = [5, 6, 7, 8]
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=7)


class _CountingModelThread(ModelThread):
    """The edge's model thread, counting the jobs submitted to it."""

    def __init__(self) -> None:
        super().__init__()
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def _session(target: LoadedModel, params: SamplingParams, name: str = "s") -> TargetSession:
    pool = KVPool(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
    session = TargetSession(name, target, params, list(PREFIX), pool=pool)
    session.prefill()
    return session


async def _with_batcher(executor: ModelThread, open_sessions: Callable[[], int], body: Callable[[Batcher], Any]) -> Any:
    batcher = Batcher(executor, 0.005, 16, open_sessions, EdgeMetrics())
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


async def _single_steps(batcher: Batcher, session: TargetSession, n: int) -> list[Verdict]:
    return [await batcher.verify(session, DraftBlock(session.rounds, ()), time.perf_counter()) for _ in range(n)]


@pytest.mark.parametrize("params", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_a_lone_run_is_one_job_with_the_verdicts_of_single_steps(target: LoadedModel, params: SamplingParams) -> None:
    executor = _CountingModelThread()
    ran, stepped = _session(target, params, "ran"), _session(target, params, "stepped")

    async def body(batcher: Batcher) -> tuple[list[Verdict], int, list[Verdict]]:
        verdicts = await batcher.run(ran, 8, frozenset(), time.perf_counter())
        jobs = executor.submitted
        return verdicts, jobs, await _single_steps(batcher, stepped, 8)

    try:
        run, jobs, steps = asyncio.run(_with_batcher(executor, lambda: 1, body))
    finally:
        executor.shutdown()
    assert jobs == 1  # eight forwards, one hop to the model thread and back
    assert [v.round for v in run] == list(range(8)) and ran.rounds == 8
    assert [v.next_token for v in run] == [v.next_token for v in steps]
    assert ran.seq.tokens == stepped.seq.tokens
    assert all(v.n_accepted == 0 and v.batch_rows == 1 and v.compute_ms > 0 for v in run)


def test_a_run_stops_after_a_stop_token(target: LoadedModel) -> None:
    executor = ModelThread()
    probe, ran = _session(target, SamplingParams(), "probe"), _session(target, SamplingParams(), "ran")

    async def body(batcher: Batcher) -> tuple[list[int], list[Verdict]]:
        tokens = [v.next_token for v in await _single_steps(batcher, probe, 8)]
        # The first token not seen before it: the run must end right there.
        at = next(i for i, t in enumerate(tokens) if i > 0 and t not in tokens[:i])
        return tokens[: at + 1], await batcher.run(ran, 8, frozenset({tokens[at]}), time.perf_counter())

    try:
        expected, run = asyncio.run(_with_batcher(executor, lambda: 1, body))
    finally:
        executor.shutdown()
    assert [v.next_token for v in run] == expected


def test_a_run_yields_the_model_thread_to_another_job(target: LoadedModel) -> None:
    """A job submitted while a run steps (a prefill, a close) ends the run after its current step:
    the run never holds the model thread for more than a forward past anyone's need."""
    executor = ModelThread()
    session = _session(target, SamplingParams())

    async def body(batcher: Batcher) -> list[Verdict]:
        run = asyncio.ensure_future(batcher.run(session, 200, frozenset(), time.perf_counter()))
        await asyncio.sleep(0)  # the run's job is on the model thread
        other = executor.submit(time.sleep, 0)
        verdicts = await run
        other.result(timeout=10)
        return verdicts

    try:
        run = asyncio.run(_with_batcher(executor, lambda: 1, body))
    finally:
        executor.shutdown()
    assert 1 <= len(run) <= 2, len(run)
    assert [v.round for v in run] == list(range(len(run))) and session.rounds == len(run)


def test_a_run_with_another_session_open_is_one_step(target: LoadedModel) -> None:
    """Two sessions that can send: each step goes through the batch window, so it can share a
    forward with the other session's blocks."""
    executor = _CountingModelThread()
    session = _session(target, SamplingParams())

    async def body(batcher: Batcher) -> list[Verdict]:
        return await batcher.run(session, 8, frozenset(), time.perf_counter())

    try:
        run = asyncio.run(_with_batcher(executor, lambda: 2, body))
    finally:
        executor.shutdown()
    assert [v.round for v in run] == [0] and executor.submitted == 1


def test_a_run_ends_with_what_it_has_when_a_later_step_fails(target: LoadedModel) -> None:
    """A session released while its run steps (its device gone): the steps done are answered, the
    next one is refused (its KV is not grown for nobody)."""
    executor = ModelThread()
    session = _session(target, SamplingParams())
    real = session.accept

    def accept_then_release(*args: Any, **kwargs: Any) -> tuple[int, int]:
        out = real(*args, **kwargs)
        if session.rounds == 3:
            session.released = True  # as the registry does on the event loop
        return out

    session.accept = accept_then_release  # type: ignore[method-assign]

    async def body(batcher: Batcher) -> list[Verdict]:
        return await batcher.run(session, 8, frozenset(), time.perf_counter())

    try:
        run = asyncio.run(_with_batcher(executor, lambda: 1, body))
    finally:
        executor.shutdown()
    assert [v.round for v in run] == [0, 1, 2] and len(session.seq.tokens) == len(PREFIX) + 3
