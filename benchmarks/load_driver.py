"""The session driver and the edge's observable state, shared by `gelato.benchmarks.load`'s phases.

Contract: `drive` runs one deterministic session (`gelato.benchmarks.load_streams.Spec`) on a grpc.aio
channel: open, `drive_rounds` (the spec's draft blocks, one verdict each), close; or it goes silent
(before or after its rounds) until the edge ends the stream. It never raises for the stream's
status: the returned `Outcome` carries the verdicts, the final status and the timings. `reference`
is a spec's solo run (the same blocks verified by an in-process `gelato.edge.verifier.TargetSession`),
which a driven session's verdicts must equal; `Gate` holds sessions after their open until all of
them have opened. `info`, `kv_state`, `is_idle`, `wait_idle` (Info polled up to `IDLE_WAIT_S`),
`serving` (the gRPC health check) and `rss_mib` read the edge's state; `Monitor` samples its
sessions, KV pool and RSS while a phase runs and keeps the peaks. Every stream has the deadline
`CALL_TIMEOUT_S`; every session reserves `MAX_NEW_TOKENS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gelato.benchmarks.load_streams import Make, Spec, make_block, open_message
from gelato.channel import CLIENT_OPTIONS
from gelato.deadline import within
from gelato.edge.verifier import TargetSession
from gelato.models import LoadedModel
from gelato.types import EdgeInfo
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from gelato.wire import decode_info, encode_block

CALL_TIMEOUT_S = 60.0  # every stream's deadline: nothing here may hang longer
IDLE_WAIT_S = 10.0  # how long the edge may take to free everything after a phase
MAX_NEW_TOKENS = 128  # per session: reservation = prefix + 128 + one block, far below the context
CLOSE = pb.DeviceMessage(close=pb.CloseSession())
Verdicts = list[tuple[int, int]]


@dataclass
class Outcome:
    """How one driven stream ended: its verdicts (a, next, batch_rows), final status, timings."""

    verdicts: list[tuple[int, int, int]] = field(default_factory=list)
    code: str = "OK"
    details: str = ""
    seconds: float = 0.0  # the whole stream
    silent_s: float = 0.0  # from the client's last message to the stream's end
    ended_at: float = 0.0  # time.perf_counter() when it ended

    def pairs(self) -> Verdicts:
        return [v[:2] for v in self.verdicts]


# --- edge state -----------------------------------------------------------------------------------


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)


async def info(address: str) -> EdgeInfo:
    async with channel(address) as ch:
        return decode_info(await pb_grpc.GelatoStub(ch).Info(pb.InfoRequest(), timeout=10))


def kv_state(resp: EdgeInfo) -> dict[str, int]:
    return {
        "active_sessions": resp.active_sessions,
        "kv_bytes_in_use": resp.kv_bytes_in_use,
        "kv_bytes_reserved": resp.kv_bytes_reserved,
        "kv_pool_bytes": resp.kv_pool_bytes,
    }


def is_idle(state: dict[str, int]) -> bool:
    return not any(state.values())


async def wait_idle(address: str, timeout_s: float = IDLE_WAIT_S) -> tuple[dict[str, int], float]:
    """Poll Info until the edge holds no session and no KV (slots are freed on the model thread,
    so this may lag a stream's end a little); the last state and the seconds it took."""
    t0 = time.perf_counter()
    while True:
        state = kv_state(await info(address))
        if is_idle(state) or time.perf_counter() - t0 > timeout_s:
            return state, round(time.perf_counter() - t0, 3)
        await asyncio.sleep(0.05)


async def serving(address: str) -> bool:
    async with channel(address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def rss_mib(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


class Monitor:
    """Samples the edge's Info and RSS every `period_s` while a phase runs; keeps the peaks."""

    def __init__(self, address: str, pid: int, period_s: float = 0.05) -> None:
        self.address, self.pid, self.period_s = address, pid, period_s
        self.peak: dict[str, float] = {"active_sessions": 0, "kv_pool_bytes": 0, "rss_mib": 0.0}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with channel(self.address) as ch:
            stub = pb_grpc.GelatoStub(ch)
            while True:
                resp = decode_info(await stub.Info(pb.InfoRequest(), timeout=10))
                sample: dict[str, float] = {
                    "active_sessions": resp.active_sessions,
                    "kv_pool_bytes": resp.kv_pool_bytes,
                }
                sample["rss_mib"] = rss_mib(self.pid)
                self.peak = {k: max(v, sample[k]) for k, v in self.peak.items()}
                await asyncio.sleep(self.period_s)

    def __enter__(self) -> Monitor:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


# --- one session ----------------------------------------------------------------------------------


def reference(target: LoadedModel, spec: Spec, make: Make = make_block) -> Verdicts:
    """The session's solo run: the same blocks (`make`) verified by an in-process `TargetSession`
    on a private KV pool, no batching, no gRPC."""
    s = TargetSession("solo", target, spec.params, list(spec.prefix))
    s.prefill()
    out = [s.verify(make(spec, s.seq.tokens, s.rounds, target.vocab_size)) for _ in range(spec.rounds)]
    s.close()
    return out


class Gate:
    """Holds sessions after their open until `n` have opened (or `timeout_s` passed), so that all
    of them are open at once."""

    def __init__(self, n: int, timeout_s: float = 30.0) -> None:
        self.n, self.timeout_s, self.arrived, self.event = n, timeout_s, 0, asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.n:
            self.event.set()
        # A session that never opened must not hold the others forever: the peak count shows it.
        with contextlib.suppress(TimeoutError):
            await within(self.event.wait(), self.timeout_s)


class _Ended(Exception):
    """The edge ended the stream (its status tells how)."""


async def _read(call: Any) -> pb.EdgeMessage:
    msg = await call.read()
    if msg is grpc.aio.EOF:
        raise _Ended
    return msg  # type: ignore[no-any-return]


async def drive_rounds(
    call: Any, spec: Spec, vocab: int, out: Outcome, pace_s: float = 0.0, make: Make = make_block
) -> list[int]:
    """`spec.rounds` rounds (blocks by `make`) on an opened stream; the session's tokens after them."""
    tokens = list(spec.prefix)
    for rnd in range(spec.rounds):
        if pace_s:
            await asyncio.sleep(pace_s)
        block = make(spec, tokens, rnd, vocab)
        await call.write(encode_block(block))
        v = (await _read(call)).verdict
        tokens += [*block.ids[: v.n_accepted], v.next_token]
        out.verdicts.append((v.n_accepted, v.next_token, v.batch_rows))
    return tokens


async def _finish(call: Any, out: Outcome, t0: float, last: float) -> Outcome:
    out.code = (await call.code()).name
    out.details = (await call.details()) or ""
    out.ended_at = now = time.perf_counter()
    out.seconds, out.silent_s = round(now - t0, 3), round(now - last, 3)
    return out


async def drive(
    ch: grpc.aio.Channel,
    fp: str,
    vocab: int,
    spec: Spec,
    gate: Gate | None = None,
    pace_s: float = 0.0,
    stall: bool = False,
    send_open: bool = True,
    make: Make = make_block,
) -> Outcome:
    """One session: open, `spec.rounds` rounds (each after `pace_s`, blocks by `make`), close. `stall`: go silent
    after the rounds instead and wait for the edge to end the stream; without `send_open`, silent
    from the start. Never raises for the stream's status: the Outcome carries it."""
    out, t0 = Outcome(), time.perf_counter()
    last = t0
    call = pb_grpc.GelatoStub(ch).Session(timeout=CALL_TIMEOUT_S)
    try:
        if send_open:
            await call.write(open_message(fp, spec, max_new_tokens=MAX_NEW_TOKENS))
            await _read(call)  # opened
            if gate is not None:
                await gate.wait()
            await drive_rounds(call, spec, vocab, out, pace_s, make)
        last = time.perf_counter()
        if not stall:
            await call.write(CLOSE)
            await call.done_writing()
        while await call.read() is not grpc.aio.EOF:  # a stalled stream waits here for its end
            pass
    except (_Ended, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        pass  # the stream ended: its status says how
    return await _finish(call, out, t0, last)
