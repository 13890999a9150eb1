"""Which batched-KV layout verifies faster: stacked per-session caches or a slot-based pool?

Contract: `python -m gelato.benchmarks.kv_layouts [--target DIR] [--rows 1,2,4,8,16] [--k 4]` builds ragged
batches (prefix lengths spread over `--min-len..--max-len`, one K-token block per row) and times,
per batch size, the median of `--reps`:
- `stacked`: `batched_forward` below over per-session `DynamicCache`s (the alternative);
- `pool`: `gelato.edge.kv_pool.KVPool.forward` (what the edge runs) with the batch in consecutive slots;
- `pool_gather`: the same with every other slot (one gather per layer);
- `raw`: a plain forward on the same padded tokens over an already stacked cache (the floor).
It checks each row's logits against an unbatched forward and prints/writes JSON + markdown
(the committed run: `benchmarks/results/kv_layouts_cpu.{json,md}`).

The stacked layout (`batched_forward`, `stacked_cache`) is the measured alternative to the edge's
pool, not on any production path: it lives here, with the benchmark that compares the two on every
machine it runs on, and as the reference layout for `DynamicCache` users (it needs no preallocation
and no custom cache). `batched_forward(model, vocab, rows)` takes `(KVSequence, new_ids)` pairs,
appends the ids to each sequence, runs ONE forward over every row's uncached tokens and returns each
row's logits `[n_i, vocab]` (float32); afterwards each sequence's cache holds KV for all its tokens,
exactly as `KVSequence.forward` would have left it. How: each row's cache is left-padded
to the longest one and stacked (`stacked_cache`); the new tokens are right-padded; a 2D attention
mask hides both paddings and explicit per-row `position_ids` continue each row from its own length
(Qwen2 would otherwise use `arange + past_len` for every row). Per-row logits match the unbatched
forward to float rounding. Stacking copies every row's past KV per layer (left-pad + cat, then the
cache's own cat); the pool writes only the new tokens.
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
import torch.nn.functional as F

from gelato.benchmarks.procs import machine
from gelato.edge.kv_pool import KVPool
from gelato.kv import KVSequence, cache_kwarg
from gelato.models import LoadedModel, default_model_path, load_model


def stacked_cache(model: Any, seqs: list[Any], length: int) -> Any:
    """One `DynamicCache` holding every sequence's cached KV, left-padded with zeros to `length`
    positions and stacked along the batch: `[len(seqs), kv_heads, length, head_dim]` per layer."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if length <= 0:
        return cache
    for layer in range(model.config.num_hidden_layers):
        keys, values = zip(*(_left_pad(seq, layer, length) for seq in seqs), strict=True)
        cache.update(torch.cat(keys), torch.cat(values), layer)
    return cache


def _left_pad(seq: Any, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This row's cached keys and values of `layer`, left-padded with zeros to `length`."""
    if seq.cached == 0:
        cfg = seq.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(seq.model.parameters()).dtype
        zeros = torch.zeros(1, cfg.num_key_value_heads, length, head_dim, dtype=dtype, device=seq.device)
        return zeros, zeros
    k, v = seq.layer_kv(layer)
    pad = (0, 0, length - k.shape[-2], 0)
    return (F.pad(k, pad), F.pad(v, pad)) if k.shape[-2] < length else (k, v)


def batched_forward(model: Any, vocab_size: int, rows: list[tuple[KVSequence, tuple[int, ...]]]) -> list[torch.Tensor]:
    """The stacked layout's batched verify forward (see the module docstring); model thread only."""
    if len(rows) == 1:  # nothing to align: the plain path, no copies
        seq, ids = rows[0]
        return [seq.forward(ids)]
    from transformers import DynamicCache

    seqs = [seq for seq, _ in rows]
    for seq, ids in rows:
        seq.tokens.extend(ids)
    past = [seq.cached for seq in seqs]
    pending = [seq.tokens[c:] for seq, c in zip(seqs, past, strict=True)]
    p_max, n_max = max(past), max(len(p) for p in pending)
    device = seqs[0].device
    batch = len(rows)
    cache = stacked_cache(model, seqs, p_max)

    input_ids = torch.zeros(batch, n_max, dtype=torch.long, device=device)
    mask = torch.zeros(batch, p_max + n_max, dtype=torch.long, device=device)
    positions = torch.zeros(batch, n_max, dtype=torch.long, device=device)
    for i, (c, toks) in enumerate(zip(past, pending, strict=True)):
        input_ids[i, : len(toks)] = torch.tensor(toks, device=device)
        mask[i, p_max - c : p_max + len(toks)] = 1
        positions[i] = c + torch.arange(n_max, device=device)

    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_kwarg(model): cache},
        )
    logits = out.logits[:, :, :vocab_size].float()
    results = []
    for i, (seq, c, toks) in enumerate(zip(seqs, past, pending, strict=True)):
        own = DynamicCache(config=model.config)
        layers: list[Any] = list(cache.layers)
        span = slice(p_max - c, p_max + len(toks))
        for layer, kv in enumerate(layers):
            # Views, not copies: the row's next forward (or its rollback) replaces them anyway, so the
            # batched tensor lives at most until every row has moved on.
            own.update(kv.keys[i : i + 1, :, span], kv.values[i : i + 1, :, span], layer)
        seq.cache = own
        results.append(logits[i, : len(toks)])
    return results


def _timed(fn: Any, reps: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(target: LoadedModel, prefixes: list[list[int]], block: list[int], reps: int) -> dict[str, Any]:
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
    cache = stacked_cache(model, seqs, p_max)
    ids = torch.tensor([block] * b)
    mask = torch.ones(b, p_max + len(block), dtype=torch.long)
    pos = torch.stack([len(p) + torch.arange(len(block)) for p in prefixes])

    def raw() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kwarg(model): cache})
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
