"""Wire codec round trips and validation (sampling parameters, blocks built outside the codec),
clipped client strings; policy parsing; seed derivation."""

from __future__ import annotations

import pytest

from device.policy import FixedK, parse_policy
from gelato.types import DraftBlock, SamplingParams, SparseDist, Verdict
from gelato.v1 import gelato_pb2 as pb
from gelato.wire import (
    WireError,
    check_block,
    clip,
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
    # By name only: the policy classes' own interface is the device's (tests/device).
    assert isinstance(parse_policy("fixed-0"), FixedK) and parse_policy("fixed-8").name == "fixed-8"
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy("fixed--1")
    assert derive_seed(1, "drafter") != derive_seed(1, "target")
    assert derive_seed(1, "target") == derive_seed(1, "target")


@pytest.mark.parametrize("top_p", [float("nan"), float("inf"), float("-inf"), -0.5, 1.5])
def test_decode_sampling_refuses_top_p_that_is_not_a_probability(top_p: float) -> None:
    """Only an exact 0 means "off": NaN used to pass as 1.0 (NaN > 0 is False)."""
    with pytest.raises(WireError, match="top_p"):
        decode_sampling(pb.SamplingParams(temperature=1.0, top_p=top_p))


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 5e-5, float("nan"), float("inf"), -1.0])
def test_decode_sampling_refuses_bad_temperatures(temperature: float) -> None:
    with pytest.raises(WireError, match="temperature"):
        decode_sampling(pb.SamplingParams(temperature=temperature))


def test_decode_sampling_keeps_the_minimum_temperature_through_float32() -> None:
    msg = pb.SamplingParams(temperature=SamplingParams.MIN_TEMPERATURE, top_p=0.0)
    params = decode_sampling(pb.SamplingParams.FromString(msg.SerializeToString()))
    assert params.top_p == 1.0 and not params.greedy


def test_check_block_validates_blocks_built_outside_the_codec() -> None:
    ok = DraftBlock(round=0, ids=(4,), q=(SparseDist(ids=(4, 5), probs=(0.5, 0.5)),))
    check_block(ok, vocab_size=10, greedy=False)
    bad = [
        (DraftBlock(round=0, ids=(4, 11)), True, "out of range"),
        (DraftBlock(round=0, ids=(1, 2, 3)), True, "exceeds"),
        (ok, True, "greedy session"),
        (DraftBlock(round=0, ids=(4,)), False, "one q per draft"),
        (DraftBlock(round=0, ids=(4,), q=(SparseDist(ids=(4,), probs=(float("nan"),)),)), False, "finite"),
        (DraftBlock(round=0, ids=(4,), q=(SparseDist(ids=(4, 5), probs=(0.5, -0.5)),)), False, "finite"),
        (DraftBlock(round=0, ids=(4,), q=(SparseDist(ids=(4, 4), probs=(0.5, 0.5)),)), False, "duplicate"),
        (DraftBlock(round=0, ids=(4,), q=(SparseDist(ids=(5,), probs=(1.0,)),)), False, "own support"),
        (DraftBlock(round=0, ids=(4,), q=(SparseDist(ids=(4, 5), probs=(1.0,)),)), False, "probabilities"),
    ]
    for block, greedy, needle in bad:
        with pytest.raises(WireError, match=needle):
            check_block(block, vocab_size=10, greedy=greedy, max_tokens=2)


def test_clip_bounds_echoed_client_strings() -> None:
    assert clip("drafter") == "drafter"
    long = clip("x" * 65536)
    assert len(long) < 250 and long.startswith("x" * 200) and "65536 characters" in long
