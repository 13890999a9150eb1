"""Reliability under load and faults, against real `gelato-edge` processes on loopback (issue 15,
item 8 b and c).

Contract: `python -m gelato.benchmarks.load [--sessions 64] [--waves 2] [--kills 200] [--device-kills 3]
[--fuzz-cases 320] [--target M] [--drafter M] [--out PATH]` runs these phases on CPU (float32,
each edge on one torch thread) and exits 1 if any check failed (0 otherwise); with `--out` it
writes PATH.json and PATH.md, with the command and `gelato.benchmarks.procs.machine()`.
- load: `--waves` waves of `--sessions` well-formed sessions, all open at once (greedy with draft
  lengths 0..8; every 8th one sampling with a fixed seed), one connection each. Every session's
  verdicts must equal its solo run (`reference`: the same blocks verified by an in-process
  `gelato.edge.verifier.TargetSession`); after each wave the edge must hold no session and no KV
  (`Info`, polled up to `IDLE_WAIT_S`), and its idle RSS after the last wave must be within
  `RSS_TOLERANCE_MIB` of the one after the first (with `FIXED_MALLOC`; the same waves against an
  edge with glibc's default allocator are recorded against a tolerance that includes the pool).
- fuzz: the protocol fuzzer's cases (`tests/reliability/test_fuzz.py`, same seed) and
  `bad_sampling_cases`, each with its precise status; void fuzzer cases are counted apart.
- kills: `--kills` sessions killed mid-round: in-process grpc.aio streams cancelled (or their
  whole connection closed) at every point of a session (`KILL_MODES`), and `--device-kills` real
  `gelato-device` processes SIGKILLed while generating, while the `WITNESSES` (greedy and
  sampling) run again and again; every witness run equals its solo run, before and after, and
  then sessions and KV are back to zero and the edge is still SERVING.
- sigterm: an edge SIGTERMed with finishing, slowly generating and silent sessions: every stream
  ends OK (done within the grace period) or UNAVAILABLE with a message, a device arriving then is
  refused UNAVAILABLE, nothing hangs, and the edge exits 0 within its grace period (`EDGE_GRACE_S`,
  edge/cli.py) plus the interpreter's teardown (`EXIT_SLACK_S`).
- stall: an edge with `--idle-timeout-s 1`: clients that go silent (before open, after open,
  mid-generation) end DEADLINE_EXCEEDED after 1 s of silence while a slow but live session is
  untouched and exact; sessions return to zero.
Each phase records its cases, failures, wall time, the edge's peak and idle RSS (psutil) and
`Info`'s sessions/KV after it. The reliability tests (`tests/reliability/test_load.py`,
`test_faults.py`) run the same functions at a smaller scale. Run it from a checkout: it reuses the
deterministic session driver (`tests/reliability/streams.py`) and the fuzzer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gelato.benchmarks.procs import Edge, machine, start_edge
from gelato.channel import CLIENT_OPTIONS
from gelato.edge.verifier import TargetSession
from gelato.models import LoadedModel, default_model_path, load_model
from gelato.types import EdgeInfo, SamplingParams
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from gelato.wire import WireError, decode_info, decode_sampling, encode_block
from tests.reliability.streams import Spec, make_block, open_message

CALL_TIMEOUT_S = 60.0  # every stream's deadline: nothing here may hang longer
IDLE_WAIT_S = 10.0  # how long the edge may take to free everything after a phase
EDGE_GRACE_S = 5.0  # `gelato-edge` stops with `server.stop(5.0)` on SIGTERM (edge/cli.py)
# After the grace period the interpreter's teardown (torch, transformers) takes 0.6-0.9 s here,
# idle or not; more than this past the grace period is a hang.
EXIT_SLACK_S = 3.0
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


# --- well-formed sessions -------------------------------------------------------------------------


def load_specs(n: int, vocab: int, seed: int = 0) -> list[Spec]:
    """`n` sessions: greedy with draft lengths 0..8 in turn, every 8th one sampling with its own
    fixed seed. Temperatures and top_p are exact in float32, so the wire carries the very values
    the in-process reference uses."""
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        prefix = tuple(rng.randrange(1, vocab) for _ in range(rng.randint(1, 40)))
        rounds = rng.randint(3, 10)
        if i % 8 == 7:
            temperature, top_p, top_k = (
                rng.choice([0.5, 0.75, 1.0, 1.25]),
                rng.choice([1.0, 0.875]),
                rng.choice([0, 40]),
            )
            specs.append(Spec(prefix, rng.randint(0, 4), rounds, SamplingParams(temperature, top_p, top_k, 100 + i)))
        else:
            specs.append(Spec(prefix, i % 9, rounds))
    return specs


def reference(target: LoadedModel, spec: Spec) -> Verdicts:
    """The session's solo run: the same blocks verified by an in-process `TargetSession` on a
    private KV pool, no batching, no gRPC."""
    s = TargetSession("solo", target, spec.params, list(spec.prefix))
    s.prefill()
    out = [s.verify(make_block(spec, s.seq.tokens, s.rounds, target.vocab_size)) for _ in range(spec.rounds)]
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
            await asyncio.wait_for(self.event.wait(), self.timeout_s)


class _Ended(Exception):
    """The edge ended the stream (its status tells how)."""


async def _read(call: Any) -> pb.EdgeMessage:
    msg = await call.read()
    if msg is grpc.aio.EOF:
        raise _Ended
    return msg  # type: ignore[no-any-return]


async def _rounds(call: Any, spec: Spec, vocab: int, out: Outcome, pace_s: float = 0.0) -> list[int]:
    """`spec.rounds` rounds on an opened stream; the session's tokens after them."""
    tokens = list(spec.prefix)
    for rnd in range(spec.rounds):
        if pace_s:
            await asyncio.sleep(pace_s)
        block = make_block(spec, tokens, rnd, vocab)
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
) -> Outcome:
    """One session: open, `spec.rounds` rounds (each after `pace_s`), close. `stall`: go silent
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
            await _rounds(call, spec, vocab, out, pace_s)
        last = time.perf_counter()
        if not stall:
            await call.write(CLOSE)
            await call.done_writing()
        while await call.read() is not grpc.aio.EOF:  # a stalled stream waits here for its end
            pass
    except (_Ended, grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
        pass  # the stream ended: its status says how
    return await _finish(call, out, t0, last)


# --- load -------------------------------------------------------------------------------------------


async def load_wave(address: str, pid: int, fp: str, vocab: int, specs: list[Spec], want: list[Verdicts]) -> dict:
    """All `specs` at once, one channel (connection) per session, as separate devices would."""
    chans = [channel(address) for _ in specs]
    gate = Gate(len(specs))
    t0 = time.perf_counter()
    with Monitor(address, pid) as mon:
        outs = await asyncio.gather(*(drive(ch, fp, vocab, s, gate) for ch, s in zip(chans, specs, strict=True)))
    wall = time.perf_counter() - t0
    for ch in chans:
        await ch.close()
    state, idle_s = await wait_idle(address)
    failures = [
        {"session": i, "k": s.k, "greedy": s.params.greedy, "code": o.code, "details": o.details[:200]}
        for i, (s, o, w) in enumerate(zip(specs, outs, want, strict=True))
        if o.code != "OK" or o.pairs() != w
    ]
    return {
        "sessions": len(specs),
        "sampling_sessions": sum(not s.params.greedy for s in specs),
        "rounds": sum(len(o.verdicts) for o in outs),
        "accepted": sum(v[0] for o in outs for v in o.verdicts),
        "failures": failures,
        "wall_s": round(wall, 3),
        "peak_active_sessions": mon.peak["active_sessions"],
        "peak_kv_pool_bytes": mon.peak["kv_pool_bytes"],
        "max_batch_rows": max((v[2] for o in outs for v in o.verdicts), default=0),
        "peak_rss_mib": mon.peak["rss_mib"],
        "after": state,
        "seconds_to_idle": idle_s,
        "idle_rss_mib": rss_mib(pid),
    }


# --- kills ------------------------------------------------------------------------------------------

KILL_MODES = ("open", "opened", "mid-round", "after-verdicts", "generate", "channel-close")


async def kill_one(address: str, shared: grpc.aio.Channel, fp: str, vocab: int, spec: Spec, mode: str) -> None:
    """One session killed at the point `mode` names: right after sending open (the prefill may be
    running), once opened, with a draft block in flight (queued or in the forward), after some
    verdicts, while the edge streams tokens for a Generate request (`ar-edge`), or by closing its
    whole connection with a block in flight (a device that vanished)."""
    own = channel(address) if mode == "channel-close" else None
    call = pb_grpc.GelatoStub(own or shared).Session(timeout=CALL_TIMEOUT_S)
    await call.write(open_message(fp, spec, max_new_tokens=MAX_NEW_TOKENS))
    if mode != "open":
        await call.read()
        tokens = await _rounds(call, spec, vocab, Outcome())
    if mode in ("mid-round", "channel-close"):
        await call.write(encode_block(make_block(spec, tokens, spec.rounds, vocab)))
        await asyncio.sleep(random.random() * 0.004)  # land anywhere in the queue / the forward
    if mode == "generate":
        await call.write(pb.DeviceMessage(generate=pb.Generate(round=spec.rounds, max_tokens=MAX_NEW_TOKENS)))
        await call.read()  # the first streamed token; more are on their way
    if own is not None:
        await own.close(grace=None)  # cancels every call on it and drops the connection
    else:
        call.cancel()


async def witness_loop(address: str, fp: str, vocab: int, spec: Spec, want: Verdicts, stop: asyncio.Event) -> list:
    """A well-formed session run again and again until `stop` (once at least): whether each run
    ended OK with exactly `want`."""
    runs: list[bool] = []
    async with channel(address) as ch:
        while not (runs and stop.is_set()):
            out = await drive(ch, fp, vocab, spec)
            runs.append(out.code == "OK" and out.pairs() == want)
            await asyncio.sleep(0.05)  # leave the 2-core machine to the faults too
    return runs


async def kill_storm(address: str, fp: str, vocab: int, n: int, seed: int = 0, concurrency: int = 32) -> dict:
    """`n` sessions killed (`kill_one`, modes in turn), `concurrency` at a time; every 10th has a
    200-450 token prompt, so that some are killed during their prefill."""
    rng = random.Random(seed)
    lengths = [rng.randint(200, 450) if i % 10 == 9 else rng.randint(1, 30) for i in range(n)]  # long prefills too
    jobs = [(Spec(tuple(rng.randrange(1, vocab) for _ in range(length)), rng.randint(0, 8), rng.randint(0, 3)),
             KILL_MODES[i % len(KILL_MODES)]) for i, length in enumerate(lengths)]  # fmt: skip
    errors: list[str] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(shared: grpc.aio.Channel, spec: Spec, mode: str) -> None:
        async with sem:
            try:
                await kill_one(address, shared, fp, vocab, spec, mode)
            except Exception as exc:  # anything but the planned kill: the edge refused or failed
                errors.append(f"{mode}: {type(exc).__name__}: {str(exc)[:200]}")

    async with channel(address) as shared:
        await asyncio.gather(*(one(shared, spec, mode) for spec, mode in jobs))
    return {"in_process": n, "by_mode": dict(Counter(mode for _, mode in jobs)), "errors": errors}


@dataclass
class _Device:
    proc: subprocess.Popen
    trace: Path
    delay_s: float  # from its first trace lines to the kill
    seen_at: float = 0.0
    rounds: int = 0
    killed: bool = False


def _start_device(address: str, drafter: str, i: int, workdir: Path, delay_s: float) -> _Device:
    trace = workdir / f"device{i}.jsonl"
    cmd = [sys.executable, "-m", "gelato.device.cli", "--threads", "1", "--drafter", drafter, "--edge", address]
    cmd += ["--policy", f"fixed-{1 + i % 4}", "--max-new-tokens", "400", "--no-chat-template", "--trace", str(trace)]
    for j in range(8):  # prompts enough to keep it generating for seconds
        cmd += ["--prompt", f"Ava has {3 + i + j} apples and buys {7 + i} more. How many apples does she have?"]
    with open(workdir / f"device{i}.err", "w") as err:  # a file, not a pipe nobody reads
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    return _Device(proc, trace, delay_s)


def _poll(d: _Device) -> None:
    """SIGKILL `d` once `delay_s` passed since its trace first showed rounds (the trace is block
    buffered: rounds appear in chunks, so the delay is what spreads the kill points)."""
    d.rounds = len(d.trace.read_text().splitlines()) if d.trace.exists() else 0
    now = time.monotonic()
    if d.rounds and not d.seen_at:
        d.seen_at = now
    if d.seen_at and now - d.seen_at >= d.delay_s and d.proc.poll() is None and not d.killed:
        d.proc.send_signal(signal.SIGKILL)
        d.killed = True


def kill_devices(address: str, drafter: str, n: int, workdir: Path, seed: int = 0, timeout_s: float = 120) -> list:
    """`n` real `gelato-device` processes generating at once, each SIGKILLed at a random moment
    (0-0.5 s) after its first rounds: the edge sees connections vanish mid-generation."""
    rng = random.Random(seed)
    devices = [_start_device(address, drafter, i, workdir, rng.uniform(0, 0.5)) for i in range(n)]
    deadline = time.monotonic() + timeout_s
    while any(d.proc.poll() is None for d in devices) and time.monotonic() < deadline:
        for d in devices:
            _poll(d)
        time.sleep(0.005)
    for d in devices:
        d.proc.kill()  # no-op unless it timed out
        d.proc.wait()
    return [
        {"killed_while_generating": d.killed and d.proc.returncode == -signal.SIGKILL, "delay_s": round(d.delay_s, 3),
         "trace_rounds_at_kill": d.rounds, "exit": d.proc.returncode,
         "stderr": (workdir / f"device{i}.err").read_text()[-300:]}
        for i, d in enumerate(devices)
    ]  # fmt: skip


WITNESSES = [  # well-formed sessions run during and after faults: greedy and sampling, short and long blocks
    Spec(tuple(range(11, 19)), 4, 12),
    Spec((7, 3, 9), 0, 10),
    Spec(tuple(range(40, 70)), 8, 6),
    Spec((12, 13, 14, 15), 3, 8, SamplingParams(1.0, top_k=40, seed=5)),
]


async def kills_phase(
    address: str, pid: int, fp: str, vocab: int, n: int, devices: int, drafter: str, witnesses: list
) -> dict:
    """`n - devices` in-process kills, then `devices` device-process kills, while every
    `(spec, solo verdicts)` of `witnesses` runs again and again; then the edge's state, its health
    and each witness once more."""
    t0, stop = time.perf_counter(), asyncio.Event()
    with Monitor(address, pid) as mon:
        loops = [asyncio.ensure_future(witness_loop(address, fp, vocab, s, w, stop)) for s, w in witnesses]
        storm = await kill_storm(address, fp, vocab, n - devices)
        with TemporaryDirectory() as tmp:
            procs = await asyncio.to_thread(kill_devices, address, drafter, devices, Path(tmp))
        stop.set()
        runs = [r for runs in await asyncio.gather(*loops) for r in runs]
    state, idle_s = await wait_idle(address)
    async with channel(address) as ch:
        after = [await drive(ch, fp, vocab, s) for s, _ in witnesses]
    failures = [*storm["errors"], *(f"device {i} not killed mid-generation: {p}" for i, p in enumerate(procs)
                                    if not p["killed_while_generating"])]  # fmt: skip
    if runs.count(False):
        failures.append(f"witnesses: {runs.count(False)} of {len(runs)} runs differ from their solo runs")
    failures += [f"witness {i} after the kills: {o.code} {o.details[:200]}"
                 for i, (o, (_, want)) in enumerate(zip(after, witnesses, strict=True))
                 if o.code != "OK" or o.pairs() != want]  # fmt: skip
    return {
        **storm,
        "killed": storm["in_process"] + sum(p["killed_while_generating"] for p in procs),
        "device_processes": procs,
        "witness_runs": len(runs),
        "witness_mismatches": runs.count(False),
        "failures": failures,
        "wall_s": round(time.perf_counter() - t0, 3),
        "after": state,
        "seconds_to_idle": idle_s,
        "serving": await serving(address),
        "peak_active_sessions": mon.peak["active_sessions"],
        "peak_rss_mib": mon.peak["rss_mib"],
        "idle_rss_mib": rss_mib(pid),
    }


# --- SIGTERM and stalls -----------------------------------------------------------------------------

SIGTERM_KINDS = {  # name -> (spec, pace between rounds, stall after the rounds)
    "quick": (Spec((5, 6, 7), 2, 8), 0.1, False),  # done well within the grace period
    "paced": (Spec((8, 9), 1, 70), 0.1, False),  # would take 7 s: cut by the grace period
    "stalled": (Spec((3, 4), 0, 0), 0.0, True),  # opened, then silent
}


def _ends(names: list[str], outs: list[Outcome], t0: float) -> list[dict]:
    return [
        {"kind": nm, "code": o.code, "details": o.details[:200], "rounds": len(o.verdicts),
         "ended_after_s": round(o.ended_at - t0, 3)}
        for nm, o in zip(names, outs, strict=True)
    ]  # fmt: skip


async def sigterm_phase(edge: Edge, fp: str, vocab: int, per_kind: int = 2, grace_s: float = EDGE_GRACE_S) -> dict:
    """SIGTERM while `per_kind` sessions of each `SIGTERM_KINDS` kind are open, then a device
    arriving during shutdown. Every stream must end OK or UNAVAILABLE with a message, within the
    grace period (+ slack), and the edge must exit 0."""
    pid, address = edge.proc.pid, edge.address
    names, started = [name for name in SIGTERM_KINDS for _ in range(per_kind)], time.perf_counter()
    chans = [channel(address) for _ in names]
    gate = Gate(len(names) + 1)
    tasks = []
    for name, ch in zip(names, chans, strict=True):
        spec, pace, stall = SIGTERM_KINDS[name]
        tasks.append(asyncio.ensure_future(drive(ch, fp, vocab, spec, gate, pace_s=pace, stall=stall)))
    await gate.wait()  # all open
    await asyncio.sleep(0.3)  # quick and paced sessions mid-generation
    active, rss = (await info(address)).active_sessions, rss_mib(pid)
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGTERM)
    await asyncio.sleep(0.2)
    async with channel(address) as ch:
        late = await drive(ch, fp, vocab, Spec((5,), 0, 1))
    outs = await asyncio.wait_for(asyncio.gather(*tasks), grace_s + 30)  # bounded: a hang fails here
    exit_code = await asyncio.to_thread(edge.proc.wait, grace_s + 30)
    exit_s = round(time.perf_counter() - t0, 3)
    for ch in chans:
        await ch.close()
    ends = _ends(names, outs, t0)
    failures = [e for e in ends if e["code"] not in ("OK", "UNAVAILABLE") or (e["code"] != "OK" and not e["details"])]
    failures += [e for e in ends if e["ended_after_s"] > grace_s + 1.0]
    if late.code != "UNAVAILABLE":
        failures.append({"kind": "late", "code": late.code, "details": late.details[:200]})
    if exit_code != 0 or exit_s > grace_s + EXIT_SLACK_S:
        failures.append({"kind": "edge", "exit_code": exit_code, "exit_s": exit_s})
    return {
        "sessions": len(names),
        "active_at_sigterm": active,
        "grace_s": grace_s,
        "streams": ends,
        "late_open": {"code": late.code, "details": late.details[:200]},
        "edge_exit_code": exit_code,
        "edge_exit_after_s": exit_s,
        "last_stream_end_after_s": max(e["ended_after_s"] for e in ends),
        "peak_rss_mib": rss,  # at the signal
        "failures": failures,
        "wall_s": round(time.perf_counter() - started, 3),
    }


STALLS = {  # name -> (spec, whether it sends its open)
    "before-open": (Spec((3,), 0, 0), False),  # a stream that never says anything
    "after-open": (Spec((3, 4, 5), 0, 0), True),
    "mid-generation": (Spec((6, 7), 3, 2), True),
}


async def stall_phase(
    address: str, pid: int, fp: str, vocab: int, idle_timeout_s: float, live: tuple[Spec, Verdicts]
) -> dict:
    """Silent clients (`STALLS`) next to a live session that pauses 0.4 × the idle timeout
    between rounds: every silent one ends DEADLINE_EXCEEDED naming the idle timeout after
    `idle_timeout_s` (-0.1) to `idle_timeout_s` + 2 s of silence; the live one ends OK with its solo
    verdicts; then the edge is idle."""
    chans = [channel(address) for _ in range(len(STALLS) + 1)]
    t0 = time.perf_counter()
    silent = [
        drive(ch, fp, vocab, s, stall=True, send_open=o) for ch, (s, o) in zip(chans[:-1], STALLS.values(), strict=True)
    ]
    *outs, alive = await asyncio.gather(*silent, drive(chans[-1], fp, vocab, live[0], pace_s=0.4 * idle_timeout_s))
    for ch in chans:
        await ch.close()
    state, idle_s = await wait_idle(address)
    stalled = [_stalled(name, o, idle_timeout_s) for name, o in zip(STALLS, outs, strict=True)]
    failures: list[dict] = [s for s in stalled if not s["ok"]]
    if alive.code != "OK" or alive.pairs() != live[1]:
        failures.append({"kind": "live", "code": alive.code, "details": alive.details[:200]})
    if not is_idle(state):
        failures.append({"kind": "after", **state})
    return {
        "idle_timeout_s": idle_timeout_s,
        "stalled": stalled,
        "live": {"code": alive.code, "rounds": len(alive.verdicts), "seconds": alive.seconds},
        "failures": failures,
        "wall_s": round(time.perf_counter() - t0, 3),
        "after": state,
        "seconds_to_idle": idle_s,
        "idle_rss_mib": rss_mib(pid),
    }


def _stalled(name: str, o: Outcome, idle_timeout_s: float) -> dict:
    """The edge's idle clock starts when it sent its last answer, a little before the client
    received it and its own silence began: hence 0.1 s of slack below."""
    silence_ok = idle_timeout_s - 0.1 <= o.silent_s <= idle_timeout_s + 2
    ok = o.code == "DEADLINE_EXCEEDED" and "idle" in o.details and silence_ok
    return {"kind": name, "code": o.code, "details": o.details[:200], "silent_s": o.silent_s, "ok": ok}


# --- the benchmark ----------------------------------------------------------------------------------

# The edge's RSS is checked with glibc's mmap threshold fixed (`FIXED_MALLOC`): blocks over 64 KiB
# (the KV pool's per-layer tensors) are then mapped and unmapped, so freed KV leaves RSS at once.
# With glibc's default (a threshold that rises to the largest block freed), up to one pool's
# worth of freed memory may stay in the heap or not, wave by wave: idle RSS then moves by up to
# the peak pool size without any trend (measured: 412-424 MiB over 15 waves of the test pair,
# 8 MiB pool), so that run is checked against the peak pool + RSS_TOLERANCE_MIB instead.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# Idle RSS after the last wave minus after the first: the spread measured over 12 waves with the
# fixed threshold was 2.7 MiB (410-412 MiB); a leak of one KV pool (8 MiB for 64 test sessions),
# or of ~64 KiB per session, passes 4 MiB.
RSS_TOLERANCE_MIB = 4.0


async def load_phase(
    address: str, pid: int, target: LoadedModel, sessions: int, waves: int, fixed_malloc: bool = True
) -> dict:
    """`waves` load waves of the same `sessions` sessions. The first wave warms the allocators
    (the KV pool's first 64-slot shape, gRPC's per-connection buffers, glibc arenas of the model
    and event-loop threads): the RSS check compares the idle RSS after the last wave with the one
    after the first, within `RSS_TOLERANCE_MIB` (+ the peak pool without `fixed_malloc`)."""
    vocab, fp = target.vocab_size, target.fingerprint
    specs = load_specs(sessions, vocab)
    want = [reference(target, s) for s in specs]
    idle0 = rss_mib(pid)
    results = [await load_wave(address, pid, fp, vocab, specs, want) for _ in range(waves)]
    growth = round(results[-1]["idle_rss_mib"] - results[0]["idle_rss_mib"], 1)
    pool_mib = max(r["peak_kv_pool_bytes"] for r in results) / 2**20
    tolerance = round(RSS_TOLERANCE_MIB + (0 if fixed_malloc else pool_mib), 1)
    failures = [f for r in results for f in r["failures"]]
    failures += [{"wave": i, **r["after"]} for i, r in enumerate(results) if not is_idle(r["after"])]
    if growth > tolerance:
        failures.append({"rss_growth_mib": growth, "tolerance_mib": tolerance})
    return {
        "waves": results,
        "malloc": FIXED_MALLOC if fixed_malloc else "glibc default",
        "idle_rss_mib_before": idle0,
        "rss_growth_after_first_wave_mib": growth,
        "rss_tolerance_mib": tolerance,
        "failures": failures,
    }


BAD_TEMPERATURES = [float("nan"), float("inf"), float("-inf"), -1.0, 1e-38, 1e-45, 5e-5]
BAD_TOP_P = [float("nan"), float("inf"), float("-inf"), -0.1, 1.001, 2.0, 1e30]


def bad_sampling_cases(fp: str) -> list[tuple[str, list[bytes], set[grpc.StatusCode]]]:
    """The fuzzer's bad temperatures and top_p values, each really sent in an OpenSession (the
    fuzzer's own `open.temperature`/`open.top_p` cases send a valid one: see `void_case`)."""
    spec, draft = Spec((5, 6), 1, 0), pb.DeviceMessage(draft=pb.DraftBlock(round=0, ids=[3]))
    sampling = [pb.SamplingParams(temperature=t) for t in BAD_TEMPERATURES]
    sampling += [pb.SamplingParams(temperature=1.0, top_p=p) for p in BAD_TOP_P]
    return [
        (f"sampling.{m.temperature!r}/{m.top_p!r}", [open_message(fp, spec, sampling=m).SerializeToString(),
         draft.SerializeToString()], {grpc.StatusCode.INVALID_ARGUMENT})
        for m in sampling
    ]  # fmt: skip


