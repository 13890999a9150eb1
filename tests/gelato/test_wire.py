"""Wire codec round trips and validation; policy parsing; seed derivation."""

from __future__ import annotations

import pytest

from device.policy import FixedK, parse_policy
from gelato.types import DraftBlock, SamplingParams, SparseDist, Verdict
from gelato.wire import (
    WireError,
    decode_block,
    decode_sampling,
    decode_verdict,
    derive_seed,
    encode_block,
    encode_sampling,
    encode_verdict,
)


def test_block_round_trip_keeps_q_exact() -> None:
    q = (SparseDist(ids=(4, 9), probs=(0.75, 0.25)), SparseDist(ids=(1,), probs=(1.0,)))
    block = DraftBlock(round=3, ids=(4, 1), q=q)
    msg = encode_block(block).draft
    assert len(msg.q[0].probs_f16) == 4  # float16 on the wire
    back = decode_block(msg, vocab_size=10, greedy=False, max_tokens=8)
    assert back == DraftBlock(round=3, ids=(4, 1), q=q)


def test_block_validation() -> None:
    msg = encode_block(DraftBlock(round=0, ids=(4, 12))).draft
    with pytest.raises(WireError, match="out of range"):
        decode_block(msg, vocab_size=10, greedy=True, max_tokens=8)
    with pytest.raises(WireError, match="exceeds"):
        decode_block(msg, vocab_size=20, greedy=True, max_tokens=1)
    dup = encode_block(DraftBlock(round=0, ids=(4,), q=(SparseDist(ids=(4, 4), probs=(0.5, 0.5)),))).draft
    with pytest.raises(WireError, match="duplicate"):
        decode_block(dup, vocab_size=20, greedy=False, max_tokens=8)


def test_verdict_and_sampling_round_trip() -> None:
    v = Verdict(round=2, n_accepted=1, next_token=7, queue_ms=0.5, compute_ms=2.0, batch_rows=1)
    assert decode_verdict(encode_verdict(v).verdict) == v
    assert v.emitted((5, 6, 8)) == [5, 7]
    params = SamplingParams(temperature=0.5, top_p=0.75, top_k=3, seed=9)
    assert decode_sampling(encode_sampling(params)) == params
    assert decode_sampling(encode_sampling(SamplingParams(top_p=0.0))).top_p == 1.0


def test_policy_and_seeds() -> None:
    assert parse_policy("fixed-0") == FixedK(0) and parse_policy("fixed-8").block_size() == 8
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy("fixed--1")
    assert derive_seed(1, "drafter") != derive_seed(1, "target")
    assert derive_seed(1, "target") == derive_seed(1, "target")
