"""The fault phases of `gelato.benchmarks.load`: sessions killed mid-round, SIGTERM, silent clients.

Contract: `kills_phase` kills sessions against a running edge (`kill_storm`: in-process streams
cancelled, or their connections closed, at each point of `KILL_MODES`; `kill_devices`: real
`gelato-device` processes SIGKILLed while generating) while the `WITNESSES` run again and again;
every witness run must equal its solo run, and afterwards the edge must be idle and SERVING.
`sigterm_phase` SIGTERMs an edge with `SIGTERM_KINDS` sessions open: every stream must end OK or
UNAVAILABLE with a message within the grace period (`EDGE_GRACE_S`), a device arriving then must
be refused UNAVAILABLE, and the edge must exit 0 within the grace period plus `EXIT_SLACK_S`.
`stall_phase` runs silent clients (`STALLS`) and one that stops reading the edge's answers
(`unread_session`) next to a slow but live session against an edge with an idle timeout: the
silent ones must end DEADLINE_EXCEEDED after that much silence, the unread one's session must be
freed while it still reads nothing, the live one must end OK with its solo verdicts. Each phase
returns a dict whose `failures` is empty when it passed, with what `gelato.benchmarks.load`'s
report reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import grpc

from gelato.benchmarks.load_driver import (
    CALL_TIMEOUT_S,
    MAX_NEW_TOKENS,
    Gate,
    Monitor,
    Outcome,
    Verdicts,
    channel,
    drive,
    drive_rounds,
    info,
    is_idle,
    rss_mib,
    serving,
    wait_idle,
)
from gelato.benchmarks.load_streams import Make, Spec, make_block, open_message
from gelato.benchmarks.procs import Edge, child_env
from gelato.channel import CLIENT_OPTIONS
from gelato.types import SamplingParams
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from gelato.wire import encode_block

EDGE_GRACE_S = 5.0  # `gelato-edge` stops with `server.stop(5.0)` on SIGTERM (edge/cli.py)
# After the grace period the interpreter's teardown (torch, transformers) takes 0.6-0.9 s here,
# idle or not; more than this past the grace period is a hang.
EXIT_SLACK_S = 3.0


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
        tokens = await drive_rounds(call, spec, vocab, Outcome())
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


async def witness_loop(
    address: str, fp: str, vocab: int, spec: Spec, want: Verdicts, stop: asyncio.Event, make: Make = make_block
) -> list:
    """A well-formed session (blocks by `make`) run again and again until `stop` (once at least):
    whether each run ended OK with exactly `want`."""
    runs: list[bool] = []
    async with channel(address) as ch:
        while not (runs and stop.is_set()):
            out = await drive(ch, fp, vocab, spec, make=make)
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
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=child_env())
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
    address: str,
    pid: int,
    fp: str,
    vocab: int,
    n: int,
    devices: int,
    drafter: str,
    witnesses: list,
    make: Make = make_block,
) -> dict:
    """`n - devices` in-process kills, then `devices` device-process kills, while every
    `(spec, solo verdicts)` of `witnesses` (blocks by `make`) runs again and again; then the
    edge's state, its health and each witness once more."""
    t0, stop = time.perf_counter(), asyncio.Event()
    with Monitor(address, pid) as mon:
        loops = [asyncio.ensure_future(witness_loop(address, fp, vocab, s, w, stop, make)) for s, w in witnesses]
        storm = await kill_storm(address, fp, vocab, n - devices)
        with TemporaryDirectory() as tmp:
            procs = await asyncio.to_thread(kill_devices, address, drafter, devices, Path(tmp))
        stop.set()
        runs = [r for runs in await asyncio.gather(*loops) for r in runs]
    state, idle_s = await wait_idle(address)
    async with channel(address) as ch:
        after = [await drive(ch, fp, vocab, s, make=make) for s, _ in witnesses]
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
    # The late device comes once the edge has taken the signal (health NOT_SERVING, as it says at
    # once): on a loaded machine 0.2 s may not be enough, and an open served OK then is no finding.
    deadline = time.perf_counter() + 10.0
    with contextlib.suppress(grpc.aio.AioRpcError):  # gone already: as refusing as it gets
        while await serving(address) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
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


