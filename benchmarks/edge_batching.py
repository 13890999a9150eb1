"""Edge batching benchmark: N concurrent device sessions against one `gelato-edge` process.

Contract: `python -m gelato.benchmarks.edge_batching [--sessions 1,2,4,8,16] [--k 4] [--target M --drafter M
--device cuda --dtype bfloat16 --unique-prompts N]` prints and writes
(JSON + markdown) per N: aggregate emitted tokens/s, mean batch size, p50/p99 verify latency,
edge compute seconds per emitted token; and, in-process, the ratio of a batched verify step
(`verify_batch`: checks, KV pool forward, acceptance) to a raw target forward on the same padded tokens.

Method. The edge runs as its own process (pinned to CPU 0 where `taskset` exists, one thread).
Devices are async gRPC clients in this process (CPU 1) that REPLAY draft blocks recorded from a
solo run of the real drafter on the same prompts: greedy decoding is deterministic, so every
session sends exactly the blocks a real device would, and each verdict is checked against the
recorded one (float32: must be equal; half precision: differing verdicts are counted, since GPU
kernels round differently with the batch shape). `--unique-prompts N` records only N solo runs
and shares them among the sessions (a 64-session GPU run need not record 64). Before each block a
device sleeps for the recorded drafting time, as a device drafting on its own hardware would, so
N devices do not compete for this machine's second core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import torch

from gelato.benchmarks.bench_run import percentile
from gelato.benchmarks.demo import demo_prompts
from gelato.benchmarks.kv_layouts import stacked_cache
from gelato.benchmarks.procs import machine, start_edge
from gelato.channel import CLIENT_OPTIONS
from gelato.device.drafter import Drafter
from gelato.device.generate import Exchange, Limits, local_verifier, speculative_generate
from gelato.device.policy import FixedK
from gelato.edge.kv_pool import KVPool
from gelato.edge.verifier import Accepted, TargetSession, verify_batch
from gelato.kv import cache_kwarg
from gelato.models import LoadedModel, default_model_path, encode_prompt, load_model
from gelato.types import DraftBlock, SamplingParams, SessionOpen
from gelato.v1 import gelato_pb2 as pb
from gelato.v1 import gelato_pb2_grpc as pb_grpc
from gelato.wire import encode_block, encode_open

Recording = list[tuple[DraftBlock, tuple[int, int]]]


def _pct(xs: list[float], q: float) -> float:
    """The nearest-rank percentile `gelato-bench` uses (runs before 2026-12-07 here took the
    rank q·n, one higher where q·n is whole: p99 of 100 verdicts was their maximum)."""
    value = percentile(xs, q)
    if value is None:
        raise ValueError("no verdict was timed")
    return value


def record(drafter: Drafter, target: LoadedModel, prompt: list[int], k: int, max_new: int) -> Recording:
    """A solo greedy run through the device's round loop: each round's block and verdict (a, next)."""
    session = TargetSession("rec", target, SamplingParams(), prompt)
    session.prefill()
    rounds: Recording = []
    verify_solo = local_verifier(session)

    async def verify(block: DraftBlock) -> Exchange:
        ex = await verify_solo(block)
        rounds.append((block, (ex.verdict.n_accepted, ex.verdict.next_token)))
        return ex

    limits = Limits(max_new, target.context_limit, max(k, 1), target.eos_token_ids)
    asyncio.run(speculative_generate(drafter, verify, FixedK(k), prompt, limits))
    return rounds


async def replay(
    stub: pb_grpc.GelatoStub, fp: str, prompt: list[int], rounds: Recording, max_new: int, strict: bool
) -> dict[str, Any]:
    call = stub.Session(timeout=600)
    await call.write(
        encode_open(SessionOpen(prefix_ids=tuple(prompt), tokenizer_fingerprint=fp, max_new_tokens=max_new))
    )
    await call.read()
    rtt_ms, compute_ms, tokens, mismatches = [], [], 0, 0
    first_mismatch: int | None = None  # from here on the session's sequence is not the recording's
    for i, (block, (a, nxt)) in enumerate(rounds):
        await asyncio.sleep(block.draft_s)  # the device drafts on its own hardware
        t0 = time.perf_counter()
        await call.write(encode_block(block))
        msg = await call.read()
        rtt_ms.append((time.perf_counter() - t0) * 1e3)
        v = msg.verdict
        if (v.n_accepted, v.next_token) != (a, nxt):
            if strict:
                raise AssertionError(f"batched verdict {(v.n_accepted, v.next_token)} != solo {(a, nxt)}")
            mismatches += 1  # bf16 kernels differ with batch shape; the replay goes on regardless
            first_mismatch = i if first_mismatch is None else first_mismatch
        compute_ms.append(v.compute_ms)
        tokens += v.n_accepted + 1
    await call.write(pb.DeviceMessage(close=pb.CloseSession()))
    await call.done_writing()
    return {
        "rtt_ms": rtt_ms,
        "compute_ms": compute_ms,
        "tokens": tokens,
        "mismatches": mismatches,
        "first_mismatch": first_mismatch,
    }


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    rows = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in rows}


async def run_level(
    address: str, metrics_port: int, fp: str, work: list[tuple[list[int], Recording]], max_new: int, strict: bool
) -> dict:
    before = scrape(metrics_port)
    async with grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.GelatoStub(channel)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(replay(stub, fp, p, r, max_new, strict) for p, r in work))
        wall = time.perf_counter() - t0
    after = scrape(metrics_port)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    tokens = sum(r["tokens"] for r in results)
    rtt = sorted(x for r in results for x in r["rtt_ms"])
    comp = sorted(x for r in results for x in r["compute_ms"])
    return {
        "sessions": len(work),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "mean_batch_rows": round(delta["gelato_edge_batch_rows_total"] / delta["gelato_edge_batches_total"], 2),
        "verify_rtt_ms_p50": round(_pct(rtt, 0.5), 2),
        "verify_rtt_ms_p99": round(_pct(rtt, 0.99), 2),
        "verify_step_ms_p50": round(_pct(comp, 0.5), 2),
        "verify_step_ms_p99": round(_pct(comp, 0.99), 2),
        # The percentiles above are per verdict (each row carries its step's time, so a step of
        # 60 rows counts 60 times); per step, from the edge's own histogram:
        "verify_step_ms_mean": round(
            1e3 * delta["gelato_edge_verify_seconds_sum"] / delta["gelato_edge_batches_total"], 2
        ),
        "edge_compute_s_per_token": round(delta["gelato_edge_verify_seconds_sum"] / tokens, 6),
        **divergence(results),
    }


def divergence(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Verdicts that differ from the solo recording, over the sessions' replay results. Once one
    differs, the session's later blocks meet another sequence and differ too: how many sessions
    diverged, and at which round (median), says more than the count of verdicts."""
    firsts = [r["first_mismatch"] for r in results if r["first_mismatch"] is not None]
    return {
        "verdicts_differing_from_solo": sum(r["mismatches"] for r in results),
        "sessions_diverged": len(firsts),
        "first_divergence_round_p50": statistics.median(firsts) if firsts else None,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: time them to completion
        torch.cuda.synchronize(device)


def overhead(
    target: LoadedModel, prefixes: list[list[int]], k: int, reps: int, sizes: list[int]
) -> list[dict[str, Any]]:
    """Batched verify step vs a raw forward on the same padded tokens (stacked cache prebuilt)."""
    rows = []
    kv_arg = cache_kwarg(target.model)
    dev = torch.device(target.device)
    for b in sizes:
        prefixes_b = [prefixes[i % len(prefixes)] for i in range(b)]
        step_s, raw_s = [], []
        block = DraftBlock(round=0, ids=tuple([7] * k))
        for _ in range(reps):
            sessions = []
            pool = KVPool(target.model, target.vocab_size, slots=b, context=max(len(p) for p in prefixes_b) + k + 1)
            for p in prefixes_b:
                s = TargetSession("o", target, SamplingParams(), p, pool=pool)
                s.prefill()
                sessions.append(s)
            _sync(dev)
            t0 = time.perf_counter()
            outcomes = verify_batch([(s, block) for s in sessions])  # the edge's step: checks, forward, acceptance
            _sync(dev)
            if not all(isinstance(o, Accepted) and o.batch_rows == b for o in outcomes):
                raise RuntimeError(f"a verify step failed or fell back to rows alone: {outcomes}")
            step_s.append(time.perf_counter() - t0)
            # Raw: the same padded batch, cache already stacked, logits discarded.
            fresh = []
            for p in prefixes_b:
                s = TargetSession("r", target, SamplingParams(), p)
                s.prefill()
                fresh.append(s)
            p_max = max(s.seq.cached for s in fresh)
            cache = stacked_cache(target.model, [s.seq for s in fresh], p_max)
            ids = torch.full((b, k + 1), 7, device=dev)
            mask = torch.ones(b, p_max + k + 1, dtype=torch.long, device=dev)
            pos = torch.stack([s.seq.cached + torch.arange(k + 1) for s in fresh]).to(dev)
            _sync(dev)
            t0 = time.perf_counter()
            with torch.inference_mode():
                target.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kv_arg: cache})
            _sync(dev)
            raw_s.append(time.perf_counter() - t0)
        step, raw = statistics.median(step_s), statistics.median(raw_s)
        rows.append(
            {
                "rows": b,
                "verify_step_ms": round(step * 1e3, 3),
                "raw_forward_ms": round(raw * 1e3, 3),
                "overhead": round(step / raw, 3),
            }
        )
    return rows


