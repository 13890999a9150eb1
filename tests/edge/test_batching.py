"""Ragged batched verification equals per-session verification (SPEC §3)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from device.drafter import Drafter
from edge.batching import batched_forward
from edge.verifier import TargetSession
from gelato.kv import KVSequence
from gelato.models import LoadedModel, load_model
from gelato.types import SamplingParams, Verdict


@pytest.fixture(scope="module")
def target(pair: dict[str, Path]) -> LoadedModel:
    return load_model(str(pair["target"]), "target", "float32", "cpu")


@pytest.fixture(scope="module")
def drafter_model(pair: dict[str, Path]) -> LoadedModel:
    return load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")


def test_batched_logits_and_caches_match_unbatched(target: LoadedModel) -> None:
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 300) for _ in range(n)] for n in (1, 5, 17, 40)]
    blocks = [tuple(rng.randrange(1, 300) for _ in range(k)) for k in (3, 0, 8, 1)]
    alone, batched = [], []
    for prefix in prefixes:
        for bucket in (alone, batched):
            seq = KVSequence(target.model, target.vocab_size, prefix)
            seq.prefill(len(prefix) - 1)
            bucket.append(seq)
    want = [seq.forward(ids) for seq, ids in zip(alone, blocks, strict=True)]
    got = batched_forward(target.model, target.vocab_size, list(zip(batched, blocks, strict=True)))
    for w, g, a, b in zip(want, got, alone, batched, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
        assert b.tokens == a.tokens and b.cached == a.cached
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            torch.testing.assert_close(lb.keys, la.keys, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(lb.values, la.values, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ragged_sessions_joining_and_leaving(
    target: LoadedModel, drafter_model: LoadedModel, temperature: float
) -> None:
    """Sessions with different prompts and K, joining and finishing at different rounds, batched in
    one forward per round, produce exactly the tokens they produce alone (sampling included: each
    session has its own seeded RNG stream)."""
    rng = random.Random(1)
    specs = [  # (prompt length, K, first round, rounds)
        (3, 4, 0, 12),
        (11, 1, 0, 6),
        (25, 8, 2, 9),
        (7, 0, 3, 5),
        (40, 3, 5, 7),
    ]
    prompts = [[rng.randrange(1, 300) for _ in range(n)] for n, *_ in specs]

    def run(batched: bool) -> list[list[int]]:
        sessions, drafters = [], []
        for i, prompt in enumerate(prompts):
            params = SamplingParams(temperature=temperature, top_k=30, seed=100 + i)
            d = Drafter(drafter_model, params)
            d.start(prompt)
            s = TargetSession(f"s{i}", target, params, prompt)
            s.prefill()
            sessions.append(s)
            drafters.append(d)
        for rnd in range(14):
            live = [i for i, (_, _, first, n) in enumerate(specs) if first <= rnd < first + n]
            blocks = {i: drafters[i].draft(specs[i][1], sessions[i].rounds) for i in live}
            if batched and live:
                bases = {i: len(sessions[i].seq.tokens) for i in live}
                rows = [(sessions[i].seq, blocks[i].ids) for i in live]
                logits = batched_forward(target.model, target.vocab_size, rows)
                verdicts = {i: sessions[i].accept(blocks[i], bases[i], lg) for i, lg in zip(live, logits, strict=True)}
            else:
                verdicts = {i: sessions[i].verify(blocks[i]) for i in live}
            for i, (a, nxt) in verdicts.items():
                drafters[i].apply(blocks[i], Verdict(round=0, n_accepted=a, next_token=nxt))
        return [s.seq.tokens for s in sessions]

    assert run(batched=True) == run(batched=False)


def test_single_row_takes_the_plain_path(target: LoadedModel) -> None:
    seq = KVSequence(target.model, target.vocab_size, [5, 6, 7])
    seq.prefill(2)
    cache_before = seq.cache
    (logits,) = batched_forward(target.model, target.vocab_size, [(seq, (8, 9))])
    assert logits.shape == (3, target.vocab_size) and seq.cache is cache_before and seq.cached == 5
