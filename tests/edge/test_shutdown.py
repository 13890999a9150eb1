"""Shutdown (`gelato.edge.server`, `EdgeServer.stop`): after the grace period the edge ends every open
Session stream UNAVAILABLE with its own message, at a moment its device waits for the edge. A device
that writes its next block right after its verdict gets that block refused (its write succeeds, the
status comes as the answer); a silent one is ended at the end of the grace period; one that thinks
longer than `SETTLE_S` is ended `SETTLE_S` after its last answer. Never mid-write: there a grpc.aio
client reports INTERNAL "Internal error from Core" instead of the edge's status."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from gelato.benchmarks.load_streams import Spec, make_block, open_message
from gelato.edge.server import EdgeConfig, EdgeServer
from gelato.edge.service import SETTLE_S, SHUTDOWN_DETAILS
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from gelato.wire import encode_block

GRACE_S = 0.6


@dataclass
class Ending:
    code: grpc.StatusCode
    details: str
    verdicts: int
    ended_in: str  # "read": the answer to a block it wrote; "think": while it waited, before writing
    at_s: float  # time.perf_counter() when the device saw the end
    last_answer_s: float  # time.perf_counter() of its last verdict (or of its open)


async def device(
    address: str, fp: str, vocab: int, thinks: list[float] | None, opened: asyncio.Event, go: asyncio.Event
) -> Ending:
    """Open, then (once `go` is set: every device has opened) rounds until the stream ends, round r
    after thinking `thinks[r]` (the last value repeats) with a read pending meanwhile, so an end is
    seen when it comes; None: silent."""
    spec = Spec((5, 6, 7), 0, 1000)
    tokens, rnd, where = list(spec.prefix), 0, ""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.GelatoStub(channel).Session(timeout=30)
        await call.write(open_message(fp, spec, max_new_tokens=400))
        assert (await call.read()).WhichOneof("kind") == "opened"
        opened.set()
        await go.wait()  # every device's timeline starts together, at the test's t0
        last = time.perf_counter()
        read: asyncio.Future = asyncio.ensure_future(asyncio.sleep(0))
        try:
            while True:
                think = None if thinks is None else thinks[min(rnd, len(thinks) - 1)]
                read = asyncio.ensure_future(call.read())
                if think != 0.0:
                    done, _ = await asyncio.wait({read}, timeout=think)
                    if done:
                        where = "think"
                        read.result()
                        break
                block = make_block(spec, tokens, rnd, vocab)
                where = "write"
                await call.write(encode_block(block))
                where = "read"
                reply = await read
                if reply is grpc.aio.EOF:
                    break
                last = time.perf_counter()
                tokens += [*block.ids[: reply.verdict.n_accepted], reply.verdict.next_token]
                rnd += 1
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        at = time.perf_counter()
        read.cancel()
        return Ending(await call.code(), await call.details() or "", rnd, where, at, last)


def test_shutdown_ends_streams_unavailable_while_devices_wait(pair: dict[str, Path]) -> None:
    # silent; lockstep without a pause; thinking 0.03 s; 0.3 s (within SETTLE_S); a first block at
    # once, then thinking far longer than SETTLE_S.
    thinks: list[list[float] | None] = [None, [0.0], [0.03], [0.6 * SETTLE_S], [0.0, 0.5 * GRACE_S, 4 * SETTLE_S]]

    async def scenario() -> tuple[list[Ending], float, EdgeServer]:
        server = EdgeServer(EdgeConfig(port=0))
        port = await server.start()
        loaded = await server.load(str(pair["target"]), "float32", "cpu")
        address = f"127.0.0.1:{port}"
        events, go = [asyncio.Event() for _ in thinks], asyncio.Event()
        tasks = [
            asyncio.ensure_future(device(address, loaded.fingerprint, loaded.vocab_size, t, e, go))
            for t, e in zip(thinks, events, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 30)
        t0 = time.perf_counter()
        go.set()
        await server.stop(GRACE_S)
        stopped_s = time.perf_counter() - t0
        ends = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for end in ends:
            end.at_s -= t0
            end.last_answer_s -= t0
        return ends, stopped_s, server

    ends, stopped_s, server = asyncio.run(scenario())
    silent, eager, quick, medium, slow = ends
    for end in ends:
        assert (end.code, end.details) == (grpc.StatusCode.UNAVAILABLE, SHUTDOWN_DETAILS), end
    # Served through the grace period; ended only after it.
    assert eager.verdicts >= 5 and quick.verdicts >= 3 and medium.verdicts >= 1 and slow.verdicts == 2, ends
    assert all(end.at_s > GRACE_S - 0.02 for end in ends), ends
    # Silent: ended when the grace period ran out (not SETTLE_S later). Upper bounds leave a loaded
    # machine 0.3 s to deliver an end; the wrong endings they tell apart come 0.5 s or more later.
    assert silent.ended_in == "think" and silent.at_s < GRACE_S + 0.3, silent
    # Sending the next block within SETTLE_S of the last answer: that block is refused (the write
    # went through, the status is its answer).
    for end in (eager, quick, medium):
        assert end.ended_in == "read" and end.at_s < GRACE_S + SETTLE_S + 0.3, end
    # Thinking past SETTLE_S after an answer shortly before the deadline: ended SETTLE_S after it.
    assert slow.ended_in == "think" and slow.last_answer_s + SETTLE_S > GRACE_S, slow
    assert -0.02 < slow.at_s - (slow.last_answer_s + SETTLE_S) < 0.3, slow
    assert stopped_s < GRACE_S + SETTLE_S + 0.3, stopped_s
    assert not server.service.streams and len(server.service.registry) == 0


def test_a_prefill_in_pieces_stops_when_the_grace_period_ends(pair: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A long prompt prefilled piece by piece when the grace period runs out: no further piece is
    queued, the device gets the edge's UNAVAILABLE at once (not gRPC's cancellation after the
    backstop, which a device does not fail over on) and the session is released."""
    from gelato.edge.sessions import TargetSession

    pieces: list[float] = []
    real_prefill = TargetSession.prefill

    def slow_prefill(self: TargetSession, max_tokens: int = 0) -> bool:
        pieces.append(time.perf_counter())
        time.sleep(0.05)  # 60 one-token pieces: 3 s, past the grace period and the backstop
        return real_prefill(self, max_tokens)

    monkeypatch.setattr(TargetSession, "prefill", slow_prefill)

    async def scenario() -> tuple[grpc.StatusCode, str, float, EdgeServer]:
        server = EdgeServer(EdgeConfig(port=0, prefill_chunk_tokens=1))
        port = await server.start()
        loaded = await server.load(str(pair["target"]), "float32", "cpu")
        spec = Spec(tuple(range(5, 65)), 0, 1)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.GelatoStub(channel).Session(timeout=30)
            await call.write(open_message(loaded.fingerprint, spec, max_new_tokens=4))
            while not pieces:
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            await server.stop(0.1)
            code, details = await call.code(), await call.details()
        return code, details or "", time.perf_counter() - t0, server

    code, details, ended_s, server = asyncio.run(scenario())
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, SHUTDOWN_DETAILS)
    # Well before the 60 pieces (3 s) would have ended; what tells the fix is the status above.
    assert ended_s < 2.5, ended_s
    assert len(pieces) < 40, len(pieces)  # it stopped queueing pieces
    assert len(server.service.registry) == 0 and not server.service.streams


def test_a_session_released_after_the_stop_leaves_the_pool_alone(target, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A stream whose handler ends after `EdgeServer.stop` shut the model thread down releases its
    session on the event loop: the pool must not be reshaped there (a forward that outlived the
    stop may still run on the model thread); it goes with the server."""
    from gelato.edge.service import GelatoService
    from gelato.types import SamplingParams

    service = GelatoService(EdgeConfig())
    session = service.registry.admit(target, SamplingParams(), [5, 6, 7, 8], 16)
    session.prefill()
    service.executor.shutdown(wait=True)
    touched: list[str] = []
    pool_type = type(session.seq.pool)
    monkeypatch.setattr(pool_type, "apply_target", lambda self: touched.append("apply_target"))
    service.registry.release(session.session_id)
    assert touched == [] and len(service.registry) == 0
