"""After a rejection both KV caches equal a fresh prefill of the accepted prefix (SPEC §2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from device.drafter import Drafter
from edge.verifier import TargetSession
from gelato.kv import KVSequence
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.types import SamplingParams, Verdict


def assert_cache_matches_fresh(seq: KVSequence, loaded: LoadedModel) -> None:
    fresh = KVSequence(loaded.model, loaded.vocab_size, seq.tokens[: seq.cached])
    fresh.prefill(seq.cached)
    assert fresh.cached == seq.cached
    for layer in range(loaded.model.config.num_hidden_layers):
        for got, want in zip(seq.layer_kv(layer), fresh.layer_kv(layer), strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_equal_fresh_prefill_after_rejection(pair: dict[str, Path], temperature: float) -> None:
    drafter_m = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    target_m = load_model(str(pair["target"]), "target", "float32", "cpu")
    params = SamplingParams(temperature=temperature, top_k=20, seed=3)
    prompt = encode_prompt(drafter_m.tokenizer, "Ava has 12 apples and Ben gives her 3 more.")
    drafter = Drafter(drafter_m, params)
    drafter.start(prompt)
    session = TargetSession("s", target_m, params, prompt)
    session.prefill()
    seen = {"rejected": 0, "all_accepted": 0}
    for rnd in range(40):
        block = drafter.draft(4, rnd)
        a, nxt = session.verify(block)
        drafter.apply(block, Verdict(round=rnd, n_accepted=a, next_token=nxt))
        assert drafter.tokens == session.seq.tokens
        # The edge keeps KV for everything but the newest token; the drafter for the accepted
        # prefix it has fed (one less after a fully accepted block: d_k was never fed).
        assert session.seq.cached == len(session.seq.tokens) - 1
        expected_drafter = len(drafter.tokens) - (2 if a == block.k else 1)
        assert drafter.seq.cached == expected_drafter
        assert_cache_matches_fresh(drafter.seq, drafter_m)
        assert_cache_matches_fresh(session.seq, target_m)
        seen["rejected" if a < block.k else "all_accepted"] += 1
    assert seen["rejected"] > 0 and seen["all_accepted"] > 0, seen
