"""Codec between the boundary dataclasses (`gelato.types`) and the v1 protobuf messages.

Contract: one encode/decode pair per message the edge and a device exchange — `Info` (`EdgeInfo`),
open (`SessionOpen`), opened (`SessionInfo`), draft block, Generate, verdict (several rounds' in one
message when streamed: `join_streamed` / `split_streamed`) — and the sampling parameters and sparse
distributions inside them. `encode_*` never fails on a well-formed dataclass (q's
probabilities are float16 values); `decode_*` (and `check_block`, for a `DraftBlock` built
elsewhere) validates everything a peer could get wrong and raises `WireError` with a message naming
the field, which the edge turns into INVALID_ARGUMENT. Messages quote client strings only through
`clip`, so no error grows with the client's input. Sparse probabilities travel as little-endian
float16 (2 bytes each); the device samples from the decoded float16 values, so the edge knows q
exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from gelato.types import DraftBlock, EdgeInfo, SamplingParams, SessionInfo, SessionOpen, SparseDist, Verdict
from gelato.v1 import gelato_pb2 as pb

# The most entries one draft's support q may hold. A protocol limit, like the edge's draft-length
# limit: a sampling block is decoded on the edge's event loop, so its size bounds how long one
# device's block can hold up everyone else's (the device's `--top-m` is checked against it).
MAX_Q_SUPPORT = 1024
# The most tokens an edge sends in one streamed Verdict (Generate's `tokens_per_message` is capped
# here): what one message may make a device wait for before it sees any of them.
MAX_STREAMED_PER_MESSAGE = 256
# The details of the UNAVAILABLE an edge answers while its target loads (a restart): a device
# waits for it (`--edge-wait-s`) instead of failing at once.
MODEL_LOADING = "the target model is still loading"


class WireError(ValueError):
    """A message from the peer is malformed; the text says which field and why."""


def encode_sampling(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=params.seed)


def decode_sampling(msg: pb.SamplingParams) -> SamplingParams:
    # Only an exact 0 (proto3's "unset") means off: `top_p > 0` would have let NaN through as 1.0.
    top_p = 1.0 if msg.top_p == 0 else msg.top_p
    params = SamplingParams(temperature=msg.temperature, top_p=top_p, top_k=msg.top_k, seed=msg.seed)
    try:
        params.validate()
    except ValueError as exc:
        raise WireError(f"sampling: {exc}") from exc
    return params


def encode_open(req: SessionOpen) -> pb.DeviceMessage:
    return pb.DeviceMessage(
        open=pb.OpenSession(
            protocol_version=req.protocol_version,
            tokenizer_fingerprint=req.tokenizer_fingerprint,
            drafter_model=req.drafter_model,
            prefix_ids=req.prefix_ids,
            sampling=encode_sampling(req.sampling),
            max_new_tokens=req.max_new_tokens,
        )
    )


def decode_open(msg: pb.OpenSession, vocab_size: int, context_limit: int) -> SessionOpen:
    """The request with its prefix checked against the target (non-empty, shorter than
    `context_limit`, ids in the vocabulary) and its sampling parameters validated. The protocol
    version and tokenizer fingerprint are decoded as sent: whether they match is the edge's call
    (FAILED_PRECONDITION, not a malformed message)."""
    n = len(msg.prefix_ids)
    if n >= context_limit:  # before any per-token work on a huge prefix
        raise WireError(f"prompt of {n} tokens does not fit the target's context limit of {context_limit}")
    if not n:
        raise WireError("prefix_ids is empty: the prompt needs at least one token")
    prefix = tuple(msg.prefix_ids)
    check_ids(prefix, vocab_size, "prefix_ids")
    return SessionOpen(
        prefix_ids=prefix,
        tokenizer_fingerprint=msg.tokenizer_fingerprint,
        sampling=decode_sampling(msg.sampling),
        max_new_tokens=msg.max_new_tokens,
        drafter_model=msg.drafter_model,
        protocol_version=msg.protocol_version,
    )


def encode_opened(info: SessionInfo) -> pb.EdgeMessage:
    return pb.EdgeMessage(
        opened=pb.SessionOpened(
            session_id=info.session_id,
            target_model=info.target_model,
            context_limit=info.context_limit,
            max_draft_tokens=info.max_draft_tokens,
            max_ahead_rounds=info.max_ahead_rounds,
            empty_ahead=info.empty_ahead,
            eos_token_ids=info.eos_token_ids or (),
            eos_listed=info.eos_token_ids is not None,
        )
    )


def decode_opened(msg: pb.SessionOpened) -> SessionInfo:
    """An edge that omits `max_ahead_rounds` (older than send-ahead) reads as 0: none; one that
    omits `empty_ahead` as False (it would refuse empty send-ahead blocks); one that omits
    `eos_token_ids` and `eos_listed` as None (the device then ends at its drafter's)."""
    if msg.context_limit < 1:
        raise WireError(f"SessionOpened: context_limit must be >= 1, got {msg.context_limit}")
    return SessionInfo(
        session_id=msg.session_id,
        target_model=msg.target_model,
        context_limit=msg.context_limit,
        max_draft_tokens=msg.max_draft_tokens,
        max_ahead_rounds=msg.max_ahead_rounds,
        empty_ahead=msg.empty_ahead,
        eos_token_ids=tuple(msg.eos_token_ids) if msg.eos_listed or msg.eos_token_ids else None,
    )


def encode_info(info: EdgeInfo) -> pb.InfoResponse:
    return pb.InfoResponse(
        protocol_version=info.protocol_version,
        target_model=info.target_model,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        vocab_size=info.vocab_size,
        context_limit=info.context_limit,
        max_draft_tokens=info.max_draft_tokens,
        max_sessions=info.max_sessions,
        active_sessions=info.active_sessions,
        eos_token_ids=info.eos_token_ids,
        kv_bytes_in_use=info.kv_bytes_in_use,
        kv_bytes_reserved=info.kv_bytes_reserved,
        kv_budget_bytes=info.kv_budget_bytes,
        kv_pool_bytes=info.kv_pool_bytes,
        max_ahead_rounds=info.max_ahead_rounds,
    )


def decode_info(msg: pb.InfoResponse) -> EdgeInfo:
    """Fields an older edge omits read as proto3's 0 (no budget, no send-ahead); a vocabulary or
    context of 0 cannot be served against and is refused."""
    if msg.vocab_size < 1:
        raise WireError(f"Info: vocab_size must be >= 1, got {msg.vocab_size}")
    if msg.context_limit < 1:
        raise WireError(f"Info: context_limit must be >= 1, got {msg.context_limit}")
    return EdgeInfo(
        protocol_version=msg.protocol_version,
        target_model=msg.target_model,
        tokenizer_fingerprint=msg.tokenizer_fingerprint,
        vocab_size=msg.vocab_size,
        context_limit=msg.context_limit,
        max_draft_tokens=msg.max_draft_tokens,
        max_sessions=msg.max_sessions,
        active_sessions=msg.active_sessions,
        eos_token_ids=tuple(msg.eos_token_ids),
        kv_bytes_in_use=msg.kv_bytes_in_use,
        kv_bytes_reserved=msg.kv_bytes_reserved,
        kv_budget_bytes=msg.kv_budget_bytes,
        kv_pool_bytes=msg.kv_pool_bytes,
        max_ahead_rounds=msg.max_ahead_rounds,
    )


def encode_sparse(q: SparseDist) -> pb.SparseDist:
    """q as sent: its probabilities must be float16 values already (`truncate_top_m` makes them
    so), since the edge verifies with what it reads: a q rounded here would not be the one the
    draft was drawn from, and sampling would silently stop following the target's distribution."""
    probs16 = np.asarray(q.probs, dtype="<f2")
    if not np.array_equal(probs16, np.asarray(q.probs, dtype=np.float64), equal_nan=True):
        raise ValueError("q's probabilities are not float16 values: draw from the float16 q that is sent")
    return pb.SparseDist(ids=q.ids, probs_f16=probs16.tobytes())


def decode_sparse(msg: pb.SparseDist, vocab_size: int, where: str, drawn: int | None = None) -> SparseDist:
    """A draft's support q, its size capped before any per-id work, then checked as arrays
    (`_check_support`); `drawn`: the token drawn from it."""
    n = len(msg.ids)
    _check_support_size(n, where)
    if len(msg.probs_f16) != 2 * n:
        raise WireError(f"{where}: {n} ids but {len(msg.probs_f16)} bytes of float16 probs")
    probs = np.frombuffer(msg.probs_f16, dtype="<f2").astype(np.float32)
    ids = np.array(msg.ids, dtype=np.int64)  # int32 on the wire; int64 so no comparison can wrap
    _check_support(ids, probs, vocab_size, where, drawn)
    return SparseDist(ids=tuple(ids.tolist()), probs=tuple(probs.tolist()))


def _check_support_size(n: int, where: str) -> None:
    if n > MAX_Q_SUPPORT:
        raise WireError(f"{where}: a support of {n} ids exceeds the limit of {MAX_Q_SUPPORT}")


def _check_support(ids: np.ndarray, probs: np.ndarray, vocab_size: int, where: str, drawn: int | None) -> None:
    """One support's rules, in array operations: not empty, probabilities finite, >= 0 and not all
    zero, ids in the vocabulary and distinct, and `drawn` (when given) with a positive probability."""
    if not len(ids):
        raise WireError(f"{where}: empty support")
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or float(probs.sum()) <= 0:
        raise WireError(f"{where}: probabilities must be finite, >= 0 and not all zero")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise WireError(f"{where}: token id {int(ids[bad.argmax()])} out of range [0, {vocab_size})")
    ordered = np.sort(ids)
    if (ordered[1:] == ordered[:-1]).any():
        raise WireError(f"{where}: duplicate ids in the support")
    if drawn is not None and not (probs[ids == drawn] > 0).any():
        raise WireError(f"{where}: draft token {drawn} is not in its own support (q must be what it was drawn from)")


def check_ids(ids: tuple[int, ...] | list[int], vocab_size: int, where: str) -> None:
    bad = [i for i in ids if i < 0 or i >= vocab_size]
    if bad:
        raise WireError(f"{where}: token id {bad[0]} out of range [0, {vocab_size})")


def encode_block(block: DraftBlock) -> pb.DeviceMessage:
    if block.follow:  # send-ahead with no guess and no drafts: the parent round alone marks it
        return pb.DeviceMessage(draft=pb.DraftBlock(round=block.round, parent_round=block.round - 1))
    q = [encode_sparse(q) for q in block.q]
    if block.guess is None:
        return pb.DeviceMessage(draft=pb.DraftBlock(round=block.round, ids=block.ids, q=q))
    # Send-ahead: the guess leads the ids and the parent round marks the block (see the proto).
    msg = pb.DraftBlock(round=block.round, ids=(block.guess, *block.ids), q=q, parent_round=block.round - 1)
    return pb.DeviceMessage(draft=msg)


def decode_block(msg: pb.DraftBlock, vocab_size: int, greedy: bool, max_tokens: int) -> DraftBlock:
    ahead = msg.HasField("parent_round")
    if len(msg.ids) > max_tokens + ahead:  # before any per-id work; a guess is not a draft
        raise WireError(f"draft block of {len(msg.ids) - ahead} tokens exceeds the edge's limit of {max_tokens}")
    ids = tuple(int(i) for i in msg.ids)
    check_ids(ids, vocab_size, "draft ids")
    guess = None
    if ahead:
        if msg.parent_round + 1 != msg.round:
            raise WireError(f"send-ahead block: parent_round {msg.parent_round} must be round - 1 ({msg.round} - 1)")
        if not ids:  # no guess, no drafts: the next target token after whatever the parent gives
            if msg.q:
                raise WireError("empty send-ahead block: no ids, so no q")
            return DraftBlock(round=msg.round, ids=(), follow=True)
        guess, ids = ids[0], ids[1:]
    if greedy:
        if msg.q:
            raise WireError("greedy session: draft blocks carry ids only, no q")
        return DraftBlock(round=msg.round, ids=ids, guess=guess)
    if len(msg.q) != len(ids):
        raise WireError(f"sampling session: need one q per draft token, got {len(msg.q)} for {len(ids)}")
    qs = tuple(decode_sparse(q, vocab_size, f"q[{i}]", x) for i, (x, q) in enumerate(zip(ids, msg.q, strict=True)))
    return DraftBlock(round=msg.round, ids=ids, q=qs, guess=guess)


def check_block(block: DraftBlock, vocab_size: int, greedy: bool, max_tokens: int = 0) -> None:
    """Validate a decoded `DraftBlock` against its session (what `decode_block` guarantees, for
    blocks that did not come through it). `max_tokens` 0: no size limit. Raises `WireError`."""
    if max_tokens and block.k > max_tokens:
        raise WireError(f"draft block of {block.k} tokens exceeds the edge's limit of {max_tokens}")
    check_ids(block.ids, vocab_size, "draft ids")
    if block.follow and (block.ids or block.guess is not None):
        raise WireError("empty send-ahead block: no guess and no drafts")
    if block.guess is not None:
        check_ids((block.guess,), vocab_size, "send-ahead guess")
    if greedy:
        if block.q:
            raise WireError("greedy session: draft blocks carry ids only, no q")
        return
    if len(block.q) != block.k:
        raise WireError(f"sampling session: need one q per draft token, got {len(block.q)} for {block.k}")
    for i, (x, q) in enumerate(zip(block.ids, block.q, strict=True)):
        where = f"q[{i}]"
        if len(q.ids) != len(q.probs) or not q.ids:
            raise WireError(f"{where}: {len(q.ids)} ids but {len(q.probs)} probabilities")
        _check_support_size(len(q.ids), where)
        ids, probs = np.asarray(q.ids, dtype=np.int64), np.asarray(q.probs, dtype=np.float64)
        _check_support(ids, probs, vocab_size, where, x)


def clip(text: str, limit: int = 200) -> str:
    """A client-supplied string as it may appear in an error message: at most `limit` characters,
    else its head, an ellipsis and its length. Echoing it whole could make the status itself too
    big to send (gRPC then answers RESOURCE_EXHAUSTED instead of the real error)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def encode_verdict(v: Verdict) -> pb.EdgeMessage:
    return pb.EdgeMessage(
        verdict=pb.Verdict(
            round=v.round,
            n_accepted=v.n_accepted,
            next_token=v.next_token,
            queue_ms=v.queue_ms,
            compute_ms=v.compute_ms,
            batch_rows=v.batch_rows,
            stale=v.stale,
            more_tokens=v.more_tokens,
        )
    )


def decode_verdict(msg: pb.Verdict) -> Verdict:
    return Verdict(
        round=msg.round,
        n_accepted=msg.n_accepted,
        next_token=msg.next_token,
        queue_ms=msg.queue_ms,
        compute_ms=msg.compute_ms,
        batch_rows=msg.batch_rows,
        stale=msg.stale,
        more_tokens=tuple(msg.more_tokens),
    )


def encode_generate(round_no: int, max_tokens: int, tokens_per_message: int) -> pb.DeviceMessage:
    return pb.DeviceMessage(
        generate=pb.Generate(round=round_no, max_tokens=max_tokens, tokens_per_message=tokens_per_message)
    )


def join_streamed(verdicts: Sequence[Verdict], overlapped_ms: float = 0.0) -> Verdict:
    """Consecutive rounds' verdicts of streamed decoding (empty blocks, Generate) as one message's:
    the first round's, the later rounds' tokens in `more_tokens`, the forwards of all of them in
    `compute_ms` (the first round's wait stays its `queue_ms`) but `overlapped_ms`, the part that
    ran while the message before was still being sent: the device did not wait for it."""
    first = verdicts[0]
    if len(verdicts) == 1 and overlapped_ms <= 0:
        return first
    return replace(
        first,
        compute_ms=max(0.0, sum(v.compute_ms for v in verdicts) - max(0.0, overlapped_ms)),
        more_tokens=tuple(v.next_token for v in verdicts[1:]),
    )


def split_streamed(verdict: Verdict) -> list[Verdict]:
    """`join_streamed` undone: one verdict per round. The first keeps the wait and every forward's
    time, which it waited for (so the rest of its round is transport, as in any round); the others
    came with it and waited for nothing, edge time included."""
    if not verdict.more_tokens:
        return [verdict]
    first = replace(verdict, more_tokens=())
    rest = [
        replace(first, round=verdict.round + i, next_token=t, queue_ms=0.0, compute_ms=0.0)
        for i, t in enumerate(verdict.more_tokens, start=1)
    ]
    return [first, *rest]
