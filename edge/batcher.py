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
request, not from the end of that forward. A request in a window whose caller went away is dropped
before the forward (any other reaches the verifier, which refuses a released session's).
`validated=True` says the block's data was already checked against its session (the
server's `decode_block`): the model thread then re-checks only what can change while it waited.
`await Batcher.run(session, n, stop_ids, received)` is streamed decoding's step (Generate): a
session alone on the edge runs up to `n` empty blocks in one model-thread job, with no round trip
through the event loop per token, and gives the model thread up as soon as anyone else needs it;
with company it is one block through the window, as `verify`.

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
from typing import Any, NamedTuple

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
    future: asyncio.Future[Any]  # its Verdict; for a run (`Batcher.run`), the `Run`
    validated: bool = False
    queued: float = field(default_factory=time.perf_counter)  # when it asked: its batch's window opens


class Run(NamedTuple):
    """A streamed run's verdicts, in round order, and the error of the step after them (None: it
    stopped for another reason). The stream sends the verdicts, then ends with the error, as it
    would have after the same steps one at a time."""

    verdicts: list[Verdict]
    error: Exception | None = None


_VALIDATED = (True,)  # a run's empty blocks: nothing in them to check again


def _verdict(block: DraftBlock, outcome: Accepted, received: float, start: float, end: float) -> Verdict:
    """A verified row's Verdict: waited from `received` to `start`, computed until `end` (a row
    re-run alone computed for its own forward's time, not the failed batch's and the other rows'
    re-runs, and waited for the rest)."""
    compute_s = end - start if outcome.alone is None else outcome.alone[1] - outcome.alone[0]
    return Verdict(
        round=block.round,
        n_accepted=outcome.n_accepted,
        next_token=outcome.next_token,
        # The rest of its time at the edge, until the whole call's verdicts went back, as waiting:
        # the device counts what is not the edge's as the network's.
        queue_ms=(end - received - compute_s) * 1e3,
        compute_ms=compute_s * 1e3,
        batch_rows=outcome.batch_rows,
    )


def _never() -> bool:
    return False


# A run (`Batcher.run`: a lone session's tokens decoded in one model-thread job, sent as one
# message) ends once it has lasted this long: with a slow target (a CPU edge, layers offloaded to
# disk) its tokens per message times a step could pass the device's timeout for one message
# (`--verdict-timeout-s`), and a stream should show its tokens at least about this often.
RUN_BUDGET_S = 1.0


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
        if self._lone():
            # The batch would be this request alone, closed at once: no hop through the batcher task.
            self._submit(loop, [request])
        else:
            self.queue.put_nowait(request)
        return await request.future

    async def run(
        self,
        session: TargetSession,
        max_steps: int,
        stop_ids: frozenset[int],
        received: float,
        stop: Callable[[], bool] = _never,
    ) -> Run:
        """Streamed decoding (Generate): verdicts of up to `max_steps` empty blocks of `session`,
        from its current round on; at least one, or the first one's error raised. A session alone
        on the edge (the lone path of `verify`) steps on the model thread without a round trip
        through the event loop per token, until `max_steps`, a token of `stop_ids`, the context
        limit, a step that fails (`Run.error`), its caller gone, `stop()` (the edge ending its
        streams), or anyone else needing the model thread (a request queued, a second session
        ready, any other job submitted: a prefill, a close). Otherwise one step, as `verify`."""
        block = DraftBlock(round=session.rounds, ids=())
        if max_steps <= 1 or not self._lone():
            return Run([await self.verify(session, block, received, validated=True)])
        assert self._free is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Run] = loop.create_future()
        self._free.clear()
        request = _Request(session, block, received, future, True)
        try:
            self.executor.submit(self._steps, request, max_steps, stop_ids, stop, loop)
        except Exception as exc:  # the executor is shut down: fail the run, not the server
            self._resolve_run(future, exc)
        return await future

    def _lone(self) -> bool:
        """Nothing but this request would use the model thread: it is free, no batch is forming or
        queued, at most one session can send."""
        free = self._free
        return (
            free is not None
            and free.is_set()
            and not self._forming
            and self.queue.empty()
            and self.open_sessions() <= 1
        )

    def _still_alone(self) -> bool:
        """Model thread, during a run: no request queued or taken into a forming batch (the batcher
        task takes the first at once and holds it until the model thread is free), no second
        session ready, no other job submitted to the model thread (`ModelThread.jobs` counts them;
        any other executor: assume there may be). Reads the event loop's state without a lock: each
        read is one length or flag, at worst a step late."""
        jobs = getattr(self.executor, "jobs", None)
        return (
            self.queue.empty() and not self._forming and self.open_sessions() <= 1 and jobs is not None and jobs() <= 1
        )

    def _steps(
        self,
        first: _Request,
        max_steps: int,
        stop_ids: frozenset[int],
        stop: Callable[[], bool],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Model thread: `run`'s steps, handed back at once. Each step is counted as `_verdicts`
        counts one forward of one row (an empty block drafts and accepts nothing)."""
        session, received, block = first.session, first.received, first.block
        limit = session.loaded.context_limit
        verdicts: list[Verdict] = []
        until = time.perf_counter() + RUN_BUDGET_S
        result: Run | BaseException
        try:
            while True:
                start = time.perf_counter()
                (outcome,) = verify_batch([(session, block)], _VALIDATED)
                end = time.perf_counter()
                if isinstance(outcome, BaseException):
                    error = outcome if isinstance(outcome, Exception) else RuntimeError(repr(outcome))
                    result = Run(verdicts, error) if verdicts else outcome
                    break
                verdicts.append(_verdict(block, outcome, received, start, end))
                self.metrics.batches.inc()
                self.metrics.batch_rows.inc()
                self.metrics.verify_seconds.observe(end - start)
                received = end  # the next step waits for nothing
                if (
                    len(verdicts) >= max_steps
                    or end >= until
                    or outcome.next_token in stop_ids
                    or session.length >= limit
                    or first.future.done()
                    or stop()
                    or not self._still_alone()
                ):
                    result = Run(verdicts)
                    break
                block = DraftBlock(round=session.rounds, ids=())
        except Exception as exc:  # only if verify_batch itself broke
            result = Run(verdicts, exc) if verdicts else exc
        except BaseException as exc:  # as in `_forward`: answer the run and free the thread, then raise
            log.error("model thread interrupted by %r during a run of %d step(s)", exc, len(verdicts))
            error = RuntimeError(f"verification interrupted: {exc!r}")
            error.__cause__ = exc
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._resolve_run, first.future, error)
            raise
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits for this run
            loop.call_soon_threadsafe(self._resolve_run, first.future, result)

    def _resolve_run(self, future: asyncio.Future[Run], result: Run | BaseException) -> None:
        try:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result if not isinstance(result, StopIteration) else RuntimeError(repr(result)))
            else:
                future.set_result(result)
        finally:
            assert self._free is not None
            self._free.set()

    async def _collect(self, first: _Request, batch: list[_Request]) -> list[_Request]:
        """`first` and whatever asks within `window_s` of it (the window runs from when `first`
        asked, so time it waited for the previous batch's forward counts: with the model thread
        busy longer than the window, the next batch closes as soon as that forward is done).
        Gathered into `batch` as they are taken from the queue, so none is lost if this fails."""
        deadline = first.queued + self.window_s
        # Rows whose caller went away are not counted: their session is no longer open, and
        # counting them closed the window before every open session had its block in.
        while (live := sum(not r.future.done() for r in batch)) < self.max_batch and live < self.open_sessions():
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
            results.append(_verdict(r.block, outcome, r.received, start, end))
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
