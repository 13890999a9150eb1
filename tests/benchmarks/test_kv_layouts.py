"""The stacked-cache layout (`gelato.benchmarks.kv_layouts`), the alternative the edge's KV pool was
measured against: ragged rows in one forward equal each row alone, a lone row takes the plain
path, and the benchmark's measurement runs and agrees with the unbatched logits."""

from __future__ import annotations

import random

import torch

from gelato.benchmarks import kv_layouts
from gelato.benchmarks.kv_layouts import batched_forward, stacked_cache
from gelato.kv import KVSequence
from gelato.models import LoadedModel
from tests.edge.test_batching import assert_same_kv


def test_stacked_logits_and_caches_match_unbatched(target: LoadedModel) -> None:
    """Ragged rows (prefix 1..40 tokens, blocks of 0..8 drafts) in one forward: every row's logits
    and KV equal the row run alone."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 300) for _ in range(n)] for n in (1, 5, 17, 40)]
    blocks = [tuple(rng.randrange(1, 300) for _ in range(k)) for k in (3, 0, 8, 1)]
    alone = [KVSequence(target.model, target.vocab_size, p) for p in prefixes]
    batched = [KVSequence(target.model, target.vocab_size, p) for p in prefixes]
    for seq in (*alone, *batched):
        seq.prefill(len(seq.tokens) - 1)
    want = [seq.forward(ids) for seq, ids in zip(alone, blocks, strict=True)]
    got = batched_forward(target.model, target.vocab_size, list(zip(batched, blocks, strict=True)))
    for w, g, a, b in zip(want, got, alone, batched, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
        assert_same_kv(a, b, target.model.config.num_hidden_layers)


def test_single_row_takes_the_plain_path(target: LoadedModel) -> None:
    seq = KVSequence(target.model, target.vocab_size, [5, 6, 7])
    seq.prefill(2)
    cache_before = seq.cache
    (logits,) = batched_forward(target.model, target.vocab_size, [(seq, (8, 9))])
    assert logits.shape == (3, target.vocab_size) and seq.cache is cache_before and seq.cached == 5


def test_stacked_cache_left_pads_every_row(target: LoadedModel) -> None:
    rows = [KVSequence(target.model, target.vocab_size, list(range(1, n + 1))) for n in (3, 7)]
    rows.append(KVSequence(target.model, target.vocab_size, [9]))  # nothing cached: all padding
    for seq in rows:
        seq.prefill(len(seq.tokens) - 1)
    cache = stacked_cache(target.model, rows, 6)
    keys = cache.layers[0].keys
    assert keys.shape[0] == 3 and keys.shape[2] == 6 and cache.get_seq_length() == 6
    k0, _ = rows[0].layer_kv(0)
    torch.testing.assert_close(keys[0:1, :, 4:], k0)
    assert bool((keys[0, :, :4] == 0).all()) and bool((keys[2] == 0).all())


def test_measure_runs_every_layout_and_matches_unbatched(target: LoadedModel) -> None:
    rng = random.Random(3)
    prefixes = [[rng.randrange(1, 300) for _ in range(n)] for n in (4, 11)]
    row = kv_layouts.measure(target, prefixes, [5, 6, 7], reps=1)
    assert row["rows"] == 2
    assert all(row[f"{k}_ms"] > 0 for k in ("stacked", "pool", "pool_gather", "raw"))
    assert all(err < 1e-3 for err in row["max_abs_logit_err"].values()), row
