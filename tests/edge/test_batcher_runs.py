"""Streamed decoding's runs (`Batcher.run`, edge/batcher.py): a session alone on the edge steps on
the model thread without a round trip through the event loop per token, with the verdicts single
steps give, and yields the model thread to anyone else who needs it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

from gelato.edge.batcher import Batcher, Run
from gelato.edge.kv_pool import KVPool
from gelato.edge.metrics import EdgeMetrics
from gelato.edge.model_thread import ModelThread
from gelato.edge.sessions import StatusError, TargetSession
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


def _with_batcher(executor: ModelThread, open_sessions: Callable[[], int], body: Callable[[Batcher], Any]) -> Any:
    """`body(batcher)` on a new event loop, then the batcher stopped and the model thread shut down."""

    async def main() -> Any:
        batcher = Batcher(executor, 0.005, 16, open_sessions, EdgeMetrics())
        batcher.start()
        try:
            return await body(batcher)
        finally:
            await batcher.stop()

    try:
        return asyncio.run(main())
    finally:
        executor.shutdown()


async def _single_steps(batcher: Batcher, session: TargetSession, n: int) -> list[Verdict]:
    return [await batcher.verify(session, DraftBlock(session.rounds, ()), time.perf_counter()) for _ in range(n)]


@pytest.mark.parametrize("params", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_a_lone_run_is_one_job_with_the_verdicts_of_single_steps(target: LoadedModel, params: SamplingParams) -> None:
    executor = _CountingModelThread()
    ran, stepped = _session(target, params, "ran"), _session(target, params, "stepped")

    async def body(batcher: Batcher) -> tuple[list[Verdict], int, list[Verdict]]:
        run = await batcher.run(ran, 8, frozenset(), time.perf_counter())
        assert run.error is None
        jobs = executor.submitted
        return run.verdicts, jobs, await _single_steps(batcher, stepped, 8)

    run, jobs, steps = _with_batcher(executor, lambda: 1, body)
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
        run = await batcher.run(ran, 8, frozenset({tokens[at]}), time.perf_counter())
        return tokens[: at + 1], run.verdicts

    expected, run = _with_batcher(executor, lambda: 1, body)
    assert [v.next_token for v in run] == expected


def test_a_run_yields_the_model_thread_to_another_job(target: LoadedModel) -> None:
    """A job submitted while a run steps (a prefill, a close) ends the run after its current step:
    the run never holds the model thread for more than a forward past anyone's need."""
    executor = ModelThread()
    session = _session(target, SamplingParams())

    async def body(batcher: Batcher) -> list[Verdict]:
        gate = threading.Event()
        executor.submit(gate.wait, 10)  # the model thread busy: the run's job waits behind this one
        run = asyncio.ensure_future(batcher.run(session, 200, frozenset(), time.perf_counter()))
        await asyncio.sleep(0)  # the run's job is submitted
        other = executor.submit(time.sleep, 0)  # and another one after it
        gate.set()
        verdicts = (await run).verdicts
        other.result(timeout=10)
        return verdicts

    run = _with_batcher(executor, lambda: 1, body)
    assert [v.round for v in run] == [0] and session.rounds == 1


def test_a_run_with_another_session_open_is_one_step(target: LoadedModel) -> None:
    """Two sessions that can send: each step goes through the batch window, so it can share a
    forward with the other session's blocks."""
    executor = _CountingModelThread()
    session = _session(target, SamplingParams())

    async def body(batcher: Batcher) -> list[Verdict]:
        return (await batcher.run(session, 8, frozenset(), time.perf_counter())).verdicts

    run = _with_batcher(executor, lambda: 2, body)
    assert [v.round for v in run] == [0] and executor.submitted == 1


def test_a_run_yields_to_another_sessions_request(target: LoadedModel) -> None:
    """Another session's block queued while a run steps (it waits for the model thread): the run
    ends after its current step, and the block is verified next."""
    executor = ModelThread()
    alone, other = _session(target, SamplingParams(), "alone"), _session(target, SamplingParams(), "other")

    async def body(batcher: Batcher) -> tuple[list[Verdict], Verdict]:
        gate = threading.Event()
        executor.submit(gate.wait, 10)  # the model thread busy: the run's job waits behind this one
        run = asyncio.ensure_future(batcher.run(alone, 200, frozenset(), time.perf_counter()))
        await asyncio.sleep(0)  # the run's job is submitted
        asked = asyncio.ensure_future(batcher.verify(other, DraftBlock(0, ()), time.perf_counter()))
        while not batcher._forming:  # the batcher task took it, and holds it until the thread is free
            await asyncio.sleep(0)
        gate.set()
        return (await run).verdicts, await asked

    run, verdict = _with_batcher(executor, lambda: 1, body)
    assert [v.round for v in run] == [0] and alone.rounds == 1
    assert verdict.round == 0 and other.rounds == 1


def test_a_run_stops_when_asked(target: LoadedModel) -> None:
    """`stop()` (the edge ending its streams) ends a run after the step it is in."""
    executor = ModelThread()
    session = _session(target, SamplingParams())

    async def body(batcher: Batcher) -> Run:
        return await batcher.run(session, 200, frozenset(), time.perf_counter(), stop=lambda: session.rounds >= 2)

    run = _with_batcher(executor, lambda: 1, body)
    assert [v.round for v in run.verdicts] == [0, 1] and run.error is None


