"""Collects verify requests from many sessions and verifies them in one target forward (SPEC §3).

Contract: `await Batcher.verify(session, block, received)` returns that block's `Verdict`.
Requests that arrive within `window_s` of the first waiting one (up to `max_batch` rows) share one
`pooled_forward` on the model thread; the window closes early once every open session has a
request in, so a lone session never waits. Requests queue while a batch runs, so the next batch
forms during the current forward. Each session keeps its own RNG: its verdicts do not depend on
who it was batched with. A request whose caller went away is dropped before the forward.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from edge.kv_pool import pooled_forward
from edge.metrics import EdgeMetrics
from edge.verifier import TargetSession
from gelato.types import DraftBlock, Verdict


@dataclass
class _Request:
    session: TargetSession
    block: DraftBlock
    received: float
    future: asyncio.Future[Verdict]


class Batcher:
    def __init__(
        self,
        executor: Executor,
        window_s: float,
        max_batch: int,
        open_sessions: Callable[[], int],
        metrics: EdgeMetrics,
    ) -> None:
        self.executor = executor
        self.window_s = window_s
        self.max_batch = max_batch
        self.open_sessions = open_sessions
        self.metrics = metrics
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def verify(self, session: TargetSession, block: DraftBlock, received: float) -> Verdict:
        fut: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Request(session, block, received, fut))
        return await fut

    async def _collect(self) -> list[_Request]:
        batch = [await self.queue.get()]
        deadline = time.perf_counter() + self.window_s
        while len(batch) < self.max_batch and len(batch) < self.open_sessions():
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return [r for r in batch if not r.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                results, start, end = await loop.run_in_executor(self.executor, self._forward, batch)
            except Exception as exc:  # a failed forward fails its rows, not the server
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            self.metrics.batches.inc()
            self.metrics.batch_rows.inc(len(batch))
            self.metrics.verify_seconds.observe(end - start)
            for r, result in zip(batch, results, strict=True):
                if result is None:
                    if not r.future.done():
                        r.future.set_exception(RuntimeError("the session was closed"))
                    continue
                a, nxt = result
                self.metrics.tokens_drafted.inc(r.block.k)
                self.metrics.tokens_accepted.inc(a)
                if not r.future.done():
                    r.future.set_result(
                        Verdict(
                            round=r.block.round,
                            n_accepted=a,
                            next_token=nxt,
                            queue_ms=(start - r.received) * 1e3,
                            compute_ms=(end - start) * 1e3,
                            batch_rows=len(batch),
                        )
                    )

    @staticmethod
    def _forward(batch: list[_Request]) -> tuple[list[tuple[int, int] | None], float, float]:
        """Model thread: one forward for the whole batch, then each row's acceptance. A row whose
        session was closed meanwhile (its KV slot may already serve another session) is skipped."""
        start = time.perf_counter()
        live = [r for r in batch if not r.session.seq.closed]
        results: dict[int, tuple[int, int]] = {}
        if live:
            bases = [len(r.session.seq.tokens) for r in live]
            logits = pooled_forward([(r.session.seq, r.block.ids) for r in live])
            for r, b, lg in zip(live, bases, logits, strict=True):
                results[id(r)] = r.session.accept(r.block, b, lg)
        return [results.get(id(r)) for r in batch], start, time.perf_counter()
