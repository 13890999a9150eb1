"""Collects verify requests from many sessions and verifies them in one target forward (SPEC §3).

Contract: `await Batcher.verify(session, block, received)` returns that block's `Verdict`, or
raises that row's own error: `StatusError` with its precise status, or (a genuine server fault)
any other exception, which the server answers INTERNAL. Requests that arrive within `window_s` of
the first waiting one (up to `max_batch` rows) share one `pooled_forward` on the model thread; the
window closes early once every open session has a request in, so a lone session never waits.
Requests queue while a batch runs, so the next batch forms during the current forward. Each
session keeps its own RNG: its verdicts do not depend on who it was batched with. A request whose
caller went away is dropped before the forward.

Isolation (one session can never hurt another): every row is checked (`TargetSession.check`)
before the forward and a failing row is left out of it; acceptance runs per row, so one row's
exception fails only its own future; and if the batched forward itself raises, every row's tokens
are as before it (`pooled_forward` restores them) and each row is re-run alone, so the rows that
can be verified still are, with the verdicts they would have had alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc

from edge.kv_pool import pooled_forward
from edge.metrics import EdgeMetrics
from edge.verifier import StatusError, TargetSession
from gelato.types import DraftBlock, Verdict

log = logging.getLogger("gelato.edge")

# What the model thread hands back per row: (a, next, rows in the forward that verified it) or the
# exception that row failed with.
_Outcome = tuple[int, int, int] | BaseException


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
                outcomes, start, end = await loop.run_in_executor(self.executor, self._forward, batch)
            except Exception as exc:  # only if _forward itself broke: fail its rows, not the server
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            verified = sum(not isinstance(o, BaseException) for o in outcomes)
            if verified:
                self.metrics.batches.inc()
                self.metrics.batch_rows.inc(verified)
                self.metrics.verify_seconds.observe(end - start)
            for r, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not r.future.done():
                        r.future.set_exception(outcome)
                    continue
                a, nxt, rows = outcome
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
                            batch_rows=rows,
                        )
                    )

    @staticmethod
    def _forward(batch: list[_Request]) -> tuple[list[_Outcome], float, float]:
        """Model thread: check every row, one forward over the rows that passed, then each row's
        acceptance; each row's outcome is its own (see the module's isolation contract)."""
        start = time.perf_counter()
        outcomes: dict[int, _Outcome] = {}
        live: list[_Request] = []
        for r in batch:
            try:
                if any(other.session is r.session for other in live):
                    raise StatusError(
                        grpc.StatusCode.FAILED_PRECONDITION, "a block of this session is already being verified"
                    )
                r.session.check(r.block)
                live.append(r)
            except Exception as exc:
                outcomes[id(r)] = exc
        if live:
            try:
                outcomes.update(_verify_rows(live))
            except Exception:
                # The forward itself failed (a row no check foresaw): nothing was accepted and
                # every row's tokens are as before, so each row runs alone and only the row that
                # really breaks the forward fails.
                log.exception("batched forward of %d rows failed; verifying each row alone", len(live))
                for r in live:
                    try:
                        outcomes.update(_verify_rows([r]))
                    except Exception as exc:
                        outcomes[id(r)] = exc
        return [outcomes[id(r)] for r in batch], start, time.perf_counter()


def _verify_rows(rows: list[_Request]) -> dict[int, _Outcome]:
    """One forward over `rows`, then acceptance row by row. Raises only if the forward does (then
    every row is as before it); an acceptance failure is that row's outcome, and that row is put
    back as it was before the forward."""
    tails = [(r.session.seq.cached, r.session.seq.tokens[r.session.seq.cached :]) for r in rows]
    bases = [len(r.session.seq.tokens) for r in rows]
    logits = pooled_forward([(r.session.seq, r.block.ids) for r in rows])
    outcomes: dict[int, _Outcome] = {}
    for r, base, lg, (cached, tail) in zip(rows, bases, logits, tails, strict=True):
        try:
            outcomes[id(r)] = (*r.session.accept(r.block, base, lg), len(rows))
        except Exception as exc:
            seq = r.session.seq
            seq.truncate(cached)  # drop the drafts and their KV ...
            seq.tokens.extend(tail)  # ... and give back the uncached tail the forward fed
            outcomes[id(r)] = exc
    return outcomes
