"""Generate: edge-only decoding streamed over a session stream (the device's `ar-edge` policy).

Contract: `streamed_runs(session, req, received, run, refuse_if_ending, failed)` checks a
`Generate` request against its session (FAILED_PRECONDITION for a stale round, INVALID_ARGUMENT for
no tokens, OUT_OF_RANGE when the context is already full: no token can come) and yields one
`Message` per message to send, in round order: its Verdict (`join_streamed`) and the failure the
stream ends with once it is sent (None: more may come; the caller makes it a status).
`run(steps, stop_ids, received)` decodes up to `steps` tokens of the session (`Batcher.run`
through the service: more than one a run only while the session is alone), `tokens_per_message`
at most, until eos, `max_tokens` or the context limit. A run that fails with no verdict (e.g.
`check_state`'s OUT_OF_RANGE past the reservation) becomes a status through `failed` (the
service's `_row_status`, where an INTERNAL incident is logged) only once the message before it is
sent, so a stream that ends under a send logs no incident that nobody receives.
`refuse_if_ending()` raises when the edge is shutting down, after each run.

Each run starts before the caller sends the one before it: the model thread decodes the next
message's tokens while the event loop writes this one (a run's end and its message's write
would otherwise be idle time of the model thread, once per message). The forwards that ran
before the send was done are left out of the message's `compute_ms` (`overlapped_ms`): the device
was not waiting for them yet, and its round time less the edge's stays its network time. A run
started and not yet yielded when the stream ends (a send failed, the device went away) is
cancelled: its steps stop after the one in progress (`Batcher.run` stops when its caller is gone).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import NamedTuple

import grpc

from gelato.edge.batcher import Run
from gelato.edge.sessions import StatusError, TargetSession
from gelato.types import Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.wire import MAX_STREAMED_PER_MESSAGE, join_streamed

RunSteps = Callable[[int, frozenset[int], float], Awaitable[Run]]


class Message(NamedTuple):
    verdict: Verdict  # this message's rounds, joined
    error: Exception | None  # the step after them failed: the stream ends with it once this is sent


async def streamed_runs(
    session: TargetSession,
    req: pb.Generate,
    received: float,
    run: RunSteps,
    refuse_if_ending: Callable[[], None],
    failed: Callable[[Exception], StatusError],
) -> AsyncGenerator[Message, None]:
    """The messages that answer `req` (module docstring)."""
    if req.round != session.rounds:
        raise StatusError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"generate at round {req.round}, but the session is at round {session.rounds}",
        )
    if req.max_tokens < 1:
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, "generate: max_tokens must be >= 1")
    eos, limit = frozenset(session.loaded.eos_token_ids), session.loaded.context_limit
    if session.length >= limit:  # no token can come: say so, leave no read waiting
        raise StatusError(grpc.StatusCode.OUT_OF_RANGE, f"generate: the context limit ({limit} tokens) is full")
    per_message = max(1, min(req.tokens_per_message, MAX_STREAMED_PER_MESSAGE))
    sent, overlapped_ms = 0, 0.0
    pending: asyncio.Future[Run] | None = asyncio.ensure_future(run(min(per_message, req.max_tokens), eos, received))
    try:
        while pending is not None:
            try:
                done = await pending
            except StatusError:
                raise
            except Exception as exc:
                raise failed(exc) from exc
            pending = None
            refuse_if_ending()
            sent += len(done.verdicts)
            more = sent < req.max_tokens and done.verdicts[-1].next_token not in eos
            # At the context limit no more verdicts come, as the device counts itself (SessionOpened).
            launched = time.perf_counter()
            if done.error is None and more and session.length < limit:
                steps = min(per_message, req.max_tokens - sent)
                pending = asyncio.ensure_future(run(steps, eos, launched))
            yield Message(join_streamed(done.verdicts, overlapped_ms), done.error)
            overlapped_ms = (time.perf_counter() - launched) * 1e3  # the next run's forwards meanwhile
    finally:
        if pending is not None:  # the stream ended under a send: that run decodes for nobody
            # (and if it failed already, cancelling it keeps asyncio from logging its error)
            pending.cancel()
