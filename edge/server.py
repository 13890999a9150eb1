"""The edge's gRPC service: Info, Session (one bidi stream per device session), health, reflection.

Contract: `EdgeServer.start()` binds and serves immediately with health NOT_SERVING;
`load(...)` loads the target off the event loop and flips health to SERVING. Every malformed
message ends only its own stream, with a precise status (INVALID_ARGUMENT, FAILED_PRECONDITION,
OUT_OF_RANGE, RESOURCE_EXHAUSTED, UNAVAILABLE); the server and other sessions go on. Model forwards
run on one model thread, never on the event loop. A session is released however its stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge.batcher import Batcher
from edge.metrics import EdgeMetrics
from edge.sessions import AdmissionError, SessionRegistry
from edge.verifier import TargetSession
from gelato.channel import SERVER_OPTIONS
from gelato.models import LoadedModel, load_model
from gelato.types import PROTOCOL_VERSION, Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from gelato.wire import WireError, check_ids, decode_block, decode_sampling, encode_verdict

log = logging.getLogger("gelato.edge")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gelato"].full_name


@dataclass
class EdgeConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    max_sessions: int = 64
    max_draft_tokens: int = 32
    kv_budget_mb: float = 0.0  # 0: no KV-memory limit
    batch_window_ms: float = 2.0
    max_batch: int = 16
    idle_timeout_s: float = 300.0


class GelatoService(pb_grpc.GelatoServicer):
    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.loaded: LoadedModel | None = None
        self.metrics = EdgeMetrics()
        # One model thread: forwards never run on the event loop and never race on the model.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target")
        self.registry = SessionRegistry(
            config.max_sessions, int(config.kv_budget_mb * 2**20), config.max_draft_tokens, self._close_on_model_thread
        )
        # Read at scrape time: the pool is reshaped on the model thread, after the gauges were set.
        self.metrics.kv_pool_bytes.set_function(self.registry.pool_bytes)
        self.batcher = Batcher(
            self.executor, config.batch_window_ms / 1e3, config.max_batch, lambda: len(self.registry), self.metrics
        )

    def _update_gauges(self) -> None:
        self.metrics.sessions_active.set(len(self.registry))
        self.metrics.kv_bytes.set(self.registry.kv_bytes())

    def _close_on_model_thread(self, session: TargetSession) -> None:
        try:
            self.executor.submit(session.close)
        except RuntimeError:  # executor already shut down: no forward can run any more
            session.close()

    def _require_model(self) -> LoadedModel:
        if self.loaded is None:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the target model is still loading")
        return self.loaded

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        try:
            m = self._require_model()
        except _Abort as exc:
            await context.abort(exc.code, exc.details)
        return pb.InfoResponse(
            protocol_version=PROTOCOL_VERSION,
            target_model=m.name,
            tokenizer_fingerprint=m.fingerprint,
            vocab_size=m.vocab_size,
            context_limit=m.context_limit,
            max_draft_tokens=self.config.max_draft_tokens,
            max_sessions=self.config.max_sessions,
            active_sessions=len(self.registry),
            eos_token_ids=m.eos_token_ids,
            kv_bytes_in_use=self.registry.kv_bytes(),
            kv_bytes_reserved=self.registry.reserved_bytes,
            kv_budget_bytes=self.registry.kv_budget_bytes,
            kv_pool_bytes=self.registry.pool_bytes(),
        )

    async def Session(
        self, request_iterator: AsyncIterator[pb.DeviceMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EdgeMessage]:
        session: TargetSession | None = None
        try:
            while True:
                msg = await self._next_message(context)
                if msg is None:
                    break
                received = time.perf_counter()
                kind = msg.WhichOneof("kind")
                if kind == "open":
                    if session is not None:
                        raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "session already open")
                    session = await self._open(msg.open)
                    yield pb.EdgeMessage(
                        opened=pb.SessionOpened(
                            session_id=session.session_id,
                            target_model=session.loaded.name,
                            context_limit=session.loaded.context_limit,
                            max_draft_tokens=self.config.max_draft_tokens,
                        )
                    )
                elif kind == "draft":
                    if session is None:
                        raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "draft block before open")
                    yield encode_verdict(await self._verify(session, msg.draft, received))
                    self._update_gauges()
                elif kind == "close":
                    break
                else:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty DeviceMessage (no open/draft/close)")
        except _Abort as exc:
            log.info("session %s: %s %s", session and session.session_id, exc.code.name, exc.details)
            await context.abort(exc.code, exc.details)
        finally:
            if session is not None:
                self.registry.release(session.session_id)
                self._update_gauges()

    async def _next_message(self, context: grpc.aio.ServicerContext) -> pb.DeviceMessage | None:
        """The device's next message; None at end of stream. A device silent for longer than the
        idle timeout has vanished: its session ends (DEADLINE_EXCEEDED) and is freed."""
        try:
            msg = await asyncio.wait_for(context.read(), timeout=self.config.idle_timeout_s)
        except TimeoutError:
            raise _Abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"session idle for more than {self.config.idle_timeout_s:g} s; reopen with the accepted prefix",
            ) from None
        return None if msg is grpc.aio.EOF else msg  # type: ignore[return-value]

    async def _open(self, req: pb.OpenSession) -> TargetSession:
        m = self._require_model()
        if req.protocol_version != PROTOCOL_VERSION:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {req.protocol_version} is not supported; this edge speaks {PROTOCOL_VERSION}",
            )
        if req.tokenizer_fingerprint != m.fingerprint:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tokenizer mismatch: drafter {req.drafter_model!r} "
                f"(fingerprint {req.tokenizer_fingerprint or 'none'}) and target {m.name!r} "
                f"(fingerprint {m.fingerprint}) do not share a tokenizer",
            )
        prefix = list(req.prefix_ids)
        try:
            if not prefix:
                raise WireError("prefix_ids is empty: the prompt needs at least one token")
            check_ids(prefix, m.vocab_size, "prefix_ids")
            params = decode_sampling(req.sampling)
        except WireError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if len(prefix) >= m.context_limit:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {len(prefix)} tokens does not fit the target's context limit of {m.context_limit}",
            )
        try:
            session = self.registry.admit(m, params, prefix, req.max_new_tokens)
        except AdmissionError as exc:
            self.metrics.sessions_rejected.inc()
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        self._update_gauges()
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, session.prefill)
        except BaseException:
            self.registry.release(session.session_id)
            raise
        return session

    async def _verify(self, session: TargetSession, msg: pb.DraftBlock, received: float) -> Verdict:
        m = session.loaded
        try:
            block = decode_block(msg, m.vocab_size, session.params.greedy, self.config.max_draft_tokens)
        except WireError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        if block.round != session.rounds:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"draft block for round {block.round}, but the session is at round {session.rounds}",
            )
        if session.length + block.k >= m.context_limit:
            raise _Abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{session.length} tokens + {block.k} drafts reach the context limit of {m.context_limit}",
            )
        if session.reserved_tokens and session.length + block.k >= session.reserved_tokens:
            # Admission reserved KV for prefix + max_new_tokens + one block; going past it would
            # grow the shared pool beyond what the budget was charged.
            raise _Abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{session.length} tokens + {block.k} drafts pass the {session.reserved_tokens} tokens reserved "
                f"at open (prefix + max_new_tokens {session.max_new_tokens} + one block); open a new session",
            )

        try:
            return await self.batcher.verify(session, block, received)
        except Exception as exc:  # the forward failed: this session's state is unknown, end it
            log.exception("verify failed for session %s", session.session_id)
            raise _Abort(grpc.StatusCode.INTERNAL, f"verification failed: {exc}") from exc


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class EdgeServer:
    """Owns the grpc.aio server, the health servicer and the Gelato service."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.service = GelatoService(config)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        self.port = 0

    async def start(self) -> int:
        pb_grpc.add_GelatoServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await self.server.start()
        self.service.batcher.start()
        return self.port

    async def load(self, target: str | None, dtype: str, device: str) -> LoadedModel:
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(self.service.executor, load_model, target, "target", dtype, device)
        self.service.loaded = loaded
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return loaded

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)  # type: ignore[arg-type]
        await self.health.set(SERVICE_NAME, status)  # type: ignore[arg-type]

    async def stop(self, grace_s: float = 5.0) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)
        await self.service.batcher.stop()
        self.service.executor.shutdown(wait=False)