def void_case(name: str, messages: list[bytes]) -> bool:
    """A fuzzer case about bad sampling parameters whose OpenSession carries valid ones.
    (`Fuzzer.open(sampling=<SamplingParams>)` binds the message to its `sampling: bool`
    parameter, so every such case opens temperature 0.8, top_p off: tests/reliability/test_fuzz.py.)"""
    if name not in ("open.temperature", "open.top_p"):
        return False
    try:
        decode_sampling(pb.DeviceMessage.FromString(messages[0]).open.sampling)
    except WireError:
        return False
    return True


def fuzz_phase(address: str, pid: int, n_cases: int) -> dict:
    """The protocol fuzzer of `tests/reliability/test_fuzz.py` (same seed) with `n_cases` cases,
    plus `bad_sampling_cases`; its void cases are counted apart, never as the edge's failures."""
    from tests.reliability.test_fuzz import SEED, Fuzzer, run_case

    t0 = time.perf_counter()
    with grpc.insecure_channel(address) as ch:
        resp = decode_info(pb_grpc.GelatoStub(ch).Info(pb.InfoRequest(), timeout=10))
        fp = resp.tokenizer_fingerprint
        fuzzer = Fuzzer(random.Random(SEED), fp, resp.vocab_size, resp.context_limit, resp.max_draft_tokens)
        cases = [*fuzzer.generate(n_cases), *bad_sampling_cases(fp)]
        wrong, void = [], []
        for name, messages, allowed in cases:
            code, details = run_case(ch, messages)
            if void_case(name, messages):
                void.append({"case": name, "code": code.name, "details": details[:200]})
            elif code not in allowed or code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                wrong.append({"case": name, "code": code.name, "details": details[:200]})
    state, idle_s = asyncio.run(wait_idle(address))
    return {
        "cases": len(cases),
        "void_fuzzer_cases": void,
        "failures": wrong + ([] if is_idle(state) else [{"after": state}]),
        "wall_s": round(time.perf_counter() - t0, 3),
        "after": state,
        "seconds_to_idle": idle_s,
        "idle_rss_mib": rss_mib(pid),
    }