def markdown(levels: list[dict], over: list[dict], meta: dict) -> str:
    first = levels[0]["sessions"]  # the ratio column's base: the first level run
    lines = [
        f"# Edge batching — {meta['machine']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Target `{meta['target']}`, drafter `{meta['drafter']}`, K={meta['k']}, "
        f"{meta['max_new_tokens']} new tokens, batch window {meta['batch_window_ms']} ms.",
        "",
        f"| sessions | tokens/s | × {first} session{'s' * (first != 1)} | mean batch rows | verify RTT p50 / p99 ms "
        "| verify step p50 / p99 ms, per verdict | verify step mean ms, per step | edge s/token | verdicts ≠ solo "
        "| sessions diverged (round p50) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = levels[0]["tokens_per_s"]
    for r in levels:
        lines.append(
            f"| {r['sessions']} | {r['tokens_per_s']} | {r['tokens_per_s'] / base:.2f} | {r['mean_batch_rows']} "
            f"| {r['verify_rtt_ms_p50']} / {r['verify_rtt_ms_p99']} | {r['verify_step_ms_p50']} / "
            f"{r['verify_step_ms_p99']} | {r.get('verify_step_ms_mean', 'n/a')} | {r['edge_compute_s_per_token']} "
            f"| {r['verdicts_differing_from_solo']} "
            f"| {r['sessions_diverged']} ({r['first_divergence_round_p50']}) |"
        )
    lines += ["", "| rows | verify step ms | raw forward ms | overhead |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['rows']} | {r['verify_step_ms']} | {r['raw_forward_ms']} | {r['overhead']} |" for r in over]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge_batching", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=default_model_path("target"))
    p.add_argument("--drafter", default=default_model_path("drafter"))
    p.add_argument("--sessions", default="1,2,4,8,16")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-window-ms", type=float, default=2.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--reps", type=int, default=10, help="repetitions of the overhead measurement")
    p.add_argument(
        "--unique-prompts", type=int, default=0, help="record this many solo runs and share them (0: one per session)"
    )
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    levels_n = [int(x) for x in args.sessions.split(",")]
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})
    torch.set_num_threads(1)

    target = load_model(args.target, "target", args.dtype, args.device)
    drafter = Drafter(load_model(args.drafter, "drafter", args.dtype, args.device), SamplingParams())
    unique = args.unique_prompts or max(levels_n)
    prompts = [encode_prompt(target.tokenizer, q) for q in demo_prompts(unique, seed=11)]
    recs = [record(drafter, target, pr, args.k, args.max_new_tokens) for pr in prompts]
    print(f"recorded {len(recs)} solo runs", file=sys.stderr, flush=True)
    # float32 verdicts must equal the solo ones exactly; in half precision kernels differ with the
    # batch shape, so differing verdicts are counted and reported instead.
    strict = target.dtype == torch.float32

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else []
    edge = start_edge(
        [
            "--target",
            args.target,
            "--threads",
            "1",
            "--metrics-port",
            str(metrics_port),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--batch-window-ms",
            str(args.batch_window_ms),
            "--max-batch",
            str(max(levels_n)),
        ],
        prefix=pin,
    )
    try:
        # One unmeasured session first: the first level ran on a cold edge (allocator, kernels,
        # gRPC), and every ratio is taken against it (a cold H200 edge's 1 session ran its verify
        # steps at 2.4x the next level's per-step time).
        warm = [(prompts[0], recs[0])]
        asyncio.run(run_level(edge.address, metrics_port, target.fingerprint, warm, args.max_new_tokens, strict))
        levels = []
        for n in levels_n:
            work = [(prompts[i % unique], recs[i % unique]) for i in range(n)]
            levels.append(
                asyncio.run(
                    run_level(edge.address, metrics_port, target.fingerprint, work, args.max_new_tokens, strict)
                )
            )
            print(json.dumps(levels[-1]), file=sys.stderr, flush=True)
    finally:
        edge.stop()
    mid = [pr + [7] * (len(r) * 2) for pr, r in zip(prompts, recs, strict=True)]  # ragged, mid-generation
    over = overhead(target, mid, args.k, args.reps, levels_n)
    meta = {
        "machine": f"{machine()}, {target.device}/{target.dtype}",
        "command": "python -m gelato.benchmarks.edge_batching " + " ".join(argv if argv is not None else sys.argv[1:]),
        "target": args.target,
        "drafter": args.drafter,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "batch_window_ms": args.batch_window_ms,
    }
    report = {"meta": meta, "levels": levels, "overhead": over}
    print(markdown(levels, over, meta))
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(levels, over, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
