"""Collects verify requests from many sessions into batches for the model thread.

Contract: `await Batcher.verify(session, block, received)` returns that block's `Verdict`, or raises
that row's own error: `StatusError` with its precise status, or (a genuine server fault) any other
exception, which the server answers INTERNAL. Requests that arrive within `window_s` of the first
waiting one (up to `max_batch` rows) are verified together by `gelato.edge.verifier.verify_batch`
(one target forward; checks, acceptance and the isolation of one row from another are its contract)
on the model thread; the window closes early once every session that can send (opened and prefilled:
`open_sessions`) has a request in, so a lone session never waits: when the model thread is free and
no batch is forming, its request goes straight there. One batch runs at a time; requests queue
meanwhile, so the next batch forms during the current forward, and its window counts from its first
request, not from the end of that forward. A request whose caller went away is dropped before the
forward. `validated=True` says the block's data was already checked against its session (the
server's `decode_block`): the model thread then re-checks only what can change while it waited.

The batcher keeps the window, the queue, the futures and the metrics: the model thread builds each
row's `Verdict` (queue and compute times, rows in the forward) and hands the whole batch back to
the event loop in one `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from gelato.deadline import within
from gelato.edge.metrics import EdgeMetrics
from gelato.edge.verifier import Accepted, TargetSession, verify_batch
from gelato.types import DraftBlock, Verdict

log = logging.getLogger("gelato.edge.batcher")


@dataclass
class _Request:
    session: TargetSession
    block: DraftBlock
    received: float
    future: asyncio.Future[Verdict]
    validated: bool = False
    queued: float = field(default_factory=time.perf_counter)  # when it asked: its batch's window opens


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
        self._free: asyncio.Event | None = None  # set while no batch is on the model thread
        self._forming = False  # the batcher task holds requests of a batch still forming

    def start(self) -> None:
        self._free = asyncio.Event()
        self._free.set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def verify(
        self, session: TargetSession, block: DraftBlock, received: float, *, validated: bool = False
    ) -> Verdict:
        loop = asyncio.get_running_loop()
        request = _Request(session, block, received, loop.create_future(), validated)
        free = self._free
        if (
            free is not None
            and free.is_set()
            and not self._forming
            and self.queue.empty()
            and self.open_sessions() <= 1
        ):
            # The batch would be this request alone, closed at once: no hop through the batcher task.
            self._submit(loop, [request])
        else:
            self.queue.put_nowait(request)
        return await request.future

    async def _collect(self, first: _Request, batch: list[_Request]) -> list[_Request]:
        """`first` and whatever asks within `window_s` of it (the window runs from when `first`
        asked, so time it waited for the previous batch's forward counts: with the model thread
        busy longer than the window, the next batch closes as soon as that forward is done).
        Gathered into `batch` as they are taken from the queue, so none is lost if this fails."""
        deadline = first.queued + self.window_s
        while len(batch) < self.max_batch and len(batch) < self.open_sessions():
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await within(self.queue.get(), remaining))
            except TimeoutError:
                break
        return [r for r in batch if not r.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._free is not None
        while True:
            await self._free.wait()  # the window opens once the previous batch is done
            first = await self.queue.get()
            self._forming = True
            taken = [first]
            try:
                await self._free.wait()  # a lone request may have gone straight to the model thread
                batch = await self._collect(first, taken)
            except Exception as exc:
                # A fault here (a bug: nothing in forming a batch is expected to fail) fails the
                # rows it holds, not the batcher: a dead batcher task would leave every session
                # of the edge waiting for verdicts that never come.
                log.exception("batcher: forming a batch of %d row(s) failed; they fail, the edge goes on", len(taken))
                self._resolve(taken, [exc] * len(taken))
                continue
            finally:
                self._forming = False
            if batch:
                self._submit(loop, batch)

    def _submit(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        assert self._free is not None
        self._free.clear()
        try:
            self.executor.submit(self._forward, batch, loop)
        except Exception as exc:  # the executor is shut down: fail the rows, not the server
            self._resolve(batch, [exc] * len(batch))

    def _forward(self, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        """Model thread: verify the batch, build each row's verdict, hand them all back at once."""
        results: list[Verdict | BaseException]
        try:
            start = time.perf_counter()
            outcomes = verify_batch([(r.session, r.block) for r in batch], [r.validated for r in batch])
            end = time.perf_counter()
            results = self._verdicts(batch, outcomes, start, end)
        except Exception as exc:  # only if verify_batch itself broke: fail its rows, not the server
            results = [exc] * len(batch)
        except BaseException as exc:
            # Not an error of these rows (KeyboardInterrupt, SystemExit raised on this thread):
            # logged, and raised on into the executor's future (which nobody reads), but only once
            # the rows are answered and the model thread freed: nothing else would ever free it,
            # and every later verify would wait.
            log.error("model thread interrupted by %r during a batch of %d row(s)", exc, len(batch))
            error = RuntimeError(f"verification interrupted: {exc!r}")
            error.__cause__ = exc
            self._hand_back(loop, batch, [error] * len(batch))
            raise
        self._hand_back(loop, batch, results)

    def _hand_back(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Request], results: list[Verdict | BaseException]
    ) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits for these rows
            loop.call_soon_threadsafe(self._resolve, batch, results)

    def _verdicts(
        self, batch: list[_Request], outcomes: list[Accepted | BaseException], start: float, end: float
    ) -> list[Verdict | BaseException]:
        results: list[Verdict | BaseException] = []
        verified, forwards = 0, 0.0
        for r, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                results.append(outcome)
                continue
            verified += 1
            # A forward of n rows verified up to n of them; rows re-run alone (the batched step
            # broke) each had their own: forwards >= sum of 1/n over the verified rows, equal when
            # every row of each forward was verified, so it is rounded up (rows whose acceptance
            # failed, or were re-run after a failure, leave a forward's share short of 1).
            forwards += 1.0 / max(1, outcome.batch_rows)
            self.metrics.tokens_drafted.inc(r.block.k)
            self.metrics.tokens_accepted.inc(outcome.n_accepted)
            results.append(
                Verdict(
                    round=r.block.round,
                    n_accepted=outcome.n_accepted,
                    next_token=outcome.next_token,
                    queue_ms=(start - r.received) * 1e3,
                    compute_ms=(end - start) * 1e3,
                    batch_rows=outcome.batch_rows,
                )
            )
        if verified:
            self.metrics.batches.inc(max(1, math.ceil(forwards - 1e-9)))
            self.metrics.batch_rows.inc(verified)
            self.metrics.verify_seconds.observe(end - start)
        return results

    def _resolve(self, batch: list[_Request], results: list[Verdict | BaseException]) -> None:
        """Event loop: every row's future at once, then the model thread is free again (whatever
        happens here: a batcher that never frees it would leave every session waiting)."""
        try:
            for r, result in zip(batch, results, strict=True):
                if r.future.done():
                    continue
                if isinstance(result, StopIteration):
                    # A future refuses StopIteration (TypeError), which would leave this row's and
                    # the next rows' futures unanswered: a row's error all the same, its cause kept.
                    error = RuntimeError(f"StopIteration in verification: {result}")
                    error.__cause__ = result
                    result = error
                if isinstance(result, BaseException):
                    r.future.set_exception(result)
                else:
                    r.future.set_result(result)
        finally:
            assert self._free is not None
            self._free.set()
