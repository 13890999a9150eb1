"""Quality of a drafter/target pair on GSM8K test questions.

Contract: `python -m gelato.benchmarks.tiny_quality [--n 50] [--max-new-tokens 128] [--k 4]` runs greedy
speculative decoding in one process through the project's own Drafter and TargetSession (the same
code the two processes run; the transport does not change acceptance) and prints/writes:
acceptance per drafted token at K (and at K = 1 and 8), AUC of the drafter's entropy as a predictor
of rejection (tokens after a block's first rejection are unobserved and excluded), GSM8K answer
accuracy, three sample generations, parameter counts, file sizes and per-token decode latency of
each model (1 thread, fp32). GSM8K is read from `--data` (or `--gsm8k`) or `$GELATO_GSM8K_DIR`, never copied.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from gelato.device.drafter import Drafter
from gelato.device.generate import Limits, local_verifier, speculative_generate
from gelato.device.policy import FixedK
from gelato.edge.verifier import TargetSession
from gelato.kv import KVSequence
from gelato.models import LoadedModel, default_model_path, encode_prompt, load_model
from gelato.tiny.train import gsm8k_file
from gelato.types import SamplingParams

GREEDY = SamplingParams()


def generate(drafter: Drafter, target: LoadedModel, prompt: list[int], k: int, max_new: int) -> dict[str, Any]:
    """Greedy speculative decoding of one prompt through the device's round loop, verified in
    process; per-token (entropy, accepted) observations."""
    session = TargetSession("q", target, GREEDY, prompt)
    session.prefill()
    limits = Limits(max_new, target.context_limit, max(k, 1), target.eos_token_ids)
    res = asyncio.run(speculative_generate(drafter, local_verifier(session), FixedK(k), prompt, limits))
    # Observed: the accepted drafts and the first rejected one; later ones are unobserved.
    obs = [(h, i < t.accepted) for t in res.stats.rounds_log for i, h in enumerate(t.entropies[: t.accepted + 1])]
    return {"ids": res.token_ids, "drafted": res.stats.drafted, "accepted": res.stats.accepted, "obs": obs}


def auc_rejection(obs: list[tuple[float, bool]]) -> float:
    """P(entropy of a rejected token > entropy of an accepted one), ties counted half."""
    ent = torch.tensor([h for h, _ in obs], dtype=torch.float64)
    rejected = torch.tensor([not acc for _, acc in obs])
    ranks = torch.empty_like(ent)
    order = torch.argsort(ent)
    ranks[order] = torch.arange(1, len(ent) + 1, dtype=torch.float64)
    for value in torch.unique(ent):  # average ranks over ties
        tie = ent == value
        ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = int(rejected.sum()), int((~rejected).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[rejected].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def decode_latency_ms(loaded: LoadedModel, steps: int = 200) -> float:
    seq = KVSequence(loaded.model, loaded.vocab_size, list(range(1, 65)))
    seq.prefill(64)
    t0 = time.perf_counter()
    for i in range(steps):
        seq.forward([1 + i % 50])
    return (time.perf_counter() - t0) / steps * 1e3


def final_number(text: str) -> str | None:
    m = re.search(r"####\s*([-\d,\.]+)", text)
    return m.group(1).replace(",", "").rstrip(".") if m else None


def model_facts(loaded: LoadedModel) -> dict[str, Any]:
    path = Path(loaded.name) / "model.safetensors"
    return {
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "file_bytes": path.stat().st_size if path.exists() else None,
        "decode_ms_per_token": round(decode_latency_ms(loaded), 3),
        "layers": loaded.model.config.num_hidden_layers,
        "hidden": loaded.model.config.hidden_size,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tiny_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=default_model_path("target"))
    p.add_argument("--drafter", default=default_model_path("drafter"))
    p.add_argument("--data", "--gsm8k", dest="gsm8k", type=Path, default=None, help="GSM8K test JSONL")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--also-k", default="1,8", help="extra K values for acceptance only")
    p.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    target = load_model(args.target, "target", "float32", "cpu")
    drafter_m = load_model(args.drafter, "drafter", "float32", "cpu")
    drafter = Drafter(drafter_m, GREEDY)
    path = gsm8k_file("test", args.gsm8k)
    records = [json.loads(line) for line in path.read_text().splitlines()[: args.n]]
    prompts = [encode_prompt(target.tokenizer, r["question"]) for r in records]

    t0 = time.perf_counter()
    runs = [generate(drafter, target, pr, args.k, args.max_new_tokens) for pr in prompts]
    elapsed = time.perf_counter() - t0
    texts = [target.tokenizer.decode(r["ids"], skip_special_tokens=True) for r in runs]
    correct = sum(final_number(t) == final_number(r["answer"]) for t, r in zip(texts, records, strict=True))
    drafted = sum(r["drafted"] for r in runs)
    obs = [o for r in runs for o in r["obs"]]
    result: dict[str, Any] = {
        "questions": len(records),
        "max_new_tokens": args.max_new_tokens,
        "k": args.k,
        "acceptance_per_drafted_token": {str(args.k): round(sum(r["accepted"] for r in runs) / drafted, 4)},
        "entropy_auc_rejection": round(auc_rejection(obs), 4),
        "gsm8k_accuracy": round(correct / len(records), 4),
        "ending_with_answer": round(sum(final_number(t) is not None for t in texts) / len(texts), 4),
        "generated_tokens": sum(len(r["ids"]) for r in runs),
        "in_process_s": round(elapsed, 1),
    }
    for k in (int(x) for x in args.also_k.split(",") if x):
        extra = [generate(drafter, target, pr, k, args.max_new_tokens) for pr in prompts]
        result["acceptance_per_drafted_token"][str(k)] = round(
            sum(r["accepted"] for r in extra) / max(1, sum(r["drafted"] for r in extra)), 4
        )
    result["target"] = model_facts(target)
    result["drafter"] = model_facts(drafter_m)
    # Generations only, by test-set line: GSM8K text itself is never copied into the project.
    result["samples"] = [{"gsm8k_test_line": i + 1, "generation": t} for i, t in enumerate(texts[:3])]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