@pytest.mark.parametrize("fault", ["released", "server fault"])
def test_a_run_ends_with_its_verdicts_and_the_error_of_the_step_after_them(target: LoadedModel, fault: str) -> None:
    """A later step that fails (the session released while its run steps, its device gone; or a
    server fault in its acceptance): the steps done are answered, then that step's error, as the
    stream would have sent them one at a time. The failed step's tokens and KV are not kept."""
    executor = ModelThread()
    session = _session(target, SamplingParams())
    real = session.accept
    broken = RuntimeError("acceptance broke")

    def accept_then_fail(*args: Any, **kwargs: Any) -> tuple[int, int]:
        if fault == "server fault" and session.rounds == 3:
            raise broken
        out = real(*args, **kwargs)
        if fault == "released" and session.rounds == 3:
            session.released = True  # as the registry does on the event loop
        return out

    session.accept = accept_then_fail  # type: ignore[method-assign]

    async def body(batcher: Batcher) -> Run:
        return await batcher.run(session, 8, frozenset(), time.perf_counter())

    run = _with_batcher(executor, lambda: 1, body)
    assert [v.round for v in run.verdicts] == [0, 1, 2] and len(session.seq.tokens) == len(PREFIX) + 3
    if fault == "released":
        assert isinstance(run.error, StatusError) and run.error.code == grpc.StatusCode.FAILED_PRECONDITION
    else:
        assert run.error is broken


def test_a_stream_sends_a_runs_verdicts_then_ends_with_the_failed_steps_status(
    pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the real server: a server fault in the third step of a run. The device gets the two
    tokens before it in one message, then INTERNAL (the session's state is unknown), as one token
    a message would have given it; it is not decoded on past the fault."""
    from gelato.edge import batcher as batcher_module
    from gelato.edge.config import EdgeConfig
    from gelato.edge.server import EdgeServer
    from gelato.v1 import gelato_pb2 as pb
    from gelato.v1 import gelato_pb2_grpc as pb_grpc
    from tests.edge.test_server_errors import generate, open_msg

    real, calls = batcher_module.verify_batch, [0]

    def third_fails(pairs: Any, validated: Any = None) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            return [RuntimeError("the forward broke")] * len(pairs)
        return real(pairs, validated)

    monkeypatch.setattr(batcher_module, "verify_batch", third_fails)

    async def scenario() -> tuple[list[pb.EdgeMessage], grpc.StatusCode, str]:
        server = EdgeServer(EdgeConfig(port=0))
        port = await server.start()
        loaded = await server.load(str(pair["target"]), "float32", "cpu")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            call = pb_grpc.GelatoStub(channel).Session()
            await call.write(open_msg(loaded.fingerprint, max_new_tokens=32))
            await call.write(generate(0, 10, per_message=8))
            await call.done_writing()
            replies: list[pb.EdgeMessage] = []
            with contextlib.suppress(grpc.aio.AioRpcError):  # read until the status
                async for msg in call:
                    replies.append(msg)
            return replies, await call.code(), await call.details() or ""
        finally:
            await channel.close()
            await server.stop(0)

    replies, code, details = asyncio.run(scenario())
    assert [m.WhichOneof("kind") for m in replies] == ["opened", "verdict"]
    assert replies[1].verdict.round == 0 and len(replies[1].verdict.more_tokens) == 1  # rounds 0 and 1
    assert code == grpc.StatusCode.INTERNAL and "verification failed" in details, details


def test_a_run_counts_each_step_as_one_forward_of_one_row(target: LoadedModel) -> None:
    """The counters a run leaves equal those of its steps verified one by one (`_verdicts`)."""
    ran, stepped = _session(target, SamplingParams(), "ran"), _session(target, SamplingParams(), "stepped")

    async def body(batcher: Batcher) -> tuple[dict[str, float], dict[str, float]]:
        def counters() -> dict[str, float]:
            get = batcher.metrics.registry.get_sample_value
            names = ("batches_total", "batch_rows_total", "verify_seconds_count", "tokens_drafted_total")
            return {n: get(f"gelato_edge_{n}") or 0.0 for n in names}

        before = counters()
        run = await batcher.run(ran, 7, frozenset(), time.perf_counter())
        after_run = counters()
        await _single_steps(batcher, stepped, len(run.verdicts))
        after_steps = counters()
        ran_counts = {n: after_run[n] - before[n] for n in before}
        return ran_counts, {n: after_steps[n] - after_run[n] for n in before}

    ran_counts, step_counts = _with_batcher(ModelThread(), lambda: 1, body)
    assert ran_counts == step_counts
    assert ran_counts["batches_total"] == ran_counts["batch_rows_total"] == ran_counts["verify_seconds_count"] == 7


def test_a_run_ends_once_it_has_lasted_its_time_budget(target: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow target (here each step takes 0.15 s): a run of up to 64 tokens would take ~10 s
    before its one message goes out, past what a device waits for a message. It ends once it
    has lasted `RUN_BUDGET_S` (0.4 s here), with the verdicts of the steps it made; the next
    run goes on from there."""
    from gelato.edge import batcher as batcher_module

    real = batcher_module.verify_batch

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.15)
        return real(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "verify_batch", slow)
    monkeypatch.setattr(batcher_module, "RUN_BUDGET_S", 0.4)
    ran, stepped = _session(target, SamplingParams(), "ran"), _session(target, SamplingParams(), "stepped")

    async def body(batcher: Batcher) -> tuple[list[Verdict], list[Verdict], list[Verdict]]:
        first = await batcher.run(ran, 64, frozenset(), time.perf_counter())
        second = await batcher.run(ran, 64, frozenset(), time.perf_counter())
        n = len(first.verdicts) + len(second.verdicts)
        return first.verdicts, second.verdicts, await _single_steps(batcher, stepped, n)

    first, second, steps = _with_batcher(ModelThread(), lambda: 1, body)
    assert 2 <= len(first) <= 4 and 2 <= len(second) <= 4, (len(first), len(second))
    assert [v.next_token for v in first + second] == [v.next_token for v in steps]