# A stream window this small fills after a few dozen verdicts: HTTP/2 flow control then holds the
# edge's next write until the client reads (gRPC's automatic window growth off, so it stays small).
UNREAD_OPTIONS = [*CLIENT_OPTIONS, ("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
UNREAD_SPEC = Spec((8, 9, 10), 0, 0)


async def stall_phase(
    address: str, pid: int, fp: str, vocab: int, idle_timeout_s: float, live: tuple[Spec, Verdicts]
) -> dict:
    """Silent clients (`STALLS`) and one that stops reading (`unread_session`) next to a live
    session that pauses 0.4 × the idle timeout between rounds: every silent one ends
    DEADLINE_EXCEEDED naming the idle timeout after `idle_timeout_s` (-0.1) to `idle_timeout_s` + 2 s
    of silence, the unread one's session is freed while it still reads nothing and it ends
    DEADLINE_EXCEEDED; the live one ends OK with its solo verdicts; then the edge is idle."""
    chans = [channel(address) for _ in range(len(STALLS) + 1)]
    t0 = time.perf_counter()
    others_done = asyncio.Event()
    unread = asyncio.ensure_future(unread_session(address, fp, idle_timeout_s, others_done))
    silent = [
        drive(ch, fp, vocab, s, stall=True, send_open=o) for ch, (s, o) in zip(chans[:-1], STALLS.values(), strict=True)
    ]
    try:
        *outs, alive = await asyncio.gather(*silent, drive(chans[-1], fp, vocab, live[0], pace_s=0.4 * idle_timeout_s))
    finally:
        others_done.set()
    stopped_reading = await unread
    for ch in chans:
        await ch.close()
    state, idle_s = await wait_idle(address)
    stalled = [_stalled(name, o, idle_timeout_s) for name, o in zip(STALLS, outs, strict=True)]
    failures: list[dict] = [s for s in [*stalled, stopped_reading] if not s["ok"]]
    if alive.code != "OK" or alive.pairs() != live[1]:
        failures.append({"kind": "live", "code": alive.code, "details": alive.details[:200]})
    if not is_idle(state):
        failures.append({"kind": "after", **state})
    return {
        "idle_timeout_s": idle_timeout_s,
        "stalled": stalled,
        "unread": stopped_reading,
        "live": {"code": alive.code, "rounds": len(alive.verdicts), "seconds": alive.seconds},
        "failures": failures,
        "wall_s": round(time.perf_counter() - t0, 3),
        "after": state,
        "seconds_to_idle": idle_s,
        "idle_rss_mib": rss_mib(pid),
    }


async def _generate_unread(call: Any, fp: str) -> None:
    """Open, then ask the edge to generate the whole reservation; read nothing after the open."""
    await call.write(open_message(fp, UNREAD_SPEC, max_new_tokens=MAX_NEW_TOKENS))
    await call.read()  # opened
    await call.write(pb.DeviceMessage(generate=pb.Generate(round=0, max_tokens=MAX_NEW_TOKENS)))


async def unread_session(address: str, fp: str, idle_timeout_s: float, others_done: asyncio.Event) -> dict:
    """A device that opens, asks the edge to generate its whole reservation (`Generate`) and then
    reads nothing, on a small stream window (`UNREAD_OPTIONS`): the edge's writes stall. Once the
    phase's other clients are done and `idle_timeout_s` + 2 s have passed, it reads the edge's state
    (the edge must have freed its session by then), then the stream to its end: the verdicts
    written before the stall and DEADLINE_EXCEEDED naming the cause."""
    async with grpc.aio.insecure_channel(address, options=UNREAD_OPTIONS) as ch:
        call = pb_grpc.GelatoStub(ch).Session(timeout=CALL_TIMEOUT_S)
        await _generate_unread(call, fp)
        stopped = time.perf_counter()
        await others_done.wait()
        await asyncio.sleep(max(0.0, stopped + idle_timeout_s + 2 - time.perf_counter()))
        state, _ = await wait_idle(address, timeout_s=1.0)
        read = 0
        with contextlib.suppress(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                read += 1
        code, details = (await call.code()).name, await call.details() or ""
    # Fewer verdicts than asked for: the generation was cut short, not finished before the stall.
    ok = code == "DEADLINE_EXCEEDED" and "stopped reading" in details and is_idle(state) and read < MAX_NEW_TOKENS
    return {"code": code, "details": details[:200], "verdicts_read": read, "while_unread": state, "ok": ok}


async def gone_while_answered(address: str, fp: str, n: int, deadline_s: float = 0.5) -> list[str]:
    """`n` devices at once that stop reading during `Generate` (`UNREAD_OPTIONS`) and whose own
    call deadline passes first: gRPC cancels each call while the edge's next answer waits to be
    written. Returns each call's status (DEADLINE_EXCEEDED expected); the edge must treat that as
    a device gone, not as its own fault."""

    async def one() -> str:
        async with grpc.aio.insecure_channel(address, options=UNREAD_OPTIONS) as ch:
            call = pb_grpc.GelatoStub(ch).Session(timeout=deadline_s)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await _generate_unread(call, fp)
            return (await call.code()).name

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _stalled(name: str, o: Outcome, idle_timeout_s: float) -> dict:
    """The edge's idle clock starts when it sent its last answer, a little before the client
    received it and its own silence began: hence 0.1 s of slack below."""
    silence_ok = idle_timeout_s - 0.1 <= o.silent_s <= idle_timeout_s + 2
    said = "no open within" if name == "before-open" else "idle"  # silent from the start: never opened
    ok = o.code == "DEADLINE_EXCEEDED" and said in o.details and silence_ok
    return {"kind": name, "code": o.code, "details": o.details[:200], "silent_s": o.silent_s, "ok": ok}
