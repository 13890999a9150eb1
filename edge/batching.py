"""One target forward over ragged rows: sessions with different cached lengths and block sizes.

Contract: `batched_forward(model, vocab, rows)` takes `(KVSequence, new_ids)` pairs, appends the
ids to each sequence, runs ONE forward over every row's uncached tokens and returns each row's
logits `[n_i, vocab]` (float32); afterwards each sequence's cache holds KV for all its tokens,
exactly as `KVSequence.forward` would have left it. Model thread only.

How (SPEC §9): each row's cache is left-padded to the longest one and stacked; the new tokens are
right-padded; a 2D attention mask hides both paddings and explicit per-row `position_ids` continue
each row from its own length (Qwen2 would otherwise use `arange + past_len` for every row). Per-row
logits match the unbatched forward to float rounding (~1e-6 in fp32).

Status: the measured alternative. The edge runs `edge/kv_pool.py` instead, which
`benchmarks/kv_layouts.py` found 1.5× / 2× faster at 8 / 16 rows on CPU: stacking copies every row's past KV
per layer (left-pad + cat, then the cache's own cat), the pool writes only new tokens. Kept because
that benchmark compares the two on every machine it runs on, and as the reference layout for
`DynamicCache` users (it needs no preallocation and no custom cache).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from gelato.kv import KVSequence


def batched_forward(model: Any, vocab_size: int, rows: list[tuple[KVSequence, tuple[int, ...]]]) -> list[torch.Tensor]:
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

    cache = DynamicCache(config=model.config)
    if p_max > 0:
        for layer in range(model.config.num_hidden_layers):
            keys = [_left_pad(seq, layer, "keys", p_max) for seq in seqs]
            values = [_left_pad(seq, layer, "values", p_max) for seq in seqs]
            cache.update(torch.cat(keys), torch.cat(values), layer)

    input_ids = torch.zeros(batch, n_max, dtype=torch.long, device=device)
    mask = torch.zeros(batch, p_max + n_max, dtype=torch.long, device=device)
    positions = torch.zeros(batch, n_max, dtype=torch.long, device=device)
    for i, (c, toks) in enumerate(zip(past, pending, strict=True)):
        input_ids[i, : len(toks)] = torch.tensor(toks, device=device)
        mask[i, p_max - c : p_max + len(toks)] = 1
        positions[i] = c + torch.arange(n_max, device=device)

    with torch.inference_mode():
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
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


def _left_pad(seq: KVSequence, layer: int, which: str, length: int) -> torch.Tensor:
    """This row's cached keys or values for `layer`, left-padded with zeros to `length`."""
    if seq.cached == 0:
        ref = _shape_ref(seq)
        return torch.zeros(1, ref[0], length, ref[1], dtype=ref[2], device=seq.device)
    t = getattr(seq.cache.layers[layer], which)
    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t


def _shape_ref(seq: KVSequence) -> tuple[int, int, torch.dtype]:
    cfg = seq.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_key_value_heads, head_dim, next(seq.model.parameters()).dtype
