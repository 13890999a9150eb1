"""Reference measurements of the round-overhead benchmark (`gelato.benchmarks.round_overhead`).

Contract, all in this process unless said: `raw_forwards(drafter, target, context, k, reps)` is the
median ms of the bare model calls a round needs at `context` cached tokens (drafter: one and K
one-token forwards; target: over 1 and K+1 tokens, on a `DynamicCache` and through the edge's
`KVPool`); `target_alone(target, prompts, max_new)` the target decoding alone (a cached greedy loop
and `generate()`); `assisted_runs(target, drafter, prompts, max_new, k)` transformers' assisted
generation at K and at its defaults; `plain_run(address, drafter, prompts_file, policy, max_new)`
one real, uninstrumented `gelato-device` process (and, given the edge's pid, the edge's CPU time by
thread meanwhile); `model_thread_alone(target, prompts, max_new)` the edge model thread's fixed-0
work alone in this process; `_sum_runs(runs)` repeated runs as one (tokens/s as the ratio of the
sums).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def raw_forwards(drafter: Any, target: Any, context: int, k: int, reps: int) -> dict[str, float]:
    """Median seconds of the bare model calls a round needs, at `context` cached tokens, with the
    caches the real code uses: the drafter's K one-token forwards on a `DynamicCache`; the target's
    forward over K+1 tokens (and over 1, fixed-0's block) on a `DynamicCache` and via `KVPool.forward`."""
    import random

    import torch

    from gelato.edge.kv_pool import KVPool
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
    """transformers' assisted generation with the same pair (`gelato.benchmarks.bench_refs.assisted`):
    at K (constant schedule, no confidence stop: fixed-K's exact work) and at its own defaults."""
    import transformers

    from gelato.benchmarks.bench_refs import assisted

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


def plain_run(
    address: str,
    drafter: str | None,
    prompts_file: Path,
    policy: str,
    max_new: int,
    pipeline: str = "off",
    edge_pid: int | None = None,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One real `gelato-device` process (this process's CPU affinity) over `prompts_file`, whose
    first prompt is a warm-up that is dropped: tokens, seconds and rounds (the generations' elapsed
    time: session open, prefills and close included) and every round's `t_round_s` (`--trace`: the
    round loop's own timer, drafting to verdict applied). With `edge_pid`, also the CPU seconds that
    edge process used meanwhile, by thread (`thread_cpu_s`; warm-up included, so with the tokens of
    every prompt: `edge_cpu_tokens`). `extra`: more `gelato-device` arguments."""
    from gelato.benchmarks.procs import run_device, thread_cpu_s

    trace = prompts_file.with_name(f"trace_{policy}_{pipeline}{''.join(extra)}.jsonl")
    args = ["--edge", address, "--threads", "1", "--prompts-file", str(prompts_file), "--max-new-tokens", str(max_new)]
    args += ["--policy", policy, "--pipeline", pipeline, "--trace", str(trace), *extra]
    args += ["--drafter", drafter] if drafter else []
    cpu0 = thread_cpu_s(edge_pid) if edge_pid else {}
    every = run_device(args)
    cpu1 = thread_cpu_s(edge_pid) if edge_pid else {}
    records = every[1:]
    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    out = {
        "tokens": sum(r["n_tokens"] for r in records),
        "seconds": sum(r["elapsed_s"] for r in records),
        "rounds": sum(r["rounds"] for r in records),
        "t_round_s": [r["t_round_s"] for r in rows if r["prompt_index"] > 0],
        "token_ids": [r["token_ids"] for r in records],
    }
    if cpu0 and cpu1:
        # Never below 0: "other" is the process total less two threads read just before it, so
        # one clock tick can move between them from one reading to the next.
        out["edge_cpu_s"] = {kind: max(0.0, cpu1[kind] - cpu0[kind]) for kind in cpu1}
        out["edge_cpu_tokens"] = sum(r["n_tokens"] for r in every)
    return out


def model_thread_alone(target: Any, prompts: list[list[int]], max_new: int) -> dict[str, Any]:
    """What the edge's model thread does for fixed-0, alone in this process: per prompt a session
    admitted to a registry, its prefill, then one empty block per token through
    `gelato.edge.verifier.verify_batch` (the KV pool, checks, acceptance) until eos or `max_new`;
    no server, no event loop, no other thread. Tokens, seconds and this thread's CPU seconds over the
    prompts (after a warm-up on the first)."""
    from gelato.edge.sessions import SessionRegistry
    from gelato.edge.verifier import Accepted, verify_batch
    from gelato.types import DraftBlock, SamplingParams

    eos = set(target.eos_token_ids)
    registry = SessionRegistry(max_sessions=1, kv_budget_bytes=0, max_draft_tokens=1)

    def decode(prompt: list[int]) -> int:
        session = registry.admit(target, SamplingParams(), list(prompt), max_new)
        session.prefill()
        n = 0
        while n < max_new:
            (outcome,) = verify_batch([(session, DraftBlock(round=session.rounds, ids=()))], [True])
            assert isinstance(outcome, Accepted), outcome
            n += 1
            if outcome.next_token in eos:
                break
        registry.release(session.session_id)
        return n

    decode(prompts[0])  # warm-up
    tokens, t0, c0 = 0, time.perf_counter(), time.thread_time()
    for p in prompts:
        tokens += decode(p)
    return {"tokens": tokens, "seconds": time.perf_counter() - t0, "cpu_s": time.thread_time() - c0}


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
    if all("edge_cpu_s" in r for r in runs):  # the edge's CPU per token (warm-ups included), by thread
        cpu_tokens = sum(r["edge_cpu_tokens"] for r in runs)
        out["edge_cpu_ms_per_token"] = {
            kind: 1e3 * sum(r["edge_cpu_s"][kind] for r in runs) / cpu_tokens for kind in runs[0]["edge_cpu_s"]
        }
    if "cpu_s" in runs[0]:
        out["cpu_ms_per_token"] = 1e3 * sum(r["cpu_s"] for r in runs) / tokens
    return out
