"""Which batched-KV layout verifies faster: stacked per-session caches or a slot-based pool?

Contract: `python -m benchmarks.kv_layouts [--target DIR] [--rows 1,2,4,8,16] [--k 4]` builds ragged
batches (prefix lengths spread over `--min-len..--max-len`, one K-token block per row) and times,
per batch size, the median of `--reps`:
- `stacked`: `edge.batching.batched_forward` over per-session `DynamicCache`s (the alternative);
- `pool`: `edge.kv_pool.KVPool.forward` (what the edge runs) with the batch in consecutive slots;
- `pool_gather`: the same with every other slot (one gather per layer);
- `raw`: a plain forward on the same padded tokens over an already stacked cache (the floor).
It checks each row's logits against an unbatched forward and prints/writes JSON + markdown.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.procs import machine
from edge.batching import batched_forward
from edge.kv_pool import KVPool
from gelato.kv import KVSequence
from gelato.models import LoadedModel, default_model_path, load_model


def _timed(fn: Any, reps: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(target: LoadedModel, prefixes: list[list[int]], block: list[int], reps: int) -> dict[str, Any]:
    from transformers import DynamicCache

    model, vocab, b = target.model, target.vocab_size, len(prefixes)
    # Reference: each row alone.
    ref = []
    for p in prefixes:
        s = KVSequence(model, vocab, p)
        s.prefill(len(p))
        ref.append(s.forward(block))

    seqs = []
    for p in prefixes:
        s = KVSequence(model, vocab, p)
        s.prefill(len(p))
        seqs.append(s)

    def stacked() -> list[torch.Tensor]:
        out = batched_forward(model, vocab, [(s, tuple(block)) for s in seqs])
        for s, p in zip(seqs, prefixes, strict=True):
            s.truncate(len(p))  # roll back so every repetition verifies the same block
        return out

    def pool_run(stride: int) -> tuple[float, list[torch.Tensor]]:
        pool = KVPool(model, vocab, slots=b * stride, context=max(len(p) for p in prefixes) + len(block) + 1)
        slots = list(range(0, b * stride, stride))
        for slot, p in zip(slots, prefixes, strict=True):
            pool.forward([(slot, 0, p)], last_only=True)
        rows = [(slot, len(p), block) for slot, p in zip(slots, prefixes, strict=True)]
        return _timed(lambda: pool.forward(rows), reps)

    t_stacked, out_stacked = _timed(stacked, reps)
    t_pool, out_pool = pool_run(1)
    t_gather, out_gather = pool_run(2)

    p_max = max(len(p) for p in prefixes)
    cache = DynamicCache(config=model.config)
    for layer in range(model.config.num_hidden_layers):
        kv: list[Any] = [s.cache.layers[layer] for s in seqs]
        pad = [(0, 0, p_max - s.cached, 0) for s in seqs]
        cache.update(
            torch.cat([torch.nn.functional.pad(x.keys, d) for x, d in zip(kv, pad, strict=True)]),
            torch.cat([torch.nn.functional.pad(x.values, d) for x, d in zip(kv, pad, strict=True)]),
            layer,
        )
    ids = torch.tensor([block] * b)
    mask = torch.ones(b, p_max + len(block), dtype=torch.long)
    pos = torch.stack([len(p) + torch.arange(len(block)) for p in prefixes])

    def raw() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        cache.crop(-len(block))  # drop the block again: the next repetition starts from the same cache

    t_raw, _ = _timed(raw, reps)

    def err(outs: list[torch.Tensor]) -> float:
        return max(float((o - r).abs().max()) for o, r in zip(outs, ref, strict=True))

    return {
        "rows": b,
        "stacked_ms": round(t_stacked * 1e3, 3),
        "pool_ms": round(t_pool * 1e3, 3),
        "pool_gather_ms": round(t_gather * 1e3, 3),
        "raw_ms": round(t_raw * 1e3, 3),
        "max_abs_logit_err": {"stacked": err(out_stacked), "pool": err(out_pool), "pool_gather": err(out_gather)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target checkpoint (default: the embedded target)")
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--min-len", type=int, default=60)
    p.add_argument("--max-len", type=int, default=300)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    target = load_model(args.target, "target", args.dtype, args.device)
    rng = random.Random(0)
    levels = []
    for b in [int(x) for x in args.rows.split(",")]:
        lens = [rng.randint(args.min_len, args.max_len) for _ in range(b)]
        prefixes = [[rng.randrange(target.vocab_size) for _ in range(n)] for n in lens]
        block = [rng.randrange(target.vocab_size) for _ in range(args.k + 1)]  # last token + K drafts
        row = measure(target, prefixes, block, args.reps)
        levels.append(row)
        print(json.dumps(row), flush=True)
    meta = {
        "target": args.target or str(default_model_path("target")),
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "k": args.k,
        "prefix_lengths": f"{args.min_len}..{args.max_len}",
        "machine": machine(),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "levels": levels}, indent=2) + "\n")
        lines = [
            f"KV layouts, {meta['machine']}, {args.dtype} on {args.device}, {args.threads} thread(s), K={args.k}",
            "",
            "| rows | stacked ms | pool ms | pool (gather) ms | raw forward ms | stacked/raw | pool/raw |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in levels:
            lines.append(
                f"| {r['rows']} | {r['stacked_ms']} | {r['pool_ms']} | {r['pool_gather_ms']} | {r['raw_ms']} "
                f"| {r['stacked_ms'] / r['raw_ms']:.2f} | {r['pool_ms'] / r['raw_ms']:.2f} |"
            )
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
