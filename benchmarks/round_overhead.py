"""Where a loopback round's time goes, and how far it is from the models' own cost (issue 14, item 6).

Contract: `python -m benchmarks.round_overhead [--n 10] [--max-new-tokens 128] [--k 4] [--repeats 1]
[--prompts gsm8k|demo] [--out benchmarks/results/round_overhead_cpu]` runs on the built-in tiny pair
(or `--target/--drafter`), greedy, one torch thread per process; with two or more cores the edge and
the echo server run on one core, this process and the device on another. Per repeat, one after the
other (so that a ratio's two sides see the same machine):

- plain: a real `gelato-edge` and real `gelato-device --policy fixed-0` then `fixed-K` processes,
  nothing instrumented: tokens/s and the round loop's own round time (`--trace` t_round_s); each
  followed by its in-process reference: the target decoding alone (a KV-cached greedy loop, and
  `generate()`) after fixed-0, transformers' assisted generation with the same pair at K (constant
  schedule, no confidence stop) and at its defaults after fixed-K;
- echo: grpc.aio bidi streams in another process with the real channel and server options and the
  edge handler's shape, a block up and a verdict down (`ECHO_VARIANTS`: bare bytes, `wait_for`
  reads, protobuf messages, and protobuf with a model-thread-like pause in the handler); each reply
  carries the handler's own time, so transit = round trip - handler time, as in the rounds;
- raw forwards with the caches the real code uses (drafter: K one-token forwards on a
  `DynamicCache`; target: one forward over K+1 tokens, and over 1, on a `DynamicCache` and through
  the edge's `KVPool`) at the runs' mean context.

Then, once: an edge process running `edge.cli`'s own `main` with timers wrapped around the real
functions of its hot path (message parse, block decode, session checks, the batcher's queue, the
model thread, `pooled_forward`, the model forward, acceptance, verdict encode), and in this process
the real `EdgeClient` round loop with timers around the drafter's forwards, entropy, drafting, verdict
apply, the drafter-thread offload, block encode, stream write/read and verdict decode. Every round
is split into disjoint parts that sum to it: timed calls, and differences between nested timers
(thread hops, gRPC transit, bookkeeping); the transit is also split into its way up and down by the
shared monotonic clock. Means over rounds, without one warm-up generation per policy and without
rounds slower than median + 5 MAD (preempted by another process). Edge CPU per verdict comes from
the edge process's CPU time over each session.

It prints a table and, with `--out`, writes OUT.json and OUT.md: the command, the machine, the load
average, every number, and the overhead outside the model forwards ranked with what could cut each
part. Ratios of tokens/s are medians over repeats of each repeat's ratio. A shared machine drifts:
compare ratios within one run. The instrumentation costs under a microsecond or so per timed call
(measured and reported).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_POLICIES = ("fixed-0", "fixed-4")
ECHO_SERVICE = "gelato.bench.Echo"

# --------------------------------------------------------------------------------------- timers


class Recorder:
    """Durations of named calls, summed per unit (a device round or an edge verdict). A unit is
    opened and closed by hooks on the real code; calls outside any unit are not recorded."""

    def __init__(self) -> None:
        self.units: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None

    def add(self, name: str, seconds: float) -> None:
        unit = self.current
        if unit is not None:
            unit[name] = unit.get(name, 0.0) + seconds
            unit["calls"] = unit.get("calls", 0) + 1

    def mark(self, key: str, t: float, first: bool) -> None:
        """An absolute time (`perf_counter`: CLOCK_MONOTONIC, comparable across processes) in the
        unit: the first or the last one given under `key`."""
        unit = self.current
        if unit is not None and (not first or key not in unit):
            unit[key] = t

    def open(self, t0: float, **tags: Any) -> None:
        self.current = {"at_start": t0, **tags}

    def close(self) -> None:
        unit, self.current = self.current, None
        if unit is not None:
            unit["at_end"] = time.perf_counter()
            unit["total"] = unit["at_end"] - unit["at_start"]
            self.units.append(unit)


def timed(
    rec: Recorder, name: str | Callable[[], str], fn: Callable[..., Any], marks: tuple[str, str] | None = None
) -> Callable[..., Any]:
    """`fn` (sync or async) adding its duration to `rec` under `name` (or `name()` at call time).
    An async `fn` with `marks` also records the unit's first start and last end of it."""
    label: Callable[[], str] = name if callable(name) else (lambda: name)  # type: ignore[assignment,return-value]

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                rec.add(label(), t1 - t0)
                if marks:
                    rec.mark(marks[0], t0, first=True)
                    rec.mark(marks[1], t1, first=False)

        return timed_async

    @functools.wraps(fn)
    def timed_sync(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            rec.add(label(), time.perf_counter() - t0)

    return timed_sync


class Patches:
    """Attributes replaced on modules, classes or objects, put back by `restore`. A missing
    attribute (the real code was renamed) is recorded in `missing` instead of failing."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, bool, Any]] = []
        self.missing: list[str] = []

    def replace(self, owner: Any, attr: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        where = f"{getattr(owner, '__name__', type(owner).__name__)}.{attr}"
        try:
            raw = inspect.getattr_static(owner, attr)
        except AttributeError:
            self.missing.append(where)
            return
        own = attr in vars(owner)
        if isinstance(raw, staticmethod):
            new: Any = staticmethod(make(raw.__func__))
        elif inspect.isclass(owner) or inspect.ismodule(owner):
            new = make(raw)
        else:
            new = make(getattr(owner, attr))  # an instance: wrap the bound method
        self._undo.append((owner, attr, own, raw))
        setattr(owner, attr, new)

    def time(
        self, owner: Any, attr: str, rec: Recorder, name: str | Callable[[], str], marks: tuple[str, str] | None = None
    ) -> None:
        self.replace(owner, attr, lambda fn: timed(rec, name, fn, marks))

    def restore(self) -> None:
        for owner, attr, own, raw in reversed(self._undo):
            if own:
                setattr(owner, attr, raw)
            else:
                delattr(owner, attr)
        self._undo.clear()


def wrapper_cost_us(n: int = 20000) -> float:
    """What one timed call adds (µs): a timed no-op minus a plain one."""
    rec = Recorder()
    rec.open(time.perf_counter())

    def noop() -> None:
        return None

    wrapped = timed(rec, "noop", noop)
    best = []
    for f in (noop, wrapped) * 3:
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best.append((time.perf_counter() - t0) / n)
    return max(0.0, min(best[1::2]) - min(best[0::2])) * 1e6


# --------------------------------------------------------------------------- edge (child process)


def _serve_edge(argv: list[str]) -> int:
    """`--serve-edge STATS -- PYTHON -m edge.cli ARGS...` (the command `benchmarks.procs.start_edge`
    builds, behind this module as its prefix): wrap the edge's hot path, run `edge.cli.main(ARGS)`,
    write what was timed to STATS when it stops (SIGTERM)."""
    stats_path, sep, *cmd = argv
    if sep != "--" or cmd[1:3] != ["-m", "edge.cli"]:
        raise SystemExit(f"--serve-edge: expected STATS -- PYTHON -m edge.cli ARGS, got {argv}")
    import edge.batcher
    import edge.cli
    import edge.server
    from edge.batcher import Batcher
    from edge.kv_pool import KVPool
    from edge.verifier import TargetSession
    from gelato.v1 import gelato_pb2 as pb

    rec, patches = Recorder(), Patches()
    sessions: list[dict[str, Any]] = []
    live: dict[str, Any] = {}
    loop_thread = threading.main_thread()  # asyncio.run in edge.cli's main: the event loop's thread

    def parse(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(cls: Any, data: bytes) -> Any:
            t0 = time.perf_counter()
            msg = fn(cls, data)
            if cls is pb.DeviceMessage:
                kind = msg.WhichOneof("kind")
                if kind == "open":
                    live.clear()
                    live.update(session=len(sessions), verdicts=0)
                    sessions.append(live.copy())
                elif kind == "draft":
                    if not live.get("verdicts"):
                        live.update(cpu0=time.process_time(), wall0=t0)
                    live["verdicts"] = live.get("verdicts", 0) + 1
                    rec.open(t0, session=live.get("session", -1))
                    rec.add("parse", time.perf_counter() - t0)
                elif kind == "close" and live.get("verdicts"):
                    sessions[-1].update(
                        verdicts=live["verdicts"],
                        cpu_s=time.process_time() - live["cpu0"],
                        wall_s=t0 - live["wall0"],
                    )
            return msg

        return wrapper

    def encode_verdict(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            rec.add("encode_verdict", time.perf_counter() - t0)
            rec.close()  # the verdict leaves the handler
            return out

        return wrapper

    def pool_init(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(self: Any, model: Any, *args: Any, **kwargs: Any) -> None:
            fn(self, model, *args, **kwargs)
            if not getattr(model, "_round_overhead_timed", False):  # the model forward, once per model
                model.forward = timed(rec, "model_forward", model.forward)
                model._round_overhead_timed = True

        return wrapper

    def check_name() -> str:
        return "check_loop" if threading.current_thread() is loop_thread else "check_model_thread"

    patches.replace(edge.server, "_parse", parse)
    patches.time(edge.server, "decode_block", rec, "decode_block")
    patches.replace(edge.server, "encode_verdict", encode_verdict)
    patches.time(TargetSession, "check", rec, check_name)
    patches.time(Batcher, "verify", rec, "batcher_verify")
    patches.time(Batcher, "_forward", rec, "model_thread")
    patches.time(edge.batcher, "pooled_forward", rec, "pooled_forward")
    patches.time(TargetSession, "accept", rec, "accept")
    patches.replace(KVPool, "__init__", pool_init)
    try:
        return edge.cli.main(cmd[3:])
    finally:
        Path(stats_path).write_text(
            json.dumps({"units": rec.units, "sessions": sessions, "missing": patches.missing}) + "\n"
        )


# --------------------------------------------------------------------------- echo (child process)


ECHO_WORK_MS = 2.0  # `proto_work`: about a tiny-pair target forward
ECHO_VARIANTS = {
    "bare": "raw bytes, plain reads",
    "wait_for": "raw bytes, every read under `asyncio.wait_for` on both sides (as the edge and the client do)",
    "proto": "protobuf DeviceMessage / EdgeMessage (serialized, parsed) and `wait_for` reads: the real messaging",
    "proto_work": f"as proto, and the handler waits for {ECHO_WORK_MS:g} ms of torch work on a one-thread executor "
    "(as the edge's model thread): both processes go idle in between, as in a real round",
}


def sample_messages(k: int) -> tuple[Any, Any]:
    """A greedy K-draft block and its verdict, as the device and the edge send them."""
    from gelato.types import DraftBlock, Verdict
    from gelato.wire import encode_block, encode_verdict

    up = encode_block(DraftBlock(round=40, ids=tuple(range(1000, 1000 + k))))
    down = encode_verdict(Verdict(round=40, n_accepted=2, next_token=1234, queue_ms=0.1, compute_ms=3.0, batch_rows=1))
    return up, down


def _serve_echo(argv: list[str]) -> int:
    """`--serve-echo K -- ...`: grpc.aio bidi streams answering every message with a K-block's
    verdict, with the edge's server options and its handler's shape (an async generator reading
    `context.read()`), one method per `ECHO_VARIANTS` entry. Every reply carries the handler's own
    time (read returned -> reply yielded; in `compute_ms`, or as the first 8 bytes), so the client
    can tell transit from handling. Prints `listening on HOST:PORT`."""
    import struct
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import torch

    from gelato.channel import SERVER_OPTIONS
    from gelato.v1 import gelato_pb2 as pb

    torch.set_num_threads(1)
    _, down = sample_messages(int(argv[0]))
    pad = b"\x01" * max(0, down.ByteSize() - 8)
    fields = {f.name: v for f, v in down.verdict.ListFields()}
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="work")
    m = torch.ones(32, 32)

    def work(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            torch.mm(m, m)  # releases the GIL, as a model forward does

    def echo(wait: bool, proto: bool, work_s: float = 0.0) -> Callable[..., Any]:
        async def session(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            loop = asyncio.get_running_loop()
            while True:
                data = await (asyncio.wait_for(context.read(), 300.0) if wait else context.read())
                t0 = time.perf_counter()
                if data is grpc.aio.EOF:
                    return
                if proto:
                    pb.DeviceMessage.FromString(data)  # what the edge's handler parses per message
                if work_s:
                    await loop.run_in_executor(worker, work, work_s)
                handler_ms = (time.perf_counter() - t0) * 1e3
                if proto:
                    yield pb.EdgeMessage(verdict=pb.Verdict(**{**fields, "compute_ms": handler_ms}))
                else:
                    yield struct.pack("<d", handler_ms) + pad

        return session

    async def serve() -> int:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        ser = {"response_serializer": pb.EdgeMessage.SerializeToString}
        methods = {
            "bare": grpc.stream_stream_rpc_method_handler(echo(wait=False, proto=False)),
            "wait_for": grpc.stream_stream_rpc_method_handler(echo(wait=True, proto=False)),
            "proto": grpc.stream_stream_rpc_method_handler(echo(wait=True, proto=True), **ser),
            "proto_work": grpc.stream_stream_rpc_method_handler(echo(True, True, ECHO_WORK_MS / 1e3), **ser),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, methods),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"echo listening on 127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(0)
        return 0

    return asyncio.run(serve())


async def echo_rounds(address: str, variant: str, k: int, rounds: int, warmup: int = 50) -> list[tuple[float, float]]:
    """(round trip, the server handler's own time) in seconds, per round through the echo server's
    `variant` over one bidi stream with the client's channel options: a K-block up, its verdict down."""
    import struct

    import grpc

    from gelato.channel import CLIENT_OPTIONS
    from gelato.v1 import gelato_pb2 as pb

    up, _ = sample_messages(k)
    method = f"/{ECHO_SERVICE}/{variant}"
    proto = variant.startswith("proto")
    async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        if proto:
            call = channel.stream_stream(
                method,
                request_serializer=pb.DeviceMessage.SerializeToString,
                response_deserializer=pb.EdgeMessage.FromString,
            )()
            payload: Any = up
        else:
            call = channel.stream_stream(method)()
            payload = up.SerializeToString()
        out = []
        for i in range(warmup + rounds):
            t0 = time.perf_counter()
            await call.write(payload)
            reply = await (call.read() if variant == "bare" else asyncio.wait_for(call.read(), 120.0))
            rtt = time.perf_counter() - t0
            handler_ms = reply.verdict.compute_ms if proto else struct.unpack_from("<d", reply)[0]
            if i >= warmup:
                out.append((rtt, handler_ms / 1e3))
        await call.done_writing()
    return out


# ------------------------------------------------------------------------ device (this process)


@contextmanager
def device_timers(rec: Recorder, drafter_model: Any) -> Iterator[Patches]:
    """The device's hot path wrapped (restored on exit). As on the edge, the model part of a
    drafter forward is the model's own `forward`; `KVSequence.forward`'s input tensor, logits
    slice and inference-mode entry count as drafting bookkeeping."""
    import device.client
    import device.drafter
    from device.client import EdgeClient
    from device.drafter import Drafter

    patches = Patches()
    patches.time(Drafter, "draft", rec, "draft")
    patches.time(Drafter, "apply", rec, "apply")
    patches.time(drafter_model, "forward", rec, "draft_forward")
    patches.time(device.drafter, "entropy_nats", rec, "entropy")
    patches.time(EdgeClient, "_offload", rec, "offload")
    patches.time(device.client, "encode_block", rec, "encode")
    patches.time(device.client, "decode_verdict", rec, "decode")
    patches.time(EdgeClient, "_write", rec, "write", ("at_write", "at_write_end"))
    patches.time(EdgeClient, "_read", rec, "read", ("at_read", "at_read_end"))
    try:
        yield patches
    finally:
        patches.restore()


async def instrumented_device(
    address: str, drafter_loaded: Any, prompts: list[list[int]], policies: list[str], max_new: int
) -> dict[str, Any]:
    """Every policy over `[prompts[0]] + prompts` (the first a warm-up) through the real client;
    rounds timed. Returns units per policy, the device CPU per round, and what was not instrumented."""
    from device.client import EdgeClient
    from device.drafter import Drafter
    from device.energy import EnergyAccountant
    from device.policy import parse_policy
    from gelato.power import open_meter, radio_profile
    from gelato.types import SamplingParams

    rec = Recorder()

    def round_end(tele: Any) -> None:  # on_round: the round's telemetry is complete
        if rec.current is not None:
            rec.current["t_round_s"] = tele.t_round_s  # the loop's own round timer
        rec.close()

    acct = EnergyAccountant(open_meter("auto", "phone"), radio_profile("wifi"))  # gelato-device's defaults
    client = EdgeClient(address)
    out: dict[str, Any] = {}
    session = 0
    with device_timers(rec, drafter_loaded.model) as patches:
        try:
            for name in policies:
                policy = parse_policy(name)
                drafter = Drafter(drafter_loaded, SamplingParams())
                tags: dict[str, Any] = {}

                def opener(fn: Callable[..., Any], tags: dict[str, Any] = tags) -> Callable[..., Any]:
                    @functools.wraps(fn)
                    def decide(*args: Any, **kwargs: Any) -> Any:
                        rec.open(time.perf_counter(), **tags)  # a round starts with the policy's decision
                        return fn(*args, **kwargs)

                    return decide

                patches.replace(policy, "decide", opener)
                runs = []
                for i, prompt in enumerate([prompts[0], *prompts]):
                    tags.update(session=session, warmup=i == 0)
                    cpu0 = time.process_time()
                    res = await client.generate(drafter, prompt, max_new, policy, acct, on_round=round_end)
                    cpu = time.process_time() - cpu0
                    if res.error:
                        raise RuntimeError(f"instrumented {name} run failed: {res.error}")
                    runs.append(
                        {
                            **tags,
                            "rounds": res.stats.rounds,
                            "tokens": len(res.token_ids),
                            "cpu_s": cpu,
                            "elapsed_s": res.elapsed_s,
                        }
                    )
                    session += 1
                out[name] = runs
        finally:
            await client.close()
            acct.meter.close()
        missing = list(patches.missing)
    return {"runs": out, "units": rec.units, "missing": missing}


# ------------------------------------------------------------------- floors and references (here)


def raw_forwards(drafter: Any, target: Any, context: int, k: int, reps: int) -> dict[str, float]:
    """Median seconds of the bare model calls a round needs, at `context` cached tokens, with the
    caches the real code uses: the drafter's K one-token forwards on a `DynamicCache`; the target's
    forward over K+1 tokens (and over 1, fixed-0's block) on a `DynamicCache` and via `KVPool.forward`."""
    import random

    import torch

    from edge.kv_pool import KVPool
    from gelato.kv import KVSequence, cache_kwarg

    rng = random.Random(0)
    ids = [rng.randrange(1, min(drafter.vocab_size, target.vocab_size)) for _ in range(context + k + 1)]

    def median_s(fn: Callable[[], None]) -> float:
        times = []
        for i in range(reps + 3):
            t0 = time.perf_counter()
            fn()
            if i >= 3:  # warm-up calls
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def dynamic(loaded: Any, n_tokens: int, calls: int) -> float:
        seq = KVSequence(loaded.model, loaded.vocab_size, ids[:context])
        seq.prefill(context)
        kw = {cache_kwarg(loaded.model): seq.cache}
        x = torch.tensor([ids[context : context + n_tokens]])

        @torch.inference_mode()
        def run() -> None:
            for _ in range(calls):
                loaded.model(input_ids=x, use_cache=True, **kw)
            seq.cache.crop(-(n_tokens * calls))  # back to `context`: every repetition is the same

        return median_s(run)

    def pooled(loaded: Any, n_tokens: int) -> float:
        pool = KVPool(loaded.model, loaded.vocab_size, slots=1, context=context + n_tokens + 1)
        pool.forward([(0, 0, ids[:context])], last_only=True)
        rows = [(0, context, ids[context : context + n_tokens])]

        def run() -> None:
            pool.forward(rows)  # rewrites the same positions each time

        return median_s(run)

    return {
        "context_tokens": context,
        "drafter_1_ms": dynamic(drafter, 1, 1) * 1e3,
        "drafter_k_ms": dynamic(drafter, 1, k) * 1e3,
        "target_1_ms": dynamic(target, 1, 1) * 1e3,
        "target_k1_ms": dynamic(target, k + 1, 1) * 1e3,
        "target_pool_1_ms": pooled(target, 1) * 1e3,
        "target_pool_k1_ms": pooled(target, k + 1) * 1e3,
    }


def target_alone(target: Any, prompts: list[list[int]], max_new: int) -> dict[str, Any]:
    """The target decoding alone in this process: prefill, then one cached forward + argmax per
    token (what fixed-0 asks of the edge, without the device, the wire or the batcher); and
    `generate()` greedy. Tokens and seconds summed over the prompts, prefill included (as in a
    device's elapsed time)."""
    import torch

    from gelato.kv import KVSequence

    eos = set(target.eos_token_ids)

    def loop(prompt: list[int]) -> int:
        seq = KVSequence(target.model, target.vocab_size, prompt)
        seq.prefill(len(prompt) - 1)
        out: list[int] = []
        new: list[int] = []
        while len(out) < max_new:
            nxt = int(seq.forward(new)[-1].argmax())
            out.append(nxt)
            new = [nxt]
            if nxt in eos:
                break
        return len(out)

    def generate(prompt: list[int]) -> int:
        x = torch.tensor([prompt])
        with torch.inference_mode():
            out = target.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=max_new,
                eos_token_id=sorted(eos),
                pad_token_id=min(eos) if eos else 0,
            )
        gen = out[0, len(prompt) :].tolist()
        return next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))

    result: dict[str, Any] = {}
    for name, fn in (("loop", loop), ("generate", generate)):
        fn(prompts[0])  # warm-up
        tokens, t0 = 0, time.perf_counter()
        for p in prompts:
            tokens += fn(p)
        result[name] = {"tokens": tokens, "seconds": time.perf_counter() - t0}
    return result


