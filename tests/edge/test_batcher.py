"""The batcher's window (edge/batcher.py): requests that ask within `window_s` of a batch's first
one are verified together, and the window runs from when that first request asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from gelato.edge.batcher import Batcher
from gelato.edge.kv_pool import KVPool
from gelato.edge.metrics import EdgeMetrics
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams, Verdict

FORWARD_S = 0.6  # every batch's forward takes at least this long ...
WINDOW_S = 0.4  # ... longer than the window


class _SlowModelThread(ThreadPoolExecutor):
    """One model thread whose every job first sleeps `FORWARD_S`: a forward longer than the window.
    `jobs` gets each job's (start, end) on the model thread, in order."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.jobs: list[tuple[float, float]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def slow() -> Any:
            start = time.perf_counter()
            time.sleep(FORWARD_S)
            try:
                return fn(*args, **kwargs)
            finally:
                self.jobs.append((start, time.perf_counter()))

        return super().submit(slow)


def test_a_batch_formed_during_a_long_forward_closes_when_it_ends(target: LoadedModel) -> None:
    """Three open sessions; all three blocks of round 0 go in one forward. Two of them ask again
    during it, the third stays away (its device is drafting). Their window opened when the first
    of them asked, more than `WINDOW_S` before that forward ends: the batch of two goes to the
    model thread at once (it waited another whole window from the end of the forward)."""

    executor = _SlowModelThread()

    async def run() -> tuple[list[Verdict], list[Verdict], float]:
        pool = KVPool(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
        sessions = [TargetSession(f"s{i}", target, SamplingParams(), [5 + i, 6, 7], pool=pool) for i in range(3)]
        for s in sessions:
            s.prefill()
        batcher = Batcher(executor, WINDOW_S, 16, lambda: len(sessions), EdgeMetrics())
        batcher.start()
        try:
            first = [asyncio.ensure_future(batcher.verify(s, DraftBlock(0, ()), time.perf_counter())) for s in sessions]
            await asyncio.sleep(0.05)  # the forward of round 0 is on the model thread
            t0 = time.perf_counter()
            again = [asyncio.ensure_future(batcher.verify(s, DraftBlock(1, ()), t0)) for s in sessions[:2]]
            return await asyncio.gather(*first), await asyncio.gather(*again), t0
        finally:
            await batcher.stop()
            executor.shutdown()

    round0, round1, t0 = asyncio.run(run())
    assert [v.batch_rows for v in round0] == [3, 3, 3]
    assert [v.batch_rows for v in round1] == [2, 2]
    # Asked at t0, ~0.05 s into round 0's 0.6 s forward: its window closed during that forward, so
    # the batch goes to the model thread the moment round 0's job ends (it waited another whole
    # window). Timed on the model thread from that end, so neither round 0's compute nor a late
    # return from its sleep counts against the margin: only a stall of the hand-back itself.
    (_, end0), (start1, _) = executor.jobs
    ready = max(end0, t0 + WINDOW_S)  # a stall before t0 can leave the window open past end0
    assert start1 - ready < WINDOW_S / 2, (start1 - end0, t0 + WINDOW_S - end0)


def test_a_request_whose_caller_left_does_not_close_the_window_early(target: LoadedModel) -> None:
    """Three sessions; during round 0's forward A asks again and its device goes away (request
    cancelled, session no longer open), then B asks; C asks a little after the forward ends,
    within the window. The window waits for C: the two open sessions' blocks go together (A's
    dead request counted as a row closed the window with B alone)."""
    executor = _SlowModelThread()

    async def run() -> tuple[Verdict, Verdict]:
        pool = KVPool(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
        sessions = [TargetSession(f"s{i}", target, SamplingParams(), [5 + i, 6, 7], pool=pool) for i in range(3)]
        for s in sessions:
            s.prefill()
        open_ = list(sessions)
        batcher = Batcher(executor, 2.0, 16, lambda: len(open_), EdgeMetrics())  # closes early once C is in
        batcher.start()
        try:
            first = [asyncio.ensure_future(batcher.verify(s, DraftBlock(0, ()), time.perf_counter())) for s in sessions]
            await asyncio.sleep(0.05)  # round 0's forward is on the model thread
            gone = asyncio.ensure_future(batcher.verify(sessions[0], DraftBlock(1, ()), time.perf_counter()))
            await asyncio.sleep(0.05)
            gone.cancel()
            open_.remove(sessions[0])  # its device went away: released
            b = asyncio.ensure_future(batcher.verify(sessions[1], DraftBlock(1, ()), time.perf_counter()))
            await asyncio.gather(*first)
            await asyncio.sleep(0.1)  # round 0 is done; C asks within the window
            c = asyncio.ensure_future(batcher.verify(sessions[2], DraftBlock(1, ()), time.perf_counter()))
            return await b, await c
        finally:
            await batcher.stop()
            executor.shutdown()

    vb, vc = asyncio.run(run())
    assert (vb.batch_rows, vc.batch_rows) == (2, 2)


def test_a_session_still_prefilling_holds_no_batch(pair: dict[str, Path]) -> None:
    """A session admitted but not yet prefilled (a long prompt in pieces) cannot send a block: the
    window must not wait for it. Over the real server with a 2 s window, another session's block
    is verified at once (it waited the whole window while the edge counted every open session),
    and the new session counts once opened."""
    from gelato.edge.config import EdgeConfig
    from gelato.edge.server import EdgeServer
    from gelato.v1 import gelato_pb2_grpc as pb_grpc
    from tests.edge.test_server_errors import draft, open_msg

    async def scenario() -> tuple[float, int, int]:
        server = EdgeServer(EdgeConfig(port=0, batch_window_ms=2000))
        port = await server.start()
        loaded = await server.load(str(pair["target"]), "float32", "cpu")
        registry = server.service.registry
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            call = pb_grpc.GelatoStub(channel).Session()
            await call.write(open_msg(loaded.fingerprint))
            await asyncio.wait_for(call.read(), 30)
            opened = registry.ready()
            registry.admit(loaded, SamplingParams(), list(range(5, 60)), 8)  # admitted, its prefill to come
            await call.write(draft(0, [1]))
            verdict = (await asyncio.wait_for(call.read(), 30)).verdict
            call.cancel()
            return verdict.queue_ms, opened, len(registry)
        finally:
            await channel.close()
            await server.stop(0)

    queue_ms, opened, admitted = asyncio.run(scenario())
    assert opened == 1 and admitted == 2
    assert queue_ms < 1000, queue_ms  # not the 2000 ms window


def test_an_interrupt_on_the_model_thread_answers_its_rows_and_frees_the_batcher(
    target: LoadedModel, monkeypatch: Any, caplog: Any
) -> None:
    """A BaseException that is not an Exception (KeyboardInterrupt raised on the model thread)
    escapes the batch: its rows get an error naming it, and the next request is verified, not
    left waiting for a model thread nobody freed."""
    from gelato.edge import batcher as batcher_module

    real = batcher_module.verify_batch
    calls: list[int] = []

    def interrupted_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt("on the model thread")
        return real(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "verify_batch", interrupted_once)

    verdict, error = _fault_then_verdict(target, 1, "verification interrupted")
    assert isinstance(error.__cause__, KeyboardInterrupt)
    assert verdict.round == 0 and len(calls) == 2
    assert "model thread interrupted by KeyboardInterrupt('on the model thread')" in caplog.text


def test_a_fault_while_forming_a_batch_fails_its_rows_not_the_batcher(
    target: LoadedModel, monkeypatch: Any, caplog: Any
) -> None:
    """A fault in the batcher task itself (a bug while forming a batch) fails the rows it holds,
    logged, and the next request is verified: a dead batcher task would leave every session of
    the edge waiting for verdicts."""
    real = Batcher._collect
    calls: list[int] = []

    async def broken_once(self: Batcher, first: Any, batch: list[Any]) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("forming broke")
        return await real(self, first, batch)

    monkeypatch.setattr(Batcher, "_collect", broken_once)

    # Two open sessions as far as the batcher knows: requests go through its task, not straight to
    # the model thread.
    verdict, _ = _fault_then_verdict(target, 2, "forming broke")
    assert verdict.round == 0 and len(calls) == 2
    assert "forming a batch of 1 row(s) failed" in caplog.text


def _fault_then_verdict(target: LoadedModel, open_sessions: int, match: str) -> tuple[Verdict, BaseException]:
    """A session's block meets the injected fault (its error matching `match`), then its next block
    is verified all the same: the batcher and the model thread outlived the fault."""
    import pytest

    from gelato.edge.model_thread import ModelThread

    async def run() -> tuple[Verdict, BaseException]:
        executor = ModelThread()
        pool = KVPool(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
        session = TargetSession("s", target, SamplingParams(), [5, 6, 7], pool=pool)
        session.prefill()
        batcher = Batcher(executor, 0.0, 16, lambda: open_sessions, EdgeMetrics())
        batcher.start()
        try:
            with pytest.raises(RuntimeError, match=match) as info:
                await asyncio.wait_for(batcher.verify(session, DraftBlock(0, ()), time.perf_counter()), 30)
            verdict = await asyncio.wait_for(batcher.verify(session, DraftBlock(0, ()), time.perf_counter()), 30)
            return verdict, info.value
        finally:
            await batcher.stop()
            executor.shutdown()

    return asyncio.run(run())
