"""Edge client and the device's generation loop over one bidirectional gRPC stream per session.

Contract: `EdgeClient.generate(drafter, prompt_ids, max_new_tokens, policy)` opens a session,
runs draft/verify rounds until eos or `max_new_tokens`, closes the session and returns a
`GenerationResult` whose `token_ids` equal what the target alone would generate (greedy) or are
distributed as its samples (sampling). Drafting runs on a worker thread, never on the event loop.
Errors from the edge surface as `EdgeError` carrying the gRPC status code and details.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from device.drafter import Drafter
from device.energy import EnergyAccountant, wire_bytes
from device.policy import Policy
from gelato.channel import CLIENT_OPTIONS
from gelato.power import NullMeter
from gelato.types import PROTOCOL_VERSION, GenerationStats, Telemetry
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from gelato.wire import decode_verdict, encode_block, encode_sampling


class EdgeError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"edge answered {code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    elapsed_s: float
    stats: GenerationStats = field(default_factory=GenerationStats)
    target_model: str = ""

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0


class EdgeClient:
    def __init__(self, target: str, deadline_s: float = 3600.0, verdict_timeout_s: float = 120.0) -> None:
        self.target = target
        self.deadline_s = deadline_s
        self.verdict_timeout_s = verdict_timeout_s
        self.channel = grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)
        self.stub = pb_grpc.GelatoStub(self.channel)
        # One worker: drafter forwards stay off the event loop and keep their KV on one thread.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")

    async def info(self, timeout_s: float = 10.0) -> pb.InfoResponse:
        try:
            return await self.stub.Info(pb.InfoRequest(), timeout=timeout_s, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise EdgeError(exc.code(), exc.details() or "") from exc

    async def close(self) -> None:
        await self.channel.close()
        self.executor.shutdown(wait=False)

    async def generate(
        self,
        drafter: Drafter,
        prompt_ids: list[int],
        max_new_tokens: int,
        policy: Policy,
        accountant: EnergyAccountant | None = None,
        on_round: Callable[[Telemetry], None] | None = None,
    ) -> GenerationResult:
        """One generation. `accountant` measures energy (default: none, NaN); `on_round` gets
        each round's telemetry as it completes (the `--trace` writer)."""
        acct = accountant or EnergyAccountant(NullMeter(), None)
        call = self.stub.Session(timeout=self.deadline_s, wait_for_ready=True)
        try:
            return await self._generate(call, drafter, prompt_ids, max_new_tokens, policy, acct, on_round)
        except grpc.aio.AioRpcError as exc:
            raise EdgeError(exc.code(), exc.details() or "") from exc
        finally:
            call.cancel()  # no-op after a clean close; frees the edge session on any failure

    async def _generate(
        self,
        call: grpc.aio.StreamStreamCall,
        drafter: Drafter,
        prompt_ids: list[int],
        max_new_tokens: int,
        policy: Policy,
        acct: EnergyAccountant,
        on_round: Callable[[Telemetry], None] | None,
    ) -> GenerationResult:
        loop = asyncio.get_running_loop()
        loaded = drafter.loaded
        stats = GenerationStats()
        gen_start = acct.begin(stats)
        t0 = time.perf_counter()
        open_msg = pb.DeviceMessage(
            open=pb.OpenSession(
                protocol_version=PROTOCOL_VERSION,
                tokenizer_fingerprint=loaded.fingerprint,
                drafter_model=loaded.name,
                prefix_ids=prompt_ids,
                sampling=encode_sampling(drafter.params),
                max_new_tokens=max_new_tokens,
            )
        )
        await call.write(open_msg)
        reply = await self._read(call)
        stats.bytes_up += wire_bytes(open_msg.ByteSize())
        stats.bytes_down += wire_bytes(reply.ByteSize())
        opened = reply.opened
        await loop.run_in_executor(self.executor, drafter.start, prompt_ids)
        out: list[int] = []
        eos = set(loaded.eos_token_ids)
        done = False
        while not done and len(out) < max_new_tokens:
            room = opened.context_limit - len(drafter.tokens) - 1
            if room < 0:
                break  # the context is full: stop as the target's own generation would have to
            k = min(policy.block_size(), max_new_tokens - len(out) - 1, room, opened.max_draft_tokens)
            round_start = acct.round_start()
            block = await loop.run_in_executor(self.executor, drafter.draft, max(0, k), stats.rounds)
            up = encode_block(block)
            await call.write(up)
            down = await self._read(call)
            verdict = decode_verdict(down.verdict)
            emitted = await loop.run_in_executor(self.executor, drafter.apply, block, verdict)
            tele = acct.round_end(
                round_start, block, verdict, len(emitted), wire_bytes(up.ByteSize()), wire_bytes(down.ByteSize())
            )
            stats.rounds_log.append(tele)
            stats.bytes_up += tele.bytes_up
            stats.bytes_down += tele.bytes_down
            if on_round is not None:
                on_round(tele)
            policy.observe(block.k, verdict.n_accepted)
            stats.rounds += 1
            stats.drafted += block.k
            stats.accepted += verdict.n_accepted
            stats.draft_s += block.draft_s
            stats.edge_compute_ms += verdict.compute_ms
            stats.edge_queue_ms += verdict.queue_ms
            stats.block_sizes.append(block.k)
            for tok in emitted:
                out.append(tok)
                if tok in eos or len(out) >= max_new_tokens:
                    done = True
                    break
        close_msg = pb.DeviceMessage(close=pb.CloseSession())
        await call.write(close_msg)
        await call.done_writing()
        stats.bytes_up += wire_bytes(close_msg.ByteSize())
        acct.end(stats, gen_start)
        return GenerationResult(
            prompt_ids=list(prompt_ids),
            token_ids=out,
            elapsed_s=time.perf_counter() - t0,
            stats=stats,
            target_model=opened.target_model,
        )

    async def _read(self, call: grpc.aio.StreamStreamCall) -> pb.EdgeMessage:
        msg = await asyncio.wait_for(call.read(), timeout=self.verdict_timeout_s)
        if msg is grpc.aio.EOF:
            status = await call.code()
            raise EdgeError(status, (await call.details()) or "stream ended early")
        return msg  # type: ignore[return-value]