def edge_args(target: str, *extra: str) -> list[str]:
    return ["--target", target, "--threads", "1", "--dtype", "float32", "--device", "cpu", *extra]


def with_edge(args: list[str], run: Callable[[Edge], Coroutine[Any, Any, dict]], env: dict | None = None) -> dict:
    """Start an edge (with `env` added to its environment), run one phase against it, then stop
    it and record how long stopping took (a phase may have stopped it itself)."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        edge = start_edge(args)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
    try:
        out = asyncio.run(run(edge))
    finally:
        t0 = time.perf_counter()
        code = edge.stop()
        if code != 0:
            print(f"gelato-edge exited {code}:\n{edge.output()[-2000:]}", file=sys.stderr)
    return {**out, "edge_stop_s": round(time.perf_counter() - t0, 3)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gelato.benchmarks.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=default_model_path("target"))
    p.add_argument("--drafter", default=default_model_path("drafter"))
    p.add_argument("--sessions", type=int, default=64, help="concurrent sessions per load wave")
    p.add_argument("--waves", type=int, default=2)
    p.add_argument("--kills", type=int, default=200, help="sessions killed mid-round, device processes included")
    p.add_argument("--device-kills", type=int, default=3, help="of them, real gelato-device processes SIGKILLed")
    p.add_argument("--fuzz-cases", type=int, default=320)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    return p.parse_args(argv)


def run_phases(args: argparse.Namespace) -> dict[str, dict]:
    target = load_model(args.target, "target", "float32", "cpu")
    fp, vocab = target.fingerprint, target.vocab_size
    witnesses = [(w, reference(target, w)) for w in WITNESSES]
    live_spec = Spec((21, 22, 23), 2, 6)
    phases: dict[str, dict] = {}

    async def main_edge(edge: Edge) -> dict:
        pid = edge.proc.pid
        phases["start"] = {"idle_rss_mib": rss_mib(pid), **(await wait_idle(edge.address))[0], "failures": []}
        phases["load"] = await load_phase(edge.address, pid, target, args.sessions, args.waves)
        phases["fuzz"] = await asyncio.to_thread(fuzz_phase, edge.address, pid, args.fuzz_cases)
        return await kills_phase(edge.address, pid, fp, vocab, args.kills, args.device_kills, args.drafter, witnesses)

    def default_malloc(edge: Edge) -> Coroutine[Any, Any, dict]:
        return load_phase(edge.address, edge.proc.pid, target, args.sessions, args.waves, fixed_malloc=False)

    sessions = ["--max-sessions", str(max(64, args.sessions))]
    phases["kills"] = with_edge(edge_args(args.target, *sessions), main_edge, FIXED_MALLOC)
    phases["load (glibc default malloc)"] = with_edge(edge_args(args.target, *sessions), default_malloc)
    phases["sigterm"] = with_edge(edge_args(args.target), lambda e: sigterm_phase(e, fp, vocab))
    live = (live_spec, reference(target, live_spec))
    stall_args = edge_args(args.target, "--idle-timeout-s", "1")
    phases["stall"] = with_edge(stall_args, lambda e: stall_phase(e.address, e.proc.pid, fp, vocab, 1.0, live))
    order = ["start", "load", "load (glibc default malloc)", "fuzz", "kills", "sigterm", "stall"]
    return {k: phases[k] for k in order}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    phases = run_phases(args)
    record = {
        "command": "python -m gelato.benchmarks.load " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "target": args.target,
        "drafter": args.drafter,
        "wall_s": round(time.perf_counter() - t0, 1),
        "failures": sum(len(ph["failures"]) for ph in phases.values()),
        "phases": phases,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 1 if record["failures"] else 0


def markdown(r: dict) -> str:
    ph = r["phases"]
    lines = [
        f"# Reliability under load and faults — {r['machine']}",
        "",
        f"Command: `{r['command']}` (wall {r['wall_s']} s, {r['failures']} failures). "
        f"Target `{r['target']}`, drafter `{r['drafter']}`, float32, each edge on one torch thread.",
        "",
        "| phase | cases | failures | wall s | peak RSS MiB | idle RSS MiB | after: sessions / KV in use / pool B |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, case, p in _rows(ph):
        after = p.get("after")
        state = f"{after['active_sessions']} / {after['kv_bytes_in_use']} / {after['kv_pool_bytes']}" if after else ""
        lines.append(
            f"| {name} | {case} | {len(p['failures'])} | {p.get('wall_s', '')} | {p.get('peak_rss_mib', '')} "
            f"| {p.get('idle_rss_mib', '')} | {state} |"
        )
    lines += ["", *_notes(ph)]
    return "\n".join(lines) + "\n"


def _rows(ph: dict) -> list[tuple[str, str, dict]]:
    rows = [("start", "edge up, before any session", ph["start"])]
    for phase in ("load", "load (glibc default malloc)"):
        for i, w in enumerate(ph[phase]["waves"]):
            case = f"{w['sessions']} sessions ({w['sampling_sessions']} sampling), {w['rounds']} rounds"
            rows.append((f"{phase} wave {i + 1}", case, w))
    k = ph["kills"]
    fuzz = ph["fuzz"]
    rows.append(("fuzz", f"{fuzz['cases']} cases ({len(fuzz['void_fuzzer_cases'])} void)", fuzz))
    rows.append(("kills", f"{k['killed']} killed ({len(k['device_processes'])} device processes)", k))
    rows.append(("sigterm", f"{ph['sigterm']['sessions']} sessions + 1 arriving", ph["sigterm"]))
    rows.append(("stall", f"{len(ph['stall']['stalled'])} silent + 1 live", ph["stall"]))
    return rows


def _notes(ph: dict) -> list[str]:
    load, default, k, sig, st = ph["load"], ph["load (glibc default malloc)"], ph["kills"], ph["sigterm"], ph["stall"]
    w, void = load["waves"][0], ph["fuzz"]["void_fuzzer_cases"]
    return [
        f"- Load: all {w['sessions']} sessions open at once (peak Info.active_sessions {w['peak_active_sessions']}), "
        f"batches of up to {w['max_batch_rows']} rows, peak KV pool {w['peak_kv_pool_bytes'] / 2**20:.1f} MiB; "
        "every verdict equal to the solo run. Idle RSS after the last wave minus after the first: "
        f"{load['rss_growth_after_first_wave_mib']} MiB with `{load['malloc']}` (tolerance "
        f"{load['rss_tolerance_mib']} MiB), {default['rss_growth_after_first_wave_mib']} MiB with glibc's default "
        f"(tolerance {default['rss_tolerance_mib']} MiB: the peak pool may stay in the heap).",
        f"- Kills: {k['by_mode']} in-process, concurrently with {k['witness_runs']} runs of {len(WITNESSES)} "
        f"well-formed sessions ({k['witness_mismatches']} differing from their solo runs); device processes SIGKILLed "
        f"{[d['delay_s'] for d in k['device_processes']]} s after their first rounds. Edge idle "
        f"{k['seconds_to_idle']} s after, SERVING: {k['serving']}.",
        f"- Fuzz: {len(void)} of the fuzzer's open.temperature/open.top_p cases are void (they open with valid "
        f"sampling parameters: {dict(Counter(v['code'] for v in void))}); `bad_sampling_cases` sends those values.",
        f"- SIGTERM with {sig['active_at_sigterm']} open sessions: streams ended "
        f"{dict(Counter((e['kind'], e['code']) for e in sig['streams']))}, the last "
        f"{sig['last_stream_end_after_s']} s after the signal; a device arriving then got "
        f"{sig['late_open']['code']}; the edge exited {sig['edge_exit_code']} after {sig['edge_exit_after_s']} s "
        f"(grace period {sig['grace_s']} s; an idle edge takes {st['edge_stop_s']} s to stop).",
        f"- Stall (idle timeout {st['idle_timeout_s']} s): "
        + ", ".join(f"{s['kind']} ended {s['code']} after {s['silent_s']} s of silence" for s in st["stalled"])
        + f"; the live session (pauses of {0.4 * st['idle_timeout_s']:g} s) ended {st['live']['code']}.",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