@contextmanager
def assistant_settings(model: Any, **values: Any) -> Iterator[None]:
    """Set generation-config fields of the assistant for the duration (transformers reads them there)."""
    config = model.generation_config
    old = {name: getattr(config, name, None) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(config, name, value)


def assisted_runs(target: Any, drafter: Any, prompts: list[list[int]], max_new: int, k: int) -> dict[str, Any]:
    """transformers' assisted generation with the same pair (`benchmarks.bench_refs.assisted`):
    at K (constant schedule, no confidence stop: fixed-K's exact work) and at its own defaults."""
    import transformers

    from benchmarks.bench_refs import assisted

    transformers.logging.set_verbosity_error()  # its notes on generation-config arguments, per call
    out = {}
    fixed = {
        "num_assistant_tokens": k,
        "num_assistant_tokens_schedule": "constant",
        "assistant_confidence_threshold": 0.0,
    }
    for name, settings in ((f"k{k}", fixed), ("defaults", {})):
        with assistant_settings(drafter.model, **settings):
            assisted(prompts[:1], target, drafter, max_new)  # warm-up
            res = assisted(prompts, target, drafter, max_new)
        out[name] = {"tokens": res["tokens"], "seconds": sum(res["seconds"]), "mode": res["mode"]}
    return out


# ------------------------------------------------------------------------------------ analysis

# (key, where it runs, kind, label). "model": a model forward; "measured": a timed call; "residual":
# the difference between nested timers. In round order; they sum to the round.
COMPONENTS: list[tuple[str, str, str, str]] = [
    ("loop", "device", "residual", "round loop: policy, energy accounting, telemetry"),
    ("hops", "device", "residual", "drafter-thread hops (run_in_executor for draft and apply)"),
    ("draft_forward", "device", "model", "drafter forwards"),
    ("entropy", "device", "measured", "entropy of each draft's distribution"),
    ("draft_other", "device", "residual", "drafting other (input tensors, logits slices, argmax, DraftBlock)"),
    ("encode", "device", "measured", "encode DraftBlock"),
    ("transit", "wire", "residual", "gRPC transit both ways (write + read - edge handler)"),
    ("parse", "edge", "measured", "parse DeviceMessage"),
    ("decode_block", "edge", "measured", "decode + validate the block"),
    ("checks", "edge", "measured", "session checks (event loop and model thread)"),
    ("queue", "edge", "residual", "batcher queue + event loop <-> model thread hops"),
    ("model_forward", "edge", "model", "target forward"),
    ("pool", "edge", "residual", "KV-pool bookkeeping (ids, mask, positions, cache object, logits)"),
    ("accept", "edge", "measured", "acceptance + KV rollback"),
    ("model_thread_other", "edge", "residual", "model-thread other (batch checks, outcomes)"),
    ("encode_verdict", "edge", "measured", "encode Verdict"),
    ("handler_other", "edge", "residual", "edge handler other (Verdict build, awaits)"),
    ("decode", "device", "measured", "decode Verdict"),
    ("apply", "device", "measured", "verdict apply (drafter rollback)"),
]

SUGGESTIONS = {
    "transit": "compare the echo variants (below the table): what `wait_for` reads and protobuf add to a "
    "back-to-back echo is small next to what an idle gap adds. Each side's event loop sleeps in epoll "
    "while the other computes, and waking it (and, on a VM, its idle vCPU) is most of this part: poll "
    "briefly before sleeping when a reply is due soon (the edge knows its forward's length, the device "
    "its round's), keep the reads' `wait_for` off the hot path (`asyncio.timeout`, or one deadline per "
    "stream: each `wait_for` is a task and a loop turn), and avoid the async-generator handler's extra "
    "turn per message (`context.write`).",
    "hops": "two executor round trips per round (draft, then apply), each a wake-up of the sleeping drafter "
    "thread plus a self-pipe wake-up of the loop: fuse apply of round r with the draft of round r+1 in one "
    "offload (apply, decide, draft, encode), or draft on the loop thread when nothing else (pre-drafting) "
    "needs the loop meanwhile.",
    "queue": "asyncio.Queue put/get, the batcher task's wake-up, `run_in_executor` to the sleeping model "
    "thread and the loop's wake-up back (self-pipe) for the future: with one open session (or an empty "
    "queue and nothing in flight) hand the row to the model thread at once, keep the model thread "
    "polling briefly before it sleeps, and resolve a batch's futures with one `call_soon_threadsafe`.",
    "loop": "per round `dataclasses.replace` of Telemetry twice, meter reads, policy observe/decide: build "
    "Telemetry once, read the meter once per round edge.",
    "pool": "about fifteen small torch calls per forward outside the model, 5-25 µs each on this CPU: "
    "`ends.max()` on a tensor, three `torch.tensor`, two `arange`, two `zeros`, `minimum`, `masked_fill_` for "
    "the [B, n, kv_len] mask, index tensors for the cache object, `inference_mode` entries, the module call: "
    "keep lengths and kv_len as Python ints, skip the mask for single-query rows (one query sees every key) "
    "and cache it per shape otherwise, reuse preallocated id/position/index tensors.",
    "checks": "`TargetSession.check` runs twice per block (event loop and model thread), each re-validating "
    "ids already validated by `decode_block` (params.validate, check_block): validate once at decode, keep "
    "only the round/length checks.",
    "decode_block": "a Python tuple of ints and a range scan per block: unavoidable in size, but it need not be "
    "repeated by `check`.",
    "parse": "the service takes raw bytes and parses them itself (for precise INVALID_ARGUMENT): one parse, "
    "unavoidable; could reuse a message object (`ParseFromString` into a preallocated one).",
    "encode_verdict": "two message objects per verdict (EdgeMessage + Verdict): cheap; could reuse one.",
    "handler_other": "Verdict dataclass, `_verify`/`_verify_block` awaits and exception frames: flatten.",
    "model_thread_other": "per-batch duplicate-session scan, outcome dict keyed by id(): small.",
    "draft_other": "per token: `torch.tensor([ids])`, an `inference_mode` entry, the module call, the logits "
    "slice and `.float()` (KVSequence.forward), `[-1]`, argmax to int: keep a preallocated input tensor, ask "
    "the model for the last position's logits only (`logits_to_keep=1`), one inference-mode scope per block.",
    "entropy": "log_softmax + exp + multiply + sum over the vocabulary per draft: skip it when the policy does "
    "not gate on entropy (fixed-K), or fuse.",
    "encode": "a SparseDist per token when sampling; greedy: one message, cheap.",
    "decode": "one Verdict dataclass: cheap.",
    "apply": "`set_tail` + `DynamicCache.crop` per layer: small.",
    "accept": "argmax over K+1 rows + `.tolist()` + set_tail: small.",
}


def _mean_units(units: list[dict[str, Any]]) -> dict[str, float]:
    keys = {
        k for u in units for k in u if isinstance(u[k], float | int) and not isinstance(u[k], bool) and k[:3] != "at_"
    }
    return {k: statistics.fmean(float(u.get(k, 0.0)) for u in units) for k in keys}


def decompose(device_units: list[dict[str, Any]], edge_units: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ms per round of every component (they sum to the round), from matched rounds."""
    d, e = _mean_units(device_units), _mean_units(edge_units)

    def g(src: dict[str, float], *keys: str) -> float:
        return sum(src.get(k, 0.0) for k in keys)

    handler = g(e, "total")
    parts = {
        "loop": g(d, "total") - g(d, "offload", "encode", "write", "read", "decode"),
        "hops": g(d, "offload") - g(d, "draft", "apply"),
        "draft_forward": g(d, "draft_forward"),
        "entropy": g(d, "entropy"),
        "draft_other": g(d, "draft") - g(d, "draft_forward", "entropy"),
        "encode": g(d, "encode"),
        "transit": g(d, "write", "read") - handler,
        "parse": g(e, "parse"),
        "decode_block": g(e, "decode_block"),
        "checks": g(e, "check_loop", "check_model_thread"),
        "queue": g(e, "batcher_verify") - g(e, "model_thread"),
        "model_forward": g(e, "model_forward"),
        "pool": g(e, "pooled_forward") - g(e, "model_forward"),
        "accept": g(e, "accept"),
        "model_thread_other": g(e, "model_thread") - g(e, "pooled_forward", "accept", "check_model_thread"),
        "encode_verdict": g(e, "encode_verdict"),
        "handler_other": handler - g(e, "parse", "decode_block", "check_loop", "batcher_verify", "encode_verdict"),
        "decode": g(d, "decode"),
        "apply": g(d, "apply"),
    }
    round_ms = g(d, "total") * 1e3
    return {
        "round_ms": round_ms,
        "round_ms_median": statistics.median(u["total"] for u in device_units) * 1e3,
        "loop_timer_round_ms": g(d, "t_round_s") * 1e3,
        "edge_handler_ms": handler * 1e3,
        "timed_calls_per_round": g(d, "calls") + g(e, "calls"),
        "components": [
            {"key": key, "side": side, "kind": kind, "label": label, "ms": parts[key] * 1e3}
            for key, side, kind, label in COMPONENTS
        ],
    }


def _typical(units: list[dict[str, Any]]) -> list[int]:
    """Indices of the rounds not slower than median + 5 MAD of their totals. On a shared machine a
    round another process preempted is many times slower than its peers; means would carry it."""
    totals = [u["total"] for u in units]
    med = statistics.median(totals)
    mad = statistics.median(abs(t - med) for t in totals)
    return [i for i, t in enumerate(totals) if t <= med + 5 * mad] if mad > 0 else list(range(len(units)))


def summarize_policy(
    name: str, device: dict[str, Any], edge: dict[str, Any], plain: dict[str, Any], floors: dict[str, Any], k: int
) -> dict[str, Any]:
    runs = [r for r in device["runs"][name] if not r["warmup"]]
    sessions = {r["session"] for r in runs}
    d_units = [u for u in device["units"] if u.get("session") in sessions]
    e_units = [u for u in edge["units"] if u.get("session") in sessions]
    if len(d_units) != len(e_units) or not d_units:
        raise RuntimeError(f"{name}: {len(d_units)} device rounds but {len(e_units)} edge verdicts")
    kept = _typical(d_units)
    all_rounds = len(d_units)
    totals = sorted(u["total"] * 1e3 for u in d_units)
    every_round = {
        "mean_ms": statistics.fmean(totals),
        **{f"p{q}_ms": totals[int(q / 100 * (len(totals) - 1))] for q in (10, 50, 90, 99)},
        "max_ms": totals[-1],
    }
    d_units, e_units = [d_units[i] for i in kept], [e_units[i] for i in kept]
    out = decompose(d_units, e_units)
    out["rounds"] = all_rounds
    out["outlier_rounds_dropped"] = all_rounds - len(kept)
    out["every_round"] = every_round  # before dropping outliers
    # Transit split by the shared monotonic clock: the block's way up (device write starts -> edge
    # parse starts) and the verdict's way down (edge encode ends -> device read returns).
    pairs = list(zip(d_units, e_units, strict=True))
    out["uplink_ms"] = 1e3 * statistics.fmean(e["at_start"] - d["at_write"] for d, e in pairs)
    out["downlink_ms"] = 1e3 * statistics.fmean(d["at_read_end"] - e["at_end"] for d, e in pairs)
    out["tokens_per_round"] = sum(r["tokens"] for r in runs) / all_rounds
    comp = {c["key"]: c["ms"] for c in out["components"]}
    out["model_ms"] = comp["draft_forward"] + comp["model_forward"]
    out["outside_models_ms"] = out["round_ms"] - out["model_ms"]
    e_sessions = [s for s in edge["sessions"] if s["session"] in sessions and s.get("cpu_s") is not None]
    verdicts = sum(s["verdicts"] for s in e_sessions)
    out["edge_cpu_ms_per_verdict"] = 1e3 * sum(s["cpu_s"] for s in e_sessions) / verdicts if verdicts else None
    if out["edge_cpu_ms_per_verdict"] is not None:
        out["edge_cpu_outside_forward_ms"] = out["edge_cpu_ms_per_verdict"] - comp["model_forward"]
    out["device_cpu_ms_per_round"] = 1e3 * sum(r["cpu_s"] for r in runs) / all_rounds
    drafts = 0 if name == "fixed-0" else k
    floor = (floors["drafter_k_ms"] if drafts else 0.0) + floors["target_k1_ms" if drafts else "target_1_ms"]
    out["floor_ms"] = floor + floors["echo_rtt_ms"]
    out["elapsed_per_round_ms"] = 1e3 * sum(r["elapsed_s"] for r in runs) / all_rounds
    out["plain_round_ms"] = plain["round_ms"]
    out["plain_elapsed_per_round_ms"] = plain["elapsed_per_round_ms"]
    out["plain_tokens_per_s"] = plain["tokens_per_s"]
    out["plain_round_vs_floor"] = plain["round_ms"] / out["floor_ms"]
    out["round_vs_floor"] = out["round_ms"] / out["floor_ms"]
    out["instrumentation_inflation"] = out["loop_timer_round_ms"] / plain["round_ms"]
    return out


def ranked_overhead(policy: dict[str, Any]) -> list[dict[str, Any]]:
    """Components outside the model forwards, largest first."""
    rows = [c for c in policy["components"] if c["kind"] != "model"]
    return sorted(rows, key=lambda c: -c["ms"])


def plain_run(address: str, drafter: str | None, prompts_file: Path, policy: str, max_new: int) -> dict[str, Any]:
    """One real `gelato-device` process (this process's CPU affinity) over `prompts_file`, whose
    first prompt is a warm-up that is dropped: tokens, seconds and rounds (the generations' elapsed
    time: session open, prefills and close included) and every round's `t_round_s` (`--trace`: the
    round loop's own timer, drafting to verdict applied)."""
    from benchmarks.procs import run_device

    trace = prompts_file.with_name(f"trace_{policy}.jsonl")
    args = ["--edge", address, "--threads", "1", "--prompts-file", str(prompts_file), "--max-new-tokens", str(max_new)]
    args += ["--policy", policy, "--trace", str(trace), *(["--drafter", drafter] if drafter else [])]
    records = run_device(args)[1:]
    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    return {
        "tokens": sum(r["n_tokens"] for r in records),
        "seconds": sum(r["elapsed_s"] for r in records),
        "rounds": sum(r["rounds"] for r in records),
        "t_round_s": [r["t_round_s"] for r in rows if r["prompt_index"] > 0],
        "token_ids": [r["token_ids"] for r in records],
    }


def _sum_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs as one: tokens/s as the ratio of the sums."""
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    out: dict[str, Any] = {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_repeat": [r["tokens"] / r["seconds"] for r in runs],
    }
    if "rounds" in runs[0]:
        rounds = sum(r["rounds"] for r in runs)
        out.update(
            rounds=rounds,
            round_ms=1e3 * statistics.fmean(t for r in runs for t in r["t_round_s"]),
            elapsed_per_round_ms=1e3 * seconds / rounds,
            token_ids=runs[0]["token_ids"],
            same_output_every_repeat=all(r["token_ids"] == runs[0]["token_ids"] for r in runs),
        )
    if "mode" in runs[0]:
        out["mode"] = runs[0]["mode"]
    return out


# ------------------------------------------------------------------------------------- output


def table(result: dict[str, Any]) -> str:
    pols = result["policies"]
    names = list(pols)
    lines = [
        "| part of a round | where | " + " | ".join(f"{n} ms | {n} %" for n in names) + " |",
        "|---|---|" + "---:|---:|" * len(names),
    ]
    for i, (_key, side, kind, label) in enumerate(COMPONENTS):
        cells = []
        for n in names:
            c = pols[n]["components"][i]
            cells.append(f"{c['ms']:.3f} | {100 * c['ms'] / pols[n]['round_ms']:.1f}")
        tag = {"model": " (model)", "residual": " †"}.get(kind, "")
        lines.append(f"| {label}{tag} | {side} | " + " | ".join(cells) + " |")
    rows = [
        ("round, instrumented (decision to telemetry)", "round_ms"),
        ("round, instrumented, median", "round_ms_median"),
        ("outside the model forwards", "outside_models_ms"),
        ("round by the loop's timer, instrumented", "loop_timer_round_ms"),
        ("round by the loop's timer, plain processes", "plain_round_ms"),
        ("elapsed per round, plain (open, prefills, close included)", "plain_elapsed_per_round_ms"),
        ("floor: raw forwards + bare echo", "floor_ms"),
    ]
    for label, key in rows:
        lines.append(f"| **{label}** | | " + " | ".join(f"{pols[n][key]:.3f} | " for n in names) + " |")
    return "\n".join(lines)


def summary_lines(result: dict[str, Any]) -> list[str]:
    pols, fl, ref = result["policies"], result["floors"], result["references"]
    k = result["meta"]["k"]
    lines = []
    for n, p in pols.items():
        lines.append(
            f"- {n}: plain round {p['plain_round_ms']:.3f} ms = {p['plain_round_vs_floor']:.2f} × the floor "
            f"{p['floor_ms']:.3f} ms (raw forwards + bare echo); instrumented round {p['round_ms']:.3f} ms, "
            f"{p['outside_models_ms']:.3f} ms of it outside the model forwards; edge CPU per verdict "
            f"{_fmt(p.get('edge_cpu_ms_per_verdict'))} ms, {_fmt(p.get('edge_cpu_outside_forward_ms'))} ms of it "
            f"outside the target forward; transit {p['uplink_ms']:.3f} ms up + {p['downlink_ms']:.3f} ms down "
            f"(shared clock); {p['tokens_per_round']:.2f} tokens/round; the timers made the loop's "
            f"own round timer read {p['instrumentation_inflation']:.2f} × the plain run's."
        )
    r, per = result["ratios"], result["ratios_per_repeat"]

    def each(name: str) -> str:
        return ", ".join(f"{x:.2f}" for x in per[name])

    fk = f"fixed-{k}"
    best = result["ratios_of_best"]
    lines.append(
        f"- fixed-0 = {r['fixed0_vs_target_loop']:.2f} × the tokens/s of the target decoding alone in one process "
        f"(a cached greedy loop; per repeat {each('fixed0_vs_target_loop')}; best repeat vs best repeat "
        f"{best['fixed0_vs_target_loop']:.2f}) and {r['fixed0_vs_target_generate']:.2f} × its `generate()` "
        f"({each('fixed0_vs_target_generate')}; best vs best {best['fixed0_vs_target_generate']:.2f}); over all "
        f"repeats {pols['fixed-0']['plain_tokens_per_s']:.1f} vs {ref['target']['loop']['tokens_per_s']:.1f} and "
        f"{ref['target']['generate']['tokens_per_s']:.1f} tokens/s."
    )
    lines.append(
        f"- {fk} = {r['fixedk_vs_assisted_k']:.2f} × transformers' assisted generation with the same pair at K = {k} "
        f"({each('fixedk_vs_assisted_k')}; best vs best {best['fixedk_vs_assisted_k']:.2f}) and "
        f"{r['fixedk_vs_assisted_defaults']:.2f} × assisted at its defaults ({each('fixedk_vs_assisted_defaults')}; "
        f"best vs best {best['fixedk_vs_assisted_defaults']:.2f}); over all repeats "
        f"{pols[fk]['plain_tokens_per_s']:.1f} vs {ref['assisted'][f'k{k}']['tokens_per_s']:.1f} and "
        f"{ref['assisted']['defaults']['tokens_per_s']:.1f} tokens/s."
    )
    echo = fl["echo"]
    lines.append(
        "- gRPC echo (another process, same options and handler shape), round trip median (p90) / transit "
        "(round trip minus the handler's own time, mean): "
        + "; ".join(
            f"{v} {e['median_ms']:.3f} ({e['p90_ms']:.3f}) / {e['transit_mean_ms']:.3f} ms" for v, e in echo.items()
        )
        + f" ({fl['bytes_up']} B up, {fl['bytes_down']} B down). Variants: "
        + "; ".join(f"{v}: {e['what']}" for v, e in echo.items())
        + ". The rounds' own transit: "
        + ", ".join(f"{n} {p['components'][_index('transit')]['ms']:.3f} ms" for n, p in pols.items())
        + "."
    )
    lines.append(
        f"- raw forwards at {fl['context_tokens']} cached tokens: drafter {fl['drafter_1_ms']:.3f} ms "
        f"({k} of them: {fl['drafter_k_ms']:.3f}); target over 1 / {k + 1} tokens {fl['target_1_ms']:.3f} / "
        f"{fl['target_k1_ms']:.3f} ms on a DynamicCache, {fl['target_pool_1_ms']:.3f} / "
        f"{fl['target_pool_k1_ms']:.3f} ms through the edge's KV pool."
    )
    return lines


def _index(key: str) -> int:
    return next(i for i, c in enumerate(COMPONENTS) if c[0] == key)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    out = [
        "# Round overhead — loopback, built-in tiny pair" if meta["pair"] == "embedded" else "# Round overhead",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}; {meta['pinning']}; one torch thread per process; transformers "
        f"{meta['transformers']}, grpcio {meta['grpcio']}. Prompts: {meta['prompts']} ({meta['n']}, "
        f"{meta['max_new_tokens']} new tokens, greedy), one warm-up generation per run excluded; plain runs "
        f"and their in-process references alternated {meta['repeats']}×. A shared machine (1-min load average "
        + ", ".join(f"{v:.1f}" for v in meta["load_average_1min"].values())
        + " at the start, before the instrumented runs and at the end): absolute timings drift between runs; "
        "compare "
        "the ratios within this run.",
        "",
        "Mean ms per round. † = a difference between nested timers (thread hops, transit, bookkeeping); "
        "the rest are timed calls of the real functions. The parts sum to the instrumented round, which "
        f"carries ~{meta['instrumentation_us_per_round']:.0f} µs of timers "
        f"({meta['wrapper_cost_us']:.2f} µs per timed call). Rounds slower than median + 5 MAD of their run's "
        "(preempted by another process) are left out of the means: "
        + ", ".join(f"{n} {p['outlier_rounds_dropped']} of {p['rounds']}" for n, p in result["policies"].items())
        + ". Ratios of tokens/s are the median over repeats of each repeat's ratio (both sides measured one "
        "after the other); floors are medians over repeats.",
        "",
        table(result),
        "",
        *summary_lines(result),
        "",
        "## Where the overhead outside the model forwards is, ranked",
        "",
    ]
    for n, p in result["policies"].items():
        out.append(f"### {n} ({p['outside_models_ms']:.3f} ms of a {p['round_ms']:.3f} ms round)")
        out.append("")
        for i, c in enumerate(ranked_overhead(p), 1):
            if c["ms"] < 0.005:
                break
            share = 100 * c["ms"] / p["outside_models_ms"] if p["outside_models_ms"] > 0 else 0.0
            note = SUGGESTIONS.get(c["key"], "")
            if c["key"] == "transit":
                echo = result["floors"]["echo"]
                note = (
                    "echo transits: "
                    + ", ".join(f"{v} {e['transit_mean_ms']:.3f}" for v, e in echo.items())
                    + f" ms. {note}"
                )
            out.append(f"{i}. {c['label']} — {c['ms']:.3f} ms ({share:.0f} %): {note}")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- main


def load_prompts(source: str, n: int) -> tuple[list[str], str]:
    if source == "gsm8k":
        from gelato.tiny.train import default_gsm8k_path

        path = default_gsm8k_path("test")
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                return [json.loads(line)["question"] for line, _ in zip(f, range(n), strict=False)], "GSM8K test"
    from benchmarks.demo import demo_prompts

    return demo_prompts(n), "the demo's synthetic problems"


def run(args: argparse.Namespace, argv: list[str], cores: list[int]) -> dict[str, Any]:
    """Every phase; `cores`: the CPUs this process may use (the edge gets the first, the rest of
    the work the second, when there are two)."""
    import grpc
    import torch
    import transformers

    from benchmarks.procs import machine, start_edge
    from gelato.models import encode_prompt, load_model

    k = args.k
    policies = ["fixed-0", f"fixed-{k}"]
    load = {"start": os.getloadavg()[0]}
    texts, source = load_prompts(args.prompts, args.n)
    target = load_model(args.target, "target", "float32", "cpu")
    drafter = load_model(args.drafter, "drafter", "float32", "cpu")
    prompts = [encode_prompt(drafter.tokenizer, t) for t in texts]
    pin = len(cores) >= 2 and shutil.which("taskset") is not None
    edge_prefix = ["taskset", "-c", str(cores[0])] if pin else []
    pinning = (
        f"edge and echo processes on CPU {cores[0]}, device and references on CPU {cores[1]}" if pin else "not pinned"
    )
    edge_args = ["--threads", "1", *(["--target", args.target] if args.target else [])]
    me = [sys.executable, "-m", "benchmarks.round_overhead"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prompts_file = tmp / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in [texts[0], *texts]))
        acc: dict[str, list[dict[str, Any]]] = {}
        raw: list[dict[str, float]] = []
        echoes: dict[str, list[tuple[float, float]]] = {v: [] for v in ECHO_VARIANTS}
        # Everything a ratio compares is measured in each repeat, one after the other (a plain run,
        # then its in-process reference; the echo and the raw forwards), so that the machine's
        # drift touches both sides of each ratio alike.
        edge = start_edge(edge_args, prefix=edge_prefix)
        echo = None
        try:
            echo = start_edge([], prefix=[*edge_prefix, *me, "--serve-echo", str(k), "--"])
            for r in range(args.repeats):
                print(
                    f"plain runs, references and floors, repeat {r + 1}/{args.repeats} ...", file=sys.stderr, flush=True
                )
                acc.setdefault("fixed-0", []).append(
                    plain_run(edge.address, args.drafter, prompts_file, "fixed-0", args.max_new_tokens)
                )
                for name, res in target_alone(target, prompts, args.max_new_tokens).items():
                    acc.setdefault(f"target_{name}", []).append(res)
                acc.setdefault(policies[1], []).append(
                    plain_run(edge.address, args.drafter, prompts_file, policies[1], args.max_new_tokens)
                )
                for name, res in assisted_runs(target, drafter, prompts, args.max_new_tokens, k).items():
                    acc.setdefault(f"assisted_{name}", []).append(res)
                for v in ECHO_VARIANTS:
                    echoes[v] += asyncio.run(echo_rounds(echo.address, v, k, args.echo_rounds))
                # The raw forwards at the runs' mean context: the prompt plus half the output.
                context = round(
                    statistics.fmean(len(p) for p in prompts) + acc["fixed-0"][0]["tokens"] / len(prompts) / 2
                )
                raw.append(raw_forwards(drafter, target, context, k, args.raw_reps))
        finally:
            edge.stop()
            if echo is not None:
                echo.stop()
        plain = {n: _sum_runs(acc[n]) for n in policies}
        references = {
            "target": {n: _sum_runs(acc[f"target_{n}"]) for n in ("loop", "generate")},
            "assisted": {n: _sum_runs(acc[f"assisted_{n}"]) for n in (f"k{k}", "defaults")},
        }
        load["before_instrumented"] = os.getloadavg()[0]
        print("instrumented edge and device ...", file=sys.stderr, flush=True)
        stats = tmp / "edge_stats.json"
        edge = start_edge(edge_args, prefix=[*edge_prefix, *me, "--serve-edge", str(stats), "--"])
        try:
            device = asyncio.run(instrumented_device(edge.address, drafter, prompts, policies, args.max_new_tokens))
        finally:
            edge.stop()
        edge_stats = json.loads(stats.read_text())
    # Per quantity the median over repeats: a repeat that another process preempted does not count.
    floors: dict[str, Any] = {key: statistics.median(r[key] for r in raw) for key in raw[0]}
    floors["context_tokens"] = raw[0]["context_tokens"]
    floors["raw_per_repeat"] = raw
    up, down = sample_messages(k)
    floors["echo"] = {}
    for v, rounds in echoes.items():
        rtt = sorted(r for r, _ in rounds)
        floors["echo"][v] = {
            "median_ms": statistics.median(rtt) * 1e3,
            "mean_ms": statistics.fmean(rtt) * 1e3,
            "p90_ms": rtt[int(0.9 * (len(rtt) - 1))] * 1e3,
            # As the decomposition's transit: the round trip minus the server handler's own time.
            "transit_mean_ms": statistics.fmean(r - h for r, h in rounds) * 1e3,
            "transit_median_ms": statistics.median(r - h for r, h in rounds) * 1e3,
            "rounds": len(rounds),
            "what": ECHO_VARIANTS[v],
        }
    floors.update(echo_rtt_ms=floors["echo"]["bare"]["median_ms"], bytes_up=up.ByteSize(), bytes_down=down.ByteSize())

    def tps(run: dict[str, Any]) -> float:
        return float(run["tokens"] / run["seconds"])

    # Each ratio per repeat (its two sides measured one after the other), then the median.
    fk = f"fixed-{k}"
    pairs = {
        "fixed0_vs_target_loop": ("fixed-0", "target_loop"),
        "fixed0_vs_target_generate": ("fixed-0", "target_generate"),
        "fixedk_vs_assisted_k": (fk, f"assisted_k{k}"),
        "fixedk_vs_assisted_defaults": (fk, "assisted_defaults"),
    }
    per_repeat = {
        name: [tps(x) / tps(y) for x, y in zip(acc[a], acc[b], strict=True)] for name, (a, b) in pairs.items()
    }
    cost = wrapper_cost_us()
    pols = {n: summarize_policy(n, device, edge_stats, plain[n], floors, k) for n in policies}
    calls = statistics.fmean(p["timed_calls_per_round"] for p in pols.values())
    command = "python -m benchmarks.round_overhead " + " ".join(shlex.quote(a) for a in argv)
    return {
        "meta": {
            "command": command.strip(),
            "machine": machine(),
            "pinning": pinning,
            "pair": "embedded" if not (args.target or args.drafter) else "given",
            "target": target.name,
            "drafter": drafter.name,
            "prompts": source,
            "n": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "k": k,
            "repeats": args.repeats,
            "threads_per_process": 1,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
            "wrapper_cost_us": cost,
            "instrumentation_us_per_round": cost * calls,
            "load_average_1min": {**load, "end": os.getloadavg()[0]},
            "not_instrumented": sorted(set(device["missing"]) | set(edge_stats["missing"])),
        },
        "policies": pols,
        "floors": floors,
        "references": references,
        "ratios": {name: statistics.median(values) for name, values in per_repeat.items()},
        "ratios_per_repeat": per_repeat,
        # Another process only ever slows a run down: the best repeat of each side, compared.
        "ratios_of_best": {
            name: max(tps(x) for x in acc[a]) / max(tps(y) for y in acc[b]) for name, (a, b) in pairs.items()
        },
        "lossless": all(plain[n]["token_ids"] == plain["fixed-0"]["token_ids"] for n in policies),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-edge"]:
        return _serve_edge(argv[1:])
    if argv[:1] == ["--serve-echo"]:
        return _serve_echo(argv[1:])
    p = argparse.ArgumentParser(prog="round_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target checkpoint (default: the embedded tiny target)")
    p.add_argument("--drafter", default=None, help="drafter checkpoint (default: the embedded tiny drafter)")
    p.add_argument("--n", type=int, default=10, help="prompts")
    p.add_argument("--prompts", choices=["gsm8k", "demo"], default="gsm8k", help="GSM8K test (when found) or demo")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="drafts per round of the speculative run (fixed-K)")
    p.add_argument("--echo-rounds", type=int, default=2000)
    p.add_argument("--raw-reps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=1, help="alternations of plain runs and in-process references")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if min(args.n, args.k, args.max_new_tokens, args.repeats, args.echo_rounds, args.raw_reps) < 1:
        p.error("--n, --k, --max-new-tokens, --repeats, --echo-rounds and --raw-reps must be >= 1")

    import torch

    threads, affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    cores = sorted(affinity)
    torch.set_num_threads(1)
    if len(cores) >= 2 and shutil.which("taskset"):
        os.sched_setaffinity(0, {cores[1]})  # the device and the references; the edge gets cores[0]
    try:
        result = run(args, argv, cores)
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, affinity)
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    return 0 if result["lossless"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
