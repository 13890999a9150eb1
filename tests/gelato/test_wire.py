"""Wire codec round trips and validation (sampling parameters, blocks built outside the codec),
clipped client strings; session open/opened; policy parsing; seed derivation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gelato.channel import MAX_DRAFT_TOKENS, MAX_MESSAGE_BYTES
from gelato.device.policy import FixedK, parse_policy
from gelato.sampling import KeyedRng, truncate_top_m
from gelato.types import (
    PROTOCOL_VERSION,
    DraftBlock,
    EdgeInfo,
    SamplingParams,
    SessionInfo,
    SessionOpen,
    SparseDist,
    Verdict,
)
from gelato.v1 import gelato_pb2 as pb
from gelato.wire import (
    MAX_Q_SUPPORT,
    WireError,
    check_block,
    clip,
    decode_block,
    decode_info,
    decode_open,
    decode_opened,
    decode_sampling,
    decode_sparse,
    decode_verdict,
    encode_block,
    encode_generate,
    encode_info,
    encode_open,
    encode_opened,
    encode_sampling,
    encode_verdict,
    join_streamed,
    split_streamed,
)


def test_block_round_trip_keeps_q_exact() -> None:
    q = (SparseDist(ids=(4, 9), probs=(0.75, 0.25)), SparseDist(ids=(1,), probs=(1.0,)))
    block = DraftBlock(round=3, ids=(4, 1), q=q)
    msg = encode_block(block).draft
    assert len(msg.q[0].probs_f16) == 4  # float16 on the wire
    back = decode_block(msg, vocab_size=10, greedy=False, max_tokens=8)
    assert back == DraftBlock(round=3, ids=(4, 1), q=q)


def test_a_q_that_is_not_float16_is_refused_not_rounded() -> None:
    """The edge verifies with the q it reads: rounding a float32 q on the way would make the edge
    accept by another distribution than the draft was drawn from (sampling silently not lossless).
    The drafter's own q (`truncate_top_m`) is float16 already and goes through unchanged."""
    drawn_from = SparseDist(ids=(4, 9), probs=(0.3, 0.7))  # float32 values, not float16 ones
    with pytest.raises(ValueError, match="not float16 values"):
        encode_block(DraftBlock(round=0, ids=(4,), q=(drawn_from,)))
    q = truncate_top_m(torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0]), top_m=8)
    back = decode_block(encode_block(DraftBlock(round=0, ids=(3,), q=(q,))).draft, 5, False, 8)
    assert back.q == (q,)


def test_send_ahead_blocks_round_trip() -> None:
    guessed = DraftBlock(round=4, ids=(5, 6), guess=2)
    msg = encode_block(guessed).draft
    assert (list(msg.ids), msg.parent_round) == ([2, 5, 6], 3)
    assert decode_block(msg, vocab_size=10, greedy=True, max_tokens=2) == guessed  # the guess is not a draft
    empty = DraftBlock(round=4, ids=(), follow=True)
    msg = encode_block(empty).draft
    assert (list(msg.ids), msg.HasField("parent_round"), msg.parent_round) == ([], True, 3)
    assert decode_block(msg, vocab_size=10, greedy=True, max_tokens=2) == empty
    assert decode_block(msg, vocab_size=10, greedy=False, max_tokens=2) == empty
    msg.q.append(pb.SparseDist(ids=[1]))
    with pytest.raises(WireError, match="no ids, so no q"):
        decode_block(msg, vocab_size=10, greedy=False, max_tokens=2)
    with pytest.raises(WireError, match="no guess and no drafts"):
        check_block(DraftBlock(round=4, ids=(1,), follow=True), vocab_size=10, greedy=True)


def test_block_validation() -> None:
    msg = encode_block(DraftBlock(round=0, ids=(4, 12))).draft
    with pytest.raises(WireError, match="out of range"):
        decode_block(msg, vocab_size=10, greedy=True, max_tokens=8)
    with pytest.raises(WireError, match="exceeds"):
        decode_block(msg, vocab_size=20, greedy=True, max_tokens=1)
    dup = encode_block(DraftBlock(round=0, ids=(4,), q=(SparseDist(ids=(4, 4), probs=(0.5, 0.5)),))).draft
    with pytest.raises(WireError, match="duplicate"):
        decode_block(dup, vocab_size=20, greedy=False, max_tokens=8)


def test_q_checks_name_the_draft_and_the_fault() -> None:
    def block(q: SparseDist, x: int = 4) -> pb.DraftBlock:
        return encode_block(DraftBlock(round=0, ids=(1, x), q=(SparseDist(ids=(1,), probs=(1.0,)), q))).draft

    assert decode_block(block(SparseDist(ids=(4, 7), probs=(0.5, 0.5))), 20, False, 8).q[1].ids == (4, 7)
    for q, x, needle in [
        (SparseDist(ids=(4, 20), probs=(0.5, 0.5)), 4, "q\\[1\\]: token id 20 out of range"),
        (SparseDist(ids=(4, 7, 4), probs=(0.5, 0.25, 0.25)), 4, "q\\[1\\]: duplicate ids"),
        (SparseDist(ids=(4, 7), probs=(0.0, 1.0)), 4, "q\\[1\\]: draft token 4 is not in its own support"),
        (SparseDist(ids=(4, 7), probs=(0.5, 0.5)), 9, "q\\[1\\]: draft token 9 is not in its own support"),
    ]:
        with pytest.raises(WireError, match=needle):
            decode_block(block(q, x), vocab_size=20, greedy=False, max_tokens=8)


