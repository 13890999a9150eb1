"""A session released while its block is in a batched forward: the registry's plan no longer
counts its row, but the forward still runs it. The pool then grows by that row's need alone, not
by a doubling past the KV budget the plan kept to, and every row's verdict is the one it gets
alone."""

from __future__ import annotations

from typing import Any

import pytest

from gelato.edge.kv_pool import KVPool, pooled_forward
from gelato.edge.sessions import TargetSession
from gelato.edge.verifier import verify_batch
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams


def test_a_row_released_mid_batch_grows_the_pool_by_its_need_not_a_doubling(target: LoadedModel) -> None:
    pool = KVPool(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
    pool.set_target(2, 64)  # the plan for a long reservation (A) and a short one (B)
    prompts = [list(range(1, 63)), [4, 5, 6]]
    a, b = (TargetSession(f"s{i}", target, SamplingParams(), p, pool=pool) for i, p in enumerate(prompts))
    solo = [TargetSession(f"solo{i}", target, SamplingParams(), p) for i, p in enumerate(prompts)]
    for s in (a, b, *solo):
        s.prefill()
    assert (pool.slots, pool.context) == (2, 64) and a.seq.cached == 61
    # A's device went away after the verifier checked A: the registry plans for B alone, and A's
    # close is still queued behind this forward.
    pool.set_target(1, 16)
    blocks = [DraftBlock(round=0, ids=(70, 71, 72, 73, 74)), DraftBlock(round=0, ids=(7,))]
    out = verify_batch([(a, blocks[0]), (b, blocks[1])])
    alone = [solo[0].verify(blocks[0]), solo[1].verify(blocks[1])]
    assert [(o.n_accepted, o.next_token) for o in out] == alone  # type: ignore[union-attr]
    # A's forward needed 62 + 5 = 67 tokens of context: that, not 2 x 61 = 122 (past the plan).
    assert pool.slots == 2 and 67 <= pool.context <= 68, (pool.slots, pool.context)
    a.close()
    pooled_forward([(b.seq, (8,))])  # the next forward takes the plan
    assert (pool.slots, pool.context) == (1, 16)


def test_a_row_that_cannot_be_put_back_fails_alone_and_the_others_are_verified(
    target: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One row's acceptance fails, and putting it back fails too (in float16 a rollback zeroes KV:
    a device error there). The rows after it had their drafts appended by the batched forward;
    the clean-up stopped at the broken row, so they were re-run alone with their drafts fed twice
    (a wrong verdict). Each row is put back on its own: the broken one fails, the rest are right."""
    pool = KVPool(target.model, target.vocab_size, slots=3, context=64)
    prompts = [[5, 6, 7], [6, 7, 8], [7, 8, 9]]
    sessions = [TargetSession(f"s{i}", target, SamplingParams(), p, pool=pool) for i, p in enumerate(prompts)]
    solo = [TargetSession(f"solo{i}", target, SamplingParams(), p) for i, p in enumerate(prompts)]
    for s in sessions + solo:
        s.prefill()
    broken = sessions[0]
    accept, rewind = TargetSession.accept, type(broken.seq).rewind

    def accept_fails(self: TargetSession, *args: Any) -> Any:
        if self is broken:
            raise RuntimeError("simulated: acceptance failed")
        return accept(self, *args)

    def rewind_fails(self: Any, *args: Any) -> None:
        if self is broken.seq:
            raise RuntimeError("simulated: device error while zeroing KV")
        rewind(self, *args)

    monkeypatch.setattr(TargetSession, "accept", accept_fails)
    monkeypatch.setattr(type(broken.seq), "rewind", rewind_fails)
    block = DraftBlock(round=0, ids=(9, 4, 2))
    out = verify_batch([(s, block) for s in sessions])
    assert isinstance(out[0], RuntimeError) and "device error" in str(out[0])
    assert [(o.n_accepted, o.next_token) for o in out[1:]] == [s.verify(block) for s in solo[1:]]  # type: ignore[union-attr]
    assert [len(s.seq.tokens) for s in sessions[1:]] == [len(s.seq.tokens) for s in solo[1:]]
