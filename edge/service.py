"""The `gelato.v1.Gelato` service: Info, and Session (one bidi stream per device session).

Contract: every malformed message ends only its own stream, with a precise status:
INVALID_ARGUMENT (bad parameters or data, bytes that do not parse as the message: the service
takes raw bytes and parses them itself, since gRPC would answer a failed deserialization UNKNOWN),
FAILED_PRECONDITION, OUT_OF_RANGE, RESOURCE_EXHAUSTED, UNAVAILABLE; INTERNAL only for a genuine
server fault, and then for that session alone, naming the error's kind and an incident id, never
its text (logged under that id). The server and other sessions go on. Client strings are echoed
only clipped (`gelato.wire.clip`). Model forwards run on one model thread, never on the event
loop. A session is released however its stream ends, and before its final status is sent. A
device that sends nothing, or takes no answer, for the idle timeout has gone or stalled: its
stream ends DEADLINE_EXCEEDED; so does a stream that sends no open within the open timeout, and
streams waiting for their open are bounded (`GelatoService.waiting_limit`, RESOURCE_EXHAUSTED
beyond). `GelatoService.end_streams` is the shutdown's part in here (`gelato.edge.server` says
when and why it runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
from grpc._cython.cygrpc import ExecuteBatchError

from gelato.deadline import within
from gelato.edge.batcher import Batcher, Run
from gelato.edge.clients import client_of
from gelato.edge.config import EdgeConfig
from gelato.edge.kv_pool import PoolMemoryError
from gelato.edge.metrics import EdgeMetrics
from gelato.edge.model_thread import ModelThread
from gelato.edge.session_log import log_close_failure, log_end, log_open
from gelato.edge.sessions import AdmissionError, SessionRegistry, StatusError, TargetSession
from gelato.edge.statuses import (
    MAX_DETAILS,
    end_stream,
    internal_details,
    new_incident,
    out_of_memory_status,
    parse_request,
    pool_full_status,
)
from gelato.edge.streaming import RunSteps, streamed_runs
from gelato.models import LoadedModel, out_of_memory
from gelato.types import PROTOCOL_VERSION, DraftBlock, EdgeInfo, SessionInfo, Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.wire import (
    MODEL_LOADING,
    WireError,
    clip,
    decode_block,
    decode_open,
    encode_info,
    encode_opened,
    encode_verdict,
)

_T = TypeVar("_T")

log = logging.getLogger("gelato.edge")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gelato"].full_name
SHUTDOWN_DETAILS = "edge shutting down: reopen the session with its accepted prefix on another edge"
# After the grace period, how long a stream may stay silent after its last answer before it is
# ended anyway (its device's next message is answered UNAVAILABLE within this time).
SETTLE_S = 0.5
BACKSTOP_S = 0.5  # gRPC cancels every call still open this long after that (e.g. a stuck forward)
_POLL_S = 0.02  # how often shutdown looks again at streams owed an answer
# Session streams that may wait for their open at once, at least (`GelatoService.waiting_limit`):
# room for a whole fleet re-opening after an edge restart.
MIN_WAITING_STREAMS = 64


class _Stream:
    """An open Session stream: its client, its session once opened, and as shutdown sees it: the task serving
    it, since when (`time.monotonic()`) it waits for its device's next message (None while the
    edge owes the device an answer), and whether shutdown has cut it."""

    __slots__ = ("client", "cut", "session", "task", "unclosed", "waiting_since")

    def __init__(self, task: asyncio.Task | None, client: str = "") -> None:
        self.task = task
        self.client = client  # who opened it (`gelato.edge.clients.client_of`; "" with no per-client limit)
        self.session: TargetSession | None = None
        self.waiting_since: float | None = None
        self.cut = False
        self.unclosed = False  # the device's side ended with no close message: half-closed or cancelled

    def session_id(self) -> str | None:
        return self.session.session_id if self.session is not None else None


class GelatoService:
    """`gelato.v1.Gelato` on raw request bytes (see `handler`)."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.streams: set[_Stream] = set()  # open Session streams (event loop only)
        self.ending = False  # the grace period is over: every stream ends at its next chance
        self._stream_ended = asyncio.Event()
        self.loaded: LoadedModel | None = None
        self.metrics = EdgeMetrics()
        # One model thread: forwards never run on the event loop and never race on the model.
        self.executor = ModelThread()
        self.registry = SessionRegistry(
            config.max_sessions, int(config.kv_budget_mb * 2**20), config.max_draft_tokens, self._close_on_model_thread
        )
        # Gauges read at scrape time, not set per verdict: that would walk every session on every
        # verdict (O(sessions) each, on the event loop), and the pool is reshaped on the model thread.
        self.metrics.sessions_active.set_function(lambda: len(self.registry))
        self.metrics.kv_bytes.set_function(self.registry.kv_bytes)
        self.metrics.kv_pool_bytes.set_function(self.registry.pool_bytes)
        self.batcher = Batcher(
            self.executor, config.batch_window_ms / 1e3, config.max_batch, self.registry.ready, self.metrics
        )

    def _close_on_model_thread(self, session: TargetSession) -> None:
        try:
            self.executor.submit(session.close).add_done_callback(functools.partial(log_close_failure, session))
        except RuntimeError:
            # The server has stopped (its executor is shut down): the pool goes with it. Closing
            # here, on the event loop, would reshape the pool while a forward that outlived the
            # stop (shut down without waiting) may still run on the model thread.
            log.info("session %s released after the edge stopped: its KV slot goes with the pool", session.session_id)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service with no request deserializer: methods get bytes and parse them, so that
        unparsable input is INVALID_ARGUMENT (gRPC's own deserializer failing is UNKNOWN). The
        generated stubs cannot be told otherwise, and must not be edited."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Info": grpc.unary_unary_rpc_method_handler(
                    self.Info, response_serializer=pb.InfoResponse.SerializeToString
                ),
                "Session": grpc.stream_stream_rpc_method_handler(
                    self.Session, response_serializer=pb.EdgeMessage.SerializeToString
                ),
            },
        )

    def _require_model(self) -> LoadedModel:
        if self.loaded is None:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, MODEL_LOADING)
        return self.loaded

    async def Info(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        try:
            parse_request(pb.InfoRequest, request)
            m = self._require_model()
        except StatusError as exc:
            await context.abort(exc.code, clip(exc.details, MAX_DETAILS))
        return encode_info(
            EdgeInfo(
                protocol_version=PROTOCOL_VERSION,
                target_model=m.name,
                tokenizer_fingerprint=m.fingerprint,
                vocab_size=m.vocab_size,
                context_limit=m.context_limit,
                max_draft_tokens=self.config.max_draft_tokens,
                max_sessions=self.config.max_sessions,
                active_sessions=len(self.registry),
                eos_token_ids=tuple(m.eos_token_ids),
                kv_bytes_in_use=self.registry.kv_bytes(),
                kv_bytes_reserved=self.registry.reserved_bytes,
                kv_budget_bytes=self.registry.kv_budget_bytes,
                kv_pool_bytes=self.registry.pool_bytes(),
                max_ahead_rounds=self.config.max_ahead_rounds,
            )
        )

    def waiting_limit(self) -> int:
        """Session streams that may wait for their open (or its prefill) at once: a device's
        stream opens at once, so more mean a client that starts streams and sends nothing; each
        would otherwise hold a task and gRPC's call state until `--open-timeout-s`."""
        return max(MIN_WAITING_STREAMS, self.config.max_sessions)

    async def Session(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        limit = self.config.max_sessions_per_client
        client = client_of(context.peer(), context.auth_context()) if limit else ""  # no limit: nobody counted
        if limit and (held := sum(s.client == client for s in self.streams)) >= limit:
            # Counted before the edge-wide limit on waiting streams: one client's flood of streams
            # that send nothing is refused here, and leaves the waiting room to the others.
            self.metrics.sessions_rejected.labels("client_limit").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this client ({clip(client)}) holds {held} Session streams on this edge (open, or waiting for their "
                f"open), its limit (--max-sessions-per-client {limit}); close one or try again later",
            )
        waiting = sum(s.session is None for s in self.streams)
        if waiting >= self.waiting_limit():
            self.metrics.sessions_rejected.labels("waiting_streams").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{waiting} Session streams are waiting to open on this edge (at most {self.waiting_limit()}); "
                "send the open as the stream's first message, or try again later",
            )
        stream = _Stream(asyncio.current_task(), client)
        self.streams.add(stream)
        outcome = "OK"
        try:
            await self._serve(context, stream)
            if stream.unclosed:  # a device that cancels its call is often seen so too (gRPC ends the read)
                outcome = "WITHOUT_CLOSE"
        except StatusError as exc:
            details = clip(exc.details, MAX_DETAILS)
            outcome = exc.code.name
            log.info("session %s: %s %s", stream.session_id(), exc.code.name, details)
            await end_stream(context, exc.code, details)
        except asyncio.CancelledError:
            if not stream.cut:  # the device cancelled or vanished: there is no one to answer
                outcome = "CANCELLED"
                raise
            outcome = "UNAVAILABLE"
            log.info("session %s: UNAVAILABLE %s", stream.session_id(), SHUTDOWN_DETAILS)
            await end_stream(context, grpc.StatusCode.UNAVAILABLE, SHUTDOWN_DETAILS)
        except Exception as exc:  # a server fault (e.g. the prefill failed): this stream only, named
            outcome = "INTERNAL"
            incident = new_incident()
            log.exception("session %s failed (incident %s)", stream.session_id(), incident)
            await end_stream(context, grpc.StatusCode.INTERNAL, internal_details("edge error", exc, incident))
        finally:
            self.streams.discard(stream)
            if stream.session is not None:
                log_end(stream.session, outcome)
            self._stream_ended.set()

    async def _serve(self, context: grpc.aio.ServicerContext, stream: _Stream) -> None:
        """Answer the device's messages until it closes; its session is released however this
        ends, before any status is sent: a status waits behind answers a stalled device never
        reads (`_send`), and the session must not wait with it."""
        try:
            while (msg := await self._next_message(context, stream)) is not None:
                if not await self._answer(context, stream, msg, time.perf_counter()):
                    return
            stream.unclosed = True
        finally:
            if stream.session is not None:
                self.registry.release(stream.session.session_id)

    async def _answer(
        self, context: grpc.aio.ServicerContext, stream: _Stream, msg: pb.DeviceMessage, received: float
    ) -> bool:
        """Answer one message; False when it closes the session."""
        kind, session = msg.WhichOneof("kind"), stream.session
        if self.ending and kind != "close":
            raise StatusError(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_DETAILS)
        if kind == "open":
            if session is not None:
                raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "session already open")
            session = stream.session = await self._open(msg.open)
            log_open(session, context.peer())
            self._refuse_if_ending()
            await self._send(context, encode_opened(self._session_info(session)))
        elif kind == "draft":
            if session is None:
                raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "draft block before open")
            verdict = await self._verify(session, msg.draft, received)
            self._refuse_if_ending()  # the device waits for this answer: end the stream now
            await self._send(context, encode_verdict(verdict))
        elif kind == "generate":
            if session is None:
                raise StatusError(grpc.StatusCode.FAILED_PRECONDITION, "generate before open")
            failed = functools.partial(self._row_status, session=session)
            runs = streamed_runs(session, msg.generate, received, self._runs(session), self._refuse_if_ending, failed)
            async with contextlib.aclosing(runs):
                async for message in runs:
                    await self._send(context, encode_verdict(message.verdict))
                    if message.error is not None:  # the step after them failed: as it would have alone
                        raise failed(message.error)
        elif kind == "close":
            return False
        else:
            # Nothing set, or only a field this edge does not know (a newer device's): no kind either way.
            what = "a DeviceMessage of a kind this edge does not know" if msg.ByteSize() else "empty DeviceMessage"
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, f"{what} (no open/draft/generate/close)")
        return True

    def _session_info(self, session: TargetSession) -> SessionInfo:
        return SessionInfo(
            session_id=session.session_id,
            target_model=session.loaded.name,
            context_limit=session.loaded.context_limit,
            max_draft_tokens=self.config.max_draft_tokens,
            max_ahead_rounds=self.config.max_ahead_rounds,
            empty_ahead=self.config.max_ahead_rounds > 0,
            eos_token_ids=session.loaded.eos_token_ids,
        )

    def _refuse_if_ending(self) -> None:
        if self.ending:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, SHUTDOWN_DETAILS)

    async def end_streams(self, grace_s: float, settle_s: float = SETTLE_S) -> None:
        """Serve open Session streams as usual for `grace_s` (returning as soon as none is left),
        then end each one UNAVAILABLE while its device waits for the edge (module docstring): at
        its next message, when its verdict is ready, or once it has been silent for `settle_s`
        after its last answer. Returns when no stream is left, or `settle_s + BACKSTOP_S` after the
        grace period whatever happens (gRPC's own cancellation then ends the rest)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.streams and loop.time() < deadline:
            await self._until_a_stream_ends(deadline)
        self.ending = True
        give_up = deadline + settle_s + BACKSTOP_S
        while self.streams and loop.time() < give_up:
            now, wake = time.monotonic(), loop.time() + _POLL_S
            for stream in self.streams:
                if stream.cut or stream.waiting_since is None:
                    continue  # cut already, or owed an answer: ends as soon as that is ready
                silent_s = now - stream.waiting_since
                if silent_s >= settle_s and stream.task is not None:
                    stream.cut = True
                    stream.task.cancel()  # lands in its read: `Session` answers UNAVAILABLE
                else:
                    wake = min(wake, loop.time() + settle_s - silent_s)
            await self._until_a_stream_ends(min(wake, give_up))

    async def _until_a_stream_ends(self, until: float) -> None:
        """Wait until a stream ends or the loop's clock reaches `until`."""
        self._stream_ended.clear()
        timeout_s = until - asyncio.get_running_loop().time()
        if timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                await within(self._stream_ended.wait(), timeout_s)

    async def _next_message(self, context: grpc.aio.ServicerContext, stream: _Stream) -> pb.DeviceMessage | None:
        """The device's next message; None at end of stream. A device silent for longer than the
        idle timeout has vanished: its session ends (DEADLINE_EXCEEDED) and is freed. While it
        waits, `stream.waiting_since` says since when (shutdown may cut the wait)."""
        stream.waiting_since = time.monotonic()
        idle_s = self.config.idle_timeout_s
        if stream.session is None:  # the first message: a device sends its open at once
            idle_s = min(idle_s, self.config.open_timeout_s)
        try:
            data = await within(context.read(), idle_s)
        except TimeoutError:
            if stream.session is None:
                raise StatusError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no open within {idle_s:g} s of the stream's start"
                ) from None
            raise StatusError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"session idle for more than {idle_s:g} s; reopen with the accepted prefix",
            ) from None
        finally:
            stream.waiting_since = None
        if data is grpc.aio.EOF:
            return None
        return parse_request(pb.DeviceMessage, data)

    async def _send(self, context: grpc.aio.ServicerContext, msg: pb.EdgeMessage) -> None:
        """Write one answer. A device that takes none for longer than the idle timeout (it stopped
        reading: gRPC's flow control holds the write once the stream's window is full) has stalled:
        its session ends DEADLINE_EXCEEDED and is freed, as a silent one's does. Without this
        limit such a stream would hold its session and KV until the device's own deadline, if any."""
        try:
            await within(context.write(msg), self.config.idle_timeout_s)
        except ExecuteBatchError:
            # gRPC fails a write still waiting when the call ends under it (the device cancelled,
            # its deadline passed, its connection dropped; the context may not say so yet): the
            # device is gone, as when a read finds the stream cancelled. grpc.aio handles this
            # error itself around handlers that yield, but `context.write` hands it to us.
            raise asyncio.CancelledError from None
        except TimeoutError:
            raise StatusError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"device took no answer for more than {self.config.idle_timeout_s:g} s (it stopped reading); "
                "reopen with the accepted prefix",
            ) from None

    async def _open(self, req: pb.OpenSession) -> TargetSession:
        # Whether this edge can serve the device at all (FAILED_PRECONDITION), then whether the
        # request itself is well formed (`decode_open`: INVALID_ARGUMENT). The protocol first,
        # before the model is needed: a device that speaks another one is told so while the target
        # still loads, not asked to wait (UNAVAILABLE) for an edge that can never serve it.
        if req.protocol_version != PROTOCOL_VERSION:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {req.protocol_version} is not supported; this edge speaks {PROTOCOL_VERSION}",
            )
        m = self._require_model()
        if req.tokenizer_fingerprint != m.fingerprint:
            raise StatusError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tokenizer mismatch: drafter {clip(req.drafter_model)!r} "
                f"(fingerprint {clip(req.tokenizer_fingerprint) or 'none'}) and target {m.name!r} "
                f"(fingerprint {m.fingerprint}) do not share a tokenizer",
            )
        try:
            opening = decode_open(req, m.vocab_size, m.context_limit)
        except WireError as exc:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        try:
            session = self.registry.admit(m, opening.sampling, list(opening.prefix_ids), opening.max_new_tokens)
        except AdmissionError as exc:
            self.metrics.sessions_rejected.labels("admission").inc()
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        try:
            loop, piece = asyncio.get_running_loop(), self.config.prefill_chunk_tokens
            while not await loop.run_in_executor(self.executor, session.prefill, piece):
                # The next piece queues behind whatever batches came meanwhile; once the grace
                # period is over none is queued: a long prompt would hold the model thread (and
                # the device, owed an answer) past the shutdown's limit.
                self._refuse_if_ending()
        except BaseException as exc:
            self.registry.release(session.session_id)
            if isinstance(exc, PoolMemoryError):
                self.metrics.sessions_rejected.labels("kv_memory").inc()
                raise pool_full_status(exc) from exc
            if isinstance(exc, Exception) and out_of_memory(exc):
                self.metrics.sessions_rejected.labels("kv_memory").inc()
                raise out_of_memory_status(exc) from exc
            raise
        self.registry.mark_ready(session.session_id)
        return session

    async def _verify(self, session: TargetSession, msg: pb.DraftBlock, received: float) -> Verdict:
        m = session.loaded
        try:
            block = decode_block(msg, m.vocab_size, session.params.greedy, self.config.max_draft_tokens)
        except WireError as exc:
            raise StatusError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if block.guess is not None or block.follow:
            if not self.config.max_ahead_rounds:
                raise StatusError(
                    grpc.StatusCode.FAILED_PRECONDITION, "send-ahead is off on this edge (max_ahead_rounds 0)"
                )
            ahead = session.resolve_ahead(block, self.config.max_ahead_rounds)
            if ahead is None:  # at once: no forward, the session untouched
                self.metrics.ahead_blocks.labels("stale").inc()
                return Verdict(round=block.round, n_accepted=0, next_token=0, stale=True, batch_rows=0)
            verdict = await self._verify_block(session, ahead, received)
            self.metrics.ahead_blocks.labels("hit").inc()  # verified: a block that failed is not a hit
            return verdict
        return await self._verify_block(session, block, received)

    def _runs(self, session: TargetSession) -> RunSteps:
        """`streamed_runs`' steps of `session`, their failures raised as they are (made statuses
        by `_row_status` once the message before is sent). Past the session's reservation
        `check_state` answers OUT_OF_RANGE, as for a draft block there: the device asked for more
        tokens than it opened the session for. The edge ending its streams ends a run after the
        step it is in."""

        async def run(steps: int, eos: frozenset[int], received: float) -> Run:
            session.check_state(DraftBlock(round=session.rounds, ids=()))
            return await self.batcher.run(session, steps, eos, received, lambda: self.ending)

        return run

    async def _verify_block(self, session: TargetSession, block: DraftBlock, received: float) -> Verdict:
        """A block whose data is valid for this session (decoded by `decode_block`, or built here)
        through the batcher. Its data is not checked again: only what can change while it waits."""
        session.check_state(block)  # closed, round, context limit, reservation: answered before queueing
        return await self._batched(self.batcher.verify(session, block, received, validated=True), session)

    async def _batched(self, work: Awaitable[_T], session: TargetSession) -> _T:
        """`work` (the batcher's answer for `session`), its failures as this session's status."""
        try:
            return await work
        except StatusError:
            raise
        except Exception as exc:
            raise self._row_status(exc, session) from exc

    def _row_status(self, exc: Exception, session: TargetSession) -> StatusError:
        """The status a failure of this session's row in a forward ends its stream with."""
        if isinstance(exc, StatusError):
            return exc
        if isinstance(exc, PoolMemoryError):  # this row needed KV memory the edge could not allocate
            return pool_full_status(exc)
        if out_of_memory(exc):  # the forward's activations or logits, this row alone (its state restored)
            return out_of_memory_status(exc)
        # a server fault in this row only: this session's state is unknown, end it
        incident = new_incident()
        log.error("verify failed for session %s (incident %s)", session.session_id, incident, exc_info=exc)
        return StatusError(grpc.StatusCode.INTERNAL, internal_details("verification failed", exc, incident))
