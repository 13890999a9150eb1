"""After a rejection both KV caches equal a fresh prefill of the accepted prefix."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from gelato.device.drafter import Drafter
from gelato.device.generate import GenerationResult, Limits, local_verifier, speculative_generate
from gelato.device.policy import FixedK
from gelato.edge.sessions import TargetSession
from gelato.kv import KVSequence
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.types import SamplingParams, Telemetry


def assert_cache_matches_fresh(seq: KVSequence, loaded: LoadedModel) -> None:
    fresh = KVSequence(loaded.model, loaded.vocab_size, seq.tokens[: seq.cached])
    fresh.prefill(seq.cached)
    assert fresh.cached == seq.cached
    for layer in range(loaded.model.config.num_hidden_layers):
        for got, want in zip(seq.layer_kv(layer), fresh.layer_kv(layer), strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def run_checked(pair: dict[str, Path], temperature: float) -> tuple[GenerationResult, dict[str, int]]:
    """120 tokens of fixed-4, the device's own loop verified in process; after every round's
    verdict is applied (the loop's on_round) both caches are exact. Returns the result and how
    many rounds rejected a draft or accepted the whole block."""
    drafter_m = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    target_m = load_model(str(pair["target"]), "target", "float32", "cpu")
    params = SamplingParams(temperature=temperature, top_k=20, seed=3)
    prompt = encode_prompt(drafter_m.tokenizer, "Ava has 12 apples and Ben gives her 3 more.")
    drafter = Drafter(drafter_m, params)
    session = TargetSession("s", target_m, params, prompt)
    session.prefill()
    seen = {"rejected": 0, "all_accepted": 0}

    def check(tele: Telemetry) -> None:
        assert drafter.tokens == session.seq.tokens
        # The edge keeps KV for everything but the newest token; the drafter for the accepted
        # prefix it has fed (one less after a fully accepted block: d_k was never fed).
        assert session.seq.cached == len(session.seq.tokens) - 1
        assert drafter.seq.cached == len(drafter.tokens) - (2 if tele.accepted == tele.k > 0 else 1)
        assert_cache_matches_fresh(drafter.seq, drafter_m)
        assert_cache_matches_fresh(session.seq, target_m)
        seen["rejected" if tele.accepted < tele.k else "all_accepted"] += 1

    limits = Limits(120, target_m.context_limit, 4, ())
    res = asyncio.run(speculative_generate(drafter, local_verifier(session), FixedK(4), prompt, limits, on_round=check))
    return res, seen


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_equal_fresh_prefill_after_rejection(pair: dict[str, Path], temperature: float) -> None:
    res, seen = run_checked(pair, temperature)
    assert res.stats.rounds >= 25 and res.stats.rounds == sum(seen.values())
    assert seen["rejected"] > 0 and seen["all_accepted"] > 0, seen


def test_a_correction_equal_to_the_rejected_draft_leaves_it_for_the_next_forward(
    pair: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the residual is numerically empty it falls back to p, which can draw the very draft
    just rejected: both sides had fed that token at that position already. Its KV must not be
    kept as if the next round had fed it: every round expects the newest token uncached (the
    edge's next forward read its logits one row off, the drafter's found nothing to feed)."""
    import gelato.edge.sessions as sessions

    real = sessions.verify_sampling
    forced = [0]

    def correction_is_the_draft(p, ids, q, rng, base):  # type: ignore[no-untyped-def]
        a, nxt = real(p, ids, q, rng, base)
        if a < len(ids) - 1:  # a draft the drafter fed (not the block's last) was rejected
            forced[0] += 1
            return a, ids[a]
        return a, nxt

    monkeypatch.setattr(sessions, "verify_sampling", correction_is_the_draft)
    res, _ = run_checked(pair, 1.0)
    assert res.stats.stop_reason == "max_new_tokens" and len(res.token_ids) == 120, (res.stats.stop_reason, res.error)
    assert forced[0] > 0


def test_a_sliding_window_drafter_rolls_back_past_its_window() -> None:
    """A drafter whose layers attend within a sliding window (Gemma-2/3, Mistral v0.1, Qwen2 with
    use_sliding_window): rolling its cache back once the context has passed the window crashed
    (transformers' sliding cache layers keep no past states to crop back to); now every rollback
    leaves logits equal to a full forward of the kept tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    seq = KVSequence(model, 64, list(range(1, 11)))  # 10 tokens: past the window of 8
    seq.prefill(9)
    for drafts, keep in (((11, 12, 13, 14), 1), ((20, 21), 0), ((30, 31, 32, 33, 34), 5)):
        base = len(seq.tokens)
        seq.forward(list(drafts))  # a block drafted...
        seq.set_verdict(base, drafts[:keep], 40 + keep)  # ...then a rejection after `keep` of them
        got = seq.forward()[-1]
        with torch.no_grad():
            want = model(torch.tensor([seq.tokens])).logits[0, -1, :64]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
