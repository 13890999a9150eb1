"""Per-token (entropy, agreement) traces and a cost profile of a drafter/target pair, for the
trace-driven simulator (`gelato.benchmarks.simulate`).

Contract: `python -m gelato.benchmarks.traces [--n 50] [--max-new-tokens 256] [--target M --drafter M]
[--data FILE] [--reps 30] [--check-k 4 --check-prompts 10] --out FILE` writes one JSON object:

    {"format": "gelato-traces/1", "pair": {...}, "data": {...},
     "prompts": [{"line", "prompt_len", "n", "stop", "entropy": [H_t], "agree": [0|1], "drafter_eos": [t]}],
     "costs": {"threads", "context_tokens", "draft_s": {"min": {k: s}, "median": {k: s}, "intercept",
               "per_token"}, "verify_s": {"min": {k: s}, "median": {k: s}}, "bytes": {"up_base",
               "up_per_token", "down"}},
     "check": {"k", "prompts", "mispredicted_rounds"}, "machine": "...", "recorded_s": ...}

Per prompt (GSM8K test lines, chat-templated by `gelato.models.encode_prompt`): the target's greedy
output of `n` tokens (eos included when produced), generated with `gelato.edge.verifier.TargetSession`
and empty draft blocks (fixed-0: the edge decoding alone); then ONE teacher-forced drafter forward
over prompt + output. At output position t, `entropy[t]` is the drafter's softmax entropy (nats,
3 decimals) before token t, `agree[t]` whether its argmax equals the target's token, and
`drafter_eos` lists the t where that argmax is an eos token (the real drafter ends a block there).

Why this is exact for greedy decoding: a round that starts after t accepted tokens drafts from the
true prefix; its i-th draft is the drafter's argmax after the true prefix + the earlier drafts, and
as long as those were accepted they ARE the true tokens, i.e. the teacher-forced position. So a
block of k drafts starting at t accepts the number of leading agrees from t, capped at k. Only the
entropies of drafts after a block's first rejection differ (the real drafter continues on its own
token); those drafts are rejected whatever their entropy. `check` confirms it: the real
Drafter + TargetSession loop at fixed K on the first `--check-prompts` prompts, round by round
against the trace's prediction (only float rounding between a cached and an uncached forward
could make them differ).

Costs, measured here with one torch thread at a realistic context (a prompt + 128 output tokens),
every k interleaved within each of `--reps` repetitions, minimum and median kept (the minimum is
the cost without interference from other processes on a shared machine): `draft_s`:
`Drafter.draft(k)` (argmax + entropy per token) for several k, and a line `intercept +
per_token·k` through the minima; `verify_s`: `TargetSession.verify` of a k-draft block, k = 0..32
(the edge's default block limit); `bytes`: wire bytes up (`wire_bytes(encode_block(...))`, a line
`base + per_token·k` over real blocks) and down (a typical verdict).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gelato.benchmarks.procs import machine
from gelato.device.drafter import Drafter
from gelato.device.energy import wire_bytes
from gelato.edge.verifier import TargetSession
from gelato.entropy import entropy_nats
from gelato.models import LoadedModel, default_model_path, encode_prompt, load_model
from gelato.tiny.train import gsm8k_file
from gelato.types import DraftBlock, SamplingParams, Verdict
from gelato.wire import encode_block, encode_verdict

GREEDY = SamplingParams()
FORMAT = "gelato-traces/1"
VERIFY_KS = range(33)  # 0..32: the edge's default --max-draft-tokens
DRAFT_KS = (1, 2, 4, 8, 16, 32)


def target_greedy(target: LoadedModel, prompt: list[int], max_new: int) -> tuple[list[int], str]:
    """The target's greedy output through the edge's own session code, one empty block a round."""
    session = TargetSession("trace", target, GREEDY, prompt)
    session.prefill()
    out: list[int] = []
    eos = set(target.eos_token_ids)
    while len(out) < max_new:
        _, nxt = session.verify(DraftBlock(round=session.rounds, ids=()))
        out.append(nxt)
        if nxt in eos:
            return out, "eos"
    return out, "max_new_tokens"


@torch.inference_mode()
def teacher_forced(drafter: LoadedModel, prompt: list[int], out: list[int]) -> dict[str, Any]:
    """One drafter forward over prompt + output: entropy and agreement at every output position."""
    ids = torch.tensor([prompt + out[:-1]], dtype=torch.long)
    logits = drafter.model(input_ids=ids).logits[0, len(prompt) - 1 :, : drafter.vocab_size].float()
    eos = set(drafter.eos_token_ids)
    argmax = logits.argmax(dim=-1).tolist()
    return {
        "entropy": [round(entropy_nats(row), 3) for row in logits],
        "agree": [int(a == t) for a, t in zip(argmax, out, strict=True)],
        "drafter_eos": [t for t, a in enumerate(argmax) if a in eos],
    }


def leading_agrees(agree: list[int], start: int, k: int) -> int:
    """Accepted drafts of a k-draft block starting at output position `start` (greedy)."""
    a = 0
    while a < k and start + a < len(agree) and agree[start + a]:
        a += 1
    return a


def check_replay(drafter: Drafter, target: LoadedModel, prompt: list[int], trace: dict[str, Any], k: int) -> int:
    """Run the real fixed-K loop on one prompt; count rounds whose acceptance the trace mispredicts."""
    drafter.start(prompt)
    session = TargetSession("check", target, GREEDY, prompt)
    session.prefill()
    pos, bad, n = 0, 0, trace["n"]
    while pos < n:
        block = drafter.draft(min(k, n - pos - 1), session.rounds, None, target.eos_token_ids)
        a, nxt = session.verify(block)
        drafter.apply(block, Verdict(round=block.round, n_accepted=a, next_token=nxt))
        predicted = leading_agrees(trace["agree"], pos, block.k)
        bad += int(a != predicted)
        pos += a + 1
    return bad


def fit_linear(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b·x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - b * mx, b


def summarize(samples: dict[int, list[float]]) -> dict[str, dict[str, float]]:
    """Per k: the minimum (the cost without interference from other processes on a shared
    machine: the statistic the simulator uses) and the median."""
    return {
        "min": {str(k): min(v) for k, v in samples.items()},
        "median": {str(k): statistics.median(v) for k, v in samples.items()},
    }


def measure_draft(drafter: Drafter, prefix: list[int], reps: int) -> dict[str, Any]:
    """Drafting time vs k (argmax + entropy per token). Every rep starts from the same context with
    one token pending, as after a rejected round; k values are interleaved so drift hits all."""
    samples: dict[int, list[float]] = {k: [] for k in DRAFT_KS}
    drafter.start(prefix)
    drafter.draft(1, 0)  # prefill outside the timings
    for _ in range(reps):
        for k in DRAFT_KS:
            drafter.seq.truncate(len(prefix) - 1)
            drafter.seq.tokens.append(prefix[-1])
            samples[k].append(drafter.draft(k, 0).draft_s)
    stats = summarize(samples)
    a, b = fit_linear([float(k) for k in DRAFT_KS], list(stats["min"].values()))
    return {**stats, "intercept": a, "per_token": b}


def measure_verify(target: LoadedModel, prefix: list[int], ids: list[int], reps: int) -> dict[str, Any]:
    """`TargetSession.verify` seconds for blocks of k real tokens, k interleaved, same context."""
    session = TargetSession("cost", target, GREEDY, prefix)
    session.prefill()
    base = len(prefix)
    samples: dict[int, list[float]] = {k: [] for k in VERIFY_KS}
    for _ in range(reps):
        for k in VERIFY_KS:
            block = DraftBlock(round=session.rounds, ids=tuple((ids * (k // max(1, len(ids)) + 1))[:k]))
            t0 = time.perf_counter()
            session.verify(block)
            samples[k].append(time.perf_counter() - t0)
            session.seq.truncate(base - 1)  # KV for all but the last prefix token, as after prefill
            session.seq.tokens.append(prefix[-1])
    return summarize(samples)


def measure_bytes(outputs: list[list[int]]) -> dict[str, float]:
    """Wire bytes of greedy blocks (real token ids, round numbers of a long generation) and verdicts."""
    ks, ups = [], []
    for out in outputs:
        for k in range(0, 17):
            for start in range(0, max(1, len(out) - k), 37):
                block = DraftBlock(round=start // 3, ids=tuple(out[start : start + k]))
                ks.append(float(block.k))
                ups.append(float(wire_bytes(encode_block(block).ByteSize())))
    a, b = fit_linear(ks, ups)
    verdict = Verdict(round=40, n_accepted=2, next_token=1000, queue_ms=0.01, compute_ms=3.1)
    return {"up_base": a, "up_per_token": b, "down": float(wire_bytes(encode_verdict(verdict).ByteSize()))}


def measure_costs(
    drafter: Drafter, target: LoadedModel, prompt: list[int], outputs: list[list[int]], reps: int
) -> dict[str, Any]:
    ctx_prefix = prompt + outputs[0][:128]
    return {
        "threads": torch.get_num_threads(),
        "context_tokens": len(ctx_prefix),
        "draft_s": measure_draft(drafter, ctx_prefix, reps),
        "verify_s": measure_verify(target, ctx_prefix, outputs[0][128:] or outputs[0], reps),
        "bytes": measure_bytes(outputs),
    }


def record(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    target = load_model(args.target, "target", "float32", "cpu")
    drafter_m = load_model(args.drafter, "drafter", "float32", "cpu")
    path = gsm8k_file("test", args.data)
    lines = path.read_text().splitlines()[: args.n]
    prompts = [encode_prompt(target.tokenizer, json.loads(line)["question"]) for line in lines]
    records, outputs = [], []
    for i, prompt in enumerate(prompts):
        out, stop = target_greedy(target, prompt, args.max_new_tokens)
        rec = {"line": i + 1, "prompt_len": len(prompt), "n": len(out), "stop": stop}
        records.append(rec | teacher_forced(drafter_m, prompt, out))
        outputs.append(out)
        print(f"prompt {i + 1}/{len(prompts)}: {len(out)} tokens ({stop})", flush=True)
    drafter = Drafter(drafter_m, GREEDY)
    checked = min(args.check_prompts, len(prompts))
    bad = sum(check_replay(drafter, target, prompts[i], records[i], args.check_k) for i in range(checked))
    costs = measure_costs(drafter, target, prompts[0], outputs, args.reps)
    return {
        "format": FORMAT,
        "pair": {
            "target": Path(target.name).name if args.target is None else args.target,
            "drafter": Path(drafter_m.name).name if args.drafter is None else args.drafter,
            "embedded": args.target is None and args.drafter is None,
            "dtype": "float32",
            "device": "cpu",
            "context_limit": min(target.context_limit, drafter_m.context_limit),
        },
        "data": {"file": path.name, "lines": len(prompts), "max_new_tokens": args.max_new_tokens, "greedy": True},
        "prompts": records,
        "costs": costs,
        "check": {"k": args.check_k, "prompts": checked, "mispredicted_rounds": bad},
        "machine": machine(),
        "recorded_s": round(time.perf_counter() - t_start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gelato.benchmarks.traces", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help=f"default: the embedded {default_model_path('target')}")
    p.add_argument("--drafter", default=None, help="default: the embedded drafter")
    p.add_argument("--data", type=Path, default=None, help="GSM8K-style JSONL (default: the test split)")
    p.add_argument("--n", type=int, default=50, help="questions (first N lines)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=30, help="timing repetitions per point (median)")
    p.add_argument("--check-k", type=int, default=4, help="K of the real-loop replay check")
    p.add_argument("--check-prompts", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.n < 1 or args.max_new_tokens < 2 or args.reps < 1:
        p.error("--n must be >= 1, --max-new-tokens >= 2, --reps >= 1")
    torch.set_num_threads(1)  # the cost profile is one device core / one edge thread
    result = record(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, separators=(",", ":")) + "\n")
    c, bad = result["costs"], result["check"]["mispredicted_rounds"]
    print(
        f"wrote {args.out}: {sum(r['n'] for r in result['prompts'])} tokens from {len(result['prompts'])} prompts; "
        f"draft {c['draft_s']['per_token'] * 1e3:.3f} ms/token, verify k=0 {c['verify_s']['min']['0'] * 1e3:.3f} ms, "
        f"k=8 {c['verify_s']['min']['8'] * 1e3:.3f} ms (min over reps); replay check: {bad} mispredicted rounds; "
        f"{result['recorded_s']} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
