"""The instrumented edge and device of the round-overhead benchmark (`gelato.benchmarks.round_overhead`).

Contract: `_serve_edge(argv)` (`--serve-edge STATS -- PYTHON -m gelato.edge.cli ARGS...`, in a child
process) runs `gelato.edge.cli.main(ARGS)` with timers around the real functions of the edge's hot path
and writes the verdicts' units, the sessions' CPU time and what could not be instrumented to STATS
when it stops. `device_timers(rec, drafter_model)` wraps the device's hot path for the duration;
`instrumented_device(address, drafter, prompts, policies, max_new)` runs every policy through the
real `EdgeClient` round loop with those timers: the rounds' units per policy, the device CPU per
generation, and what was not instrumented.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gelato.benchmarks.round_overhead_timers import Patches, Recorder, timed


def _serve_edge(argv: list[str]) -> int:
    """`--serve-edge STATS -- PYTHON -m gelato.edge.cli ARGS...` (the command `gelato.benchmarks.procs.start_edge`
    builds, behind this module as its prefix): wrap the edge's hot path, run `gelato.edge.cli.main(ARGS)`,
    write what was timed to STATS when it stops (SIGTERM)."""
    stats_path, sep, *cmd = argv
    if sep != "--" or cmd[1:3] != ["-m", "gelato.edge.cli"]:
        raise SystemExit(f"--serve-edge: expected STATS -- PYTHON -m gelato.edge.cli ARGS, got {argv}")
    import gelato.edge.batcher
    import gelato.edge.cli
    import gelato.edge.service
    import gelato.edge.verifier
    from gelato.edge.batcher import Batcher
    from gelato.edge.kv_pool import KVPool
    from gelato.edge.sessions import TargetSession
    from gelato.v1 import gelato_pb2 as pb

    rec, patches = Recorder(), Patches()
    sessions: list[dict[str, Any]] = []
    live: dict[str, Any] = {}
    loop_thread = threading.main_thread()  # asyncio.run in gelato.edge.cli's main: the event loop's thread

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

    patches.replace(gelato.edge.service, "parse_request", parse)
    patches.time(gelato.edge.service, "decode_block", rec, "decode_block")
    patches.replace(gelato.edge.service, "encode_verdict", encode_verdict)
    patches.time(TargetSession, "check", rec, check_name)
    patches.time(TargetSession, "check_state", rec, check_name)
    patches.time(Batcher, "verify", rec, "batcher_verify")
    patches.time(gelato.edge.batcher, "verify_batch", rec, "model_thread")
    patches.time(gelato.edge.verifier, "pooled_forward", rec, "pooled_forward")
    patches.time(TargetSession, "accept", rec, "accept")
    patches.replace(KVPool, "__init__", pool_init)
    try:
        return gelato.edge.cli.main(cmd[3:])
    finally:
        Path(stats_path).write_text(
            json.dumps({"units": rec.units, "sessions": sessions, "missing": patches.missing}) + "\n"
        )


@contextmanager
def device_timers(rec: Recorder, drafter_model: Any) -> Iterator[Patches]:
    """The device's hot path wrapped (restored on exit). As on the edge, the model part of a
    drafter forward is the model's own `forward`; `KVSequence.forward`'s input tensor, logits
    slice and inference-mode entry count as drafting bookkeeping."""
    import gelato.device.client
    import gelato.device.client_errors
    import gelato.device.drafter
    from gelato.device.client import EdgeClient
    from gelato.device.drafter import Drafter

    patches = Patches()
    loop_thread = threading.current_thread()  # the event loop's: `instrumented_device` runs on it

    def on(name: str) -> Callable[[], str]:  # in an offload (drafter thread) or inline (loop thread)
        return lambda: f"{name}_inline" if threading.current_thread() is loop_thread else name

    patches.time(Drafter, "draft", rec, on("draft"))
    patches.time(Drafter, "apply", rec, on("apply"))
    patches.time(drafter_model, "forward", rec, "draft_forward")
    patches.time(gelato.device.drafter, "entropy_nats", rec, "entropy")
    patches.time(EdgeClient, "offload", rec, "offload")
    patches.time(gelato.device.client, "encode_block", rec, "encode")
    patches.time(gelato.device.client_errors, "decode_verdict", rec, "decode")  # in `expect_verdict`
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
    from gelato.device.client import EdgeClient
    from gelato.device.drafter import Drafter
    from gelato.device.energy import EnergyAccountant
    from gelato.device.policy import parse_policy
    from gelato.power import open_meter, radio_profile
    from gelato.types import SamplingParams

    rec = Recorder()

    def round_end(tele: Any) -> None:  # on_round: the round's telemetry is complete
        if rec.current is not None:
            rec.current["t_round_s"] = tele.t_round_s  # the loop's own round timer
        rec.close()

    # gelato-device's defaults, the drafter's device named as gelato-device names it: `auto` then
    # skips NVML for a CPU drafter instead of opening (and reading) GPU 0 on every round.
    meter = open_meter("auto", "phone", str(drafter_loaded.device))
    acct = EnergyAccountant(meter, radio_profile("wifi"))
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
