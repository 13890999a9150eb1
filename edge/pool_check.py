"""A load-time check that the KV pool serves this target as the target computes itself.

Contract: `check_pool(loaded)` (model thread, once per load, after `pool_model`) runs a short
probe through a two-slot `KVPool` — a prefill per row, then one ragged batched step over both rows
(different cached lengths and query counts: the per-row mask, positions and padding), then one
token on a row alone (the step that passes no mask) — and compares every
logit row with the model's own uncached forward over the same tokens. `ModelLoadError` when the
pool cannot run the model at all (a config without what the pool reads, attention that does not
write through the cache's `update`, keys and values of different widths) or when its logits
differ beyond the dtype's rounding (a mask or positions the model reads its own way): such a
target would otherwise load, report SERVING, and then fail or change every session's output.

Why here and not in `KVPool`: the probe needs the pooled forward, and a few tiny forwards at load
cost nothing next to loading the weights; sessions built on a model the server did not load (a
benchmark's reference) skip it.
"""

from __future__ import annotations

import torch

from gelato.edge.kv_pool import KVPool, PooledSequence, pooled_forward
from gelato.models import LoadedModel, ModelLoadError, out_of_memory

# Largest |pool − own| / max|own| over the probe's logits that rounding explains: float32 agrees to
# ~1e-6 here; half precision reorders sums (the pool's explicit mask, a batch of 2 rows) and moves
# logits by a few ulps of their scale. A wrong mask or position moves them by a large fraction.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 5e-2
PROBE_IDS = (5, 17, 3, 11, 8, 2, 13)  # reduced modulo the vocabulary


def probe_rows(vocab_size: int, context_limit: int) -> tuple[list[int], list[int]]:
    """Two rows' tokens, of different lengths (the ragged step of the probe), within the context."""
    ids = [i % vocab_size for i in PROBE_IDS][: max(2, context_limit)]
    return ids, (ids[2:5] if len(ids) >= 5 else ids)[::-1]


def own_logits(model: torch.nn.Module, ids: list[int], device: torch.device) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    return out.logits[0].float()


def pool_logits(loaded: LoadedModel, rows: tuple[list[int], list[int]]) -> list[torch.Tensor]:
    """Each row's logits through the pool: prefills (4 and 2 tokens of the usual rows), then the
    rest of both rows (3 and 1 more) in one step, then (where the context allows: `rows[0]` then
    has one token more) a token on the first row alone, one query at the end of every row: the
    step that runs with no mask (`KVPool.forward`; every lone streamed token takes it)."""
    pool = KVPool(loaded.model, loaded.vocab_size, slots=2, context=16, max_context=loaded.context_limit)
    seqs = [PooledSequence(pool), PooledSequence(pool)]
    cuts = [max(1, len(rows[0]) - 3), max(1, len(rows[1]) - 1)]
    try:
        with torch.inference_mode():
            first = [seq.forward(row[:cut]) for seq, row, cut in zip(seqs, rows, cuts, strict=True)]
            step = pooled_forward([(seq, tuple(row[cut:])) for seq, row, cut in zip(seqs, rows, cuts, strict=True)])
            out = [torch.cat([a, b]).float() for a, b in zip(first, step, strict=True)]
            if len(rows[0]) < loaded.context_limit:
                rows[0].append(rows[1][0])
                out[0] = torch.cat([out[0], seqs[0].forward(rows[0][-1:]).float()])
        return out
    finally:
        for seq in seqs:
            seq.release()


def check_pool(loaded: LoadedModel) -> None:
    """`ModelLoadError` unless the KV pool reproduces the target's own logits (module docstring)."""
    rows = probe_rows(loaded.vocab_size, loaded.context_limit)
    try:
        got = pool_logits(loaded, rows)
    except Exception as exc:  # whatever the architecture raises: the operator gets its name and text
        if out_of_memory(exc):  # no room for the probe's few tokens: the load's own message says so
            raise
        raise ModelLoadError(
            f"target {loaded.name!r}: the edge's KV pool cannot run this model "
            f"({type(exc).__name__}: {exc}); GELATO serves decoder-only models whose attention "
            "writes keys and values of one width through the cache's update()"
        ) from exc
    dtype = next(loaded.model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, HALF_TOLERANCE)
    for ids, pooled in zip(rows, got, strict=True):
        own = own_logits(loaded.model, ids, pooled.device)[:, : pooled.shape[-1]]
        error = float((pooled - own).abs().max() / own.abs().max().clamp_min(1e-6))
        if not error <= tolerance:  # also NaN
            raise ModelLoadError(
                f"target {loaded.name!r}: through the edge's KV pool its logits differ from its own "
                f"forward by {error:.3g} of their scale (rounding explains up to {tolerance:g}): "
                "this architecture reads the cache's mask or positions in a way the pool does not "
                "follow, so its output would not be the target's"
            )