class _Untouchable(list[int]):
    """Ids whose length may be read but whose entries may not: any per-id work fails the test."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("per-id work on a support over the limit")

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        raise AssertionError("per-id work on a support over the limit")


def test_a_support_over_the_limit_is_refused_before_any_per_id_work() -> None:
    """A sampling block is decoded on the edge's event loop: a huge support must cost nothing."""
    fits = list(range(MAX_Q_SUPPORT))
    q = SparseDist(ids=tuple(fits), probs=(1.0,) * MAX_Q_SUPPORT)
    assert decode_sparse(encode_block(DraftBlock(round=0, ids=(0,), q=(q,))).draft.q[0], MAX_Q_SUPPORT, "q") == q

    class Huge:
        ids = _Untouchable(range(MAX_Q_SUPPORT + 1))
        probs_f16 = b"\x00\x3c" * (MAX_Q_SUPPORT + 1)  # float16 1.0 each

    with pytest.raises(
        WireError, match=f"q: a support of {MAX_Q_SUPPORT + 1} ids exceeds the limit of {MAX_Q_SUPPORT}"
    ):
        decode_sparse(Huge(), 10**6, "q")  # type: ignore[arg-type]
    with pytest.raises(WireError, match="exceeds the limit"):  # a block built in-process: the same limit
        check_block(
            DraftBlock(round=0, ids=(0,), q=(SparseDist(ids=(*fits, 10**5), probs=(1.0,) * (MAX_Q_SUPPORT + 1)),)),
            10**6,
            False,
        )


def test_the_largest_block_an_edge_may_allow_fits_a_message() -> None:
    """`--max-draft-tokens` is capped so that a sampling block at the cap, every q as wide as the
    wire allows and its ids as long as int32 varints get (5 bytes), still fits a gRPC message."""
    ids = tuple(range(2**31 - MAX_Q_SUPPORT, 2**31))
    q = SparseDist(ids=ids, probs=(1.0,) * MAX_Q_SUPPORT)
    block = DraftBlock(round=2**31, ids=(ids[0],) * MAX_DRAFT_TOKENS, q=(q,) * MAX_DRAFT_TOKENS)
    size = encode_block(block).ByteSize()
    assert 0.8 * MAX_MESSAGE_BYTES < size <= MAX_MESSAGE_BYTES  # and the cap is not far below what fits


def test_verdict_and_sampling_round_trip() -> None:
    v = Verdict(round=2, n_accepted=1, next_token=7, queue_ms=0.5, compute_ms=2.0, batch_rows=1)
    assert decode_verdict(encode_verdict(v).verdict) == v
    assert v.emitted((5, 6, 8)) == [5, 7]
    params = SamplingParams(temperature=0.5, top_p=0.75, top_k=3, seed=9)
    assert decode_sampling(encode_sampling(params)) == params
    assert decode_sampling(encode_sampling(SamplingParams(top_p=0.0))).top_p == 1.0


def test_streamed_rounds_travel_in_one_verdict_and_come_apart_again() -> None:
    """Streamed decoding's rounds r, r+1, ...: one message (`join_streamed`), the same tokens and
    rounds when split (`split_streamed`), the wait and the forwards' time the first round's."""
    rounds = [
        Verdict(round=5 + i, n_accepted=0, next_token=t, queue_ms=0.5 * (i == 0), compute_ms=2.0)
        for i, t in enumerate((7, 3, 9))
    ]
    joined = join_streamed(rounds)
    assert (joined.round, joined.next_token, joined.more_tokens, joined.compute_ms) == (5, 7, (3, 9), 6.0)
    assert decode_verdict(encode_verdict(joined).verdict) == joined
    split = split_streamed(decode_verdict(encode_verdict(joined).verdict))
    assert [(v.round, v.next_token, v.n_accepted, v.more_tokens) for v in split] == [
        (v.round, v.next_token, 0, ()) for v in rounds
    ]
    # The first round waited for the message: the wait and every forward's time are its own.
    assert [(v.queue_ms, v.compute_ms) for v in split] == [(0.5, 6.0), (0.0, 0.0), (0.0, 0.0)]
    assert join_streamed(rounds[:1]) == rounds[0] and split_streamed(rounds[0]) == [rounds[0]]
    # Forwards that ran while the message before was being sent were not waited for: left out.
    assert join_streamed(rounds, overlapped_ms=1.5).compute_ms == 4.5
    assert join_streamed(rounds[:1], overlapped_ms=0.5).compute_ms == 1.5
    assert join_streamed(rounds, overlapped_ms=60.0).compute_ms == 0.0  # it all ran before: none waited for
    generate = encode_generate(4, 100, 8).generate
    assert (generate.round, generate.max_tokens, generate.tokens_per_message) == (4, 100, 8)


def test_policy_and_seeds() -> None:
    # By name only: the policy classes' own interface is the device's (tests/device).
    assert isinstance(parse_policy("fixed-0"), FixedK) and parse_policy("fixed-8").name == "fixed-8"
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy("fixed--1")
    assert KeyedRng(1, "drafter").uniform(0) != KeyedRng(1, "target").uniform(0)
    assert KeyedRng(1, "target").uniform(0) == KeyedRng(1, "target").uniform(0)


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


def test_open_round_trip() -> None:
    req = SessionOpen(
        prefix_ids=(5, 6, 7),
        tokenizer_fingerprint="fp",
        sampling=SamplingParams(temperature=0.5, top_p=0.75, top_k=3, seed=9),
        max_new_tokens=8,
        drafter_model="d",
    )
    msg = encode_open(req)
    assert msg.WhichOneof("kind") == "open"
    assert decode_open(msg.open, vocab_size=10, context_limit=16) == req
    # What a peer leaves unset decodes as the defaults: greedy, no token limit, no name.
    bare = pb.OpenSession(protocol_version=PROTOCOL_VERSION, tokenizer_fingerprint="fp", prefix_ids=[1])
    assert decode_open(bare, 10, 16) == SessionOpen(prefix_ids=(1,), tokenizer_fingerprint="fp")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"prefix_ids": []}, "prefix_ids is empty: the prompt needs at least one token"),
        ({"prefix_ids": [1, 10]}, "prefix_ids: token id 10 out of range [0, 10)"),
        ({"prefix_ids": [-1]}, "prefix_ids: token id -1 out of range"),
        ({"prefix_ids": [1] * 16}, "prompt of 16 tokens does not fit the target's context limit of 16"),
        ({"sampling": pb.SamplingParams(temperature=float("nan"))}, "sampling: temperature must be 0"),
        ({"sampling": pb.SamplingParams(temperature=1.0, top_p=2.0)}, "sampling: top_p must be in [0, 1]"),
    ],
)
def test_open_validation(fields: dict[str, object], needle: str) -> None:
    msg = pb.OpenSession(**{"protocol_version": 1, "prefix_ids": [1, 2], **fields})  # type: ignore[arg-type]
    with pytest.raises(WireError) as info:
        decode_open(msg, vocab_size=10, context_limit=16)
    assert needle in str(info.value)


def test_opened_round_trip() -> None:
    info = SessionInfo("s1", "t", context_limit=512, max_draft_tokens=32, max_ahead_rounds=4, empty_ahead=True)
    msg = encode_opened(info)
    assert msg.WhichOneof("kind") == "opened"
    assert decode_opened(msg.opened) == info
    older = pb.SessionOpened(session_id="s1", target_model="t", context_limit=512, max_draft_tokens=32)
    assert decode_opened(older).max_ahead_rounds == 0  # an edge without send-ahead
    assert not decode_opened(older).empty_ahead  # nor empty send-ahead blocks
    # End tokens: a list, an empty one (a target that has none: the generation ends at its limits)
    # and none told (an older edge: the device ends at its drafter's) are three different answers.
    for eos in ((2, 7), (), None):
        assert decode_opened(encode_opened(replace(info, eos_token_ids=eos)).opened).eos_token_ids == eos
    assert decode_opened(older).eos_token_ids is None
    listed_by_an_older_edge = pb.SessionOpened(session_id="s1", context_limit=512, eos_token_ids=[2])
    assert decode_opened(listed_by_an_older_edge).eos_token_ids == (2,)
    with pytest.raises(WireError, match="context_limit must be >= 1"):
        decode_opened(pb.SessionOpened(session_id="s1"))


def test_info_round_trip() -> None:
    """Every field survives; an older edge's missing fields read as 0; an unusable edge is refused."""
    info = EdgeInfo(
        protocol_version=1,
        target_model="t",
        tokenizer_fingerprint="fp",
        vocab_size=4096,
        context_limit=512,
        max_draft_tokens=32,
        max_sessions=64,
        active_sessions=3,
        eos_token_ids=(2, 7),
        kv_bytes_in_use=11,
        kv_bytes_reserved=22,
        kv_budget_bytes=33,
        kv_pool_bytes=44,
        max_ahead_rounds=4,
    )
    assert decode_info(encode_info(info)) == info
    assert all(getattr(encode_info(info), f) for f in pb.InfoResponse.DESCRIPTOR.fields_by_name), "a field is dropped"
    older = pb.InfoResponse(protocol_version=1, target_model="t", vocab_size=10, context_limit=8, max_draft_tokens=4)
    assert decode_info(older).max_ahead_rounds == 0 and decode_info(older).kv_budget_bytes == 0
    with pytest.raises(WireError, match="vocab_size must be >= 1"):
        decode_info(pb.InfoResponse(context_limit=8))
    with pytest.raises(WireError, match="context_limit must be >= 1"):
        decode_info(pb.InfoResponse(vocab_size=10))
