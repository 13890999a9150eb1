"""Ragged batched verification equals per-session verification. The stacked-cache
layout it was measured against is tested with its benchmark (`tests/benchmarks/test_kv_layouts.py`)."""

from __future__ import annotations

import random

import pytest
import torch

from gelato.device.drafter import Drafter
from gelato.edge.kv_pool import KVPool, PooledSequence, pooled_forward
from gelato.edge.pool_cache import mask_free_ok
from gelato.edge.sessions import TargetSession
from gelato.kv import KVSequence
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams, Verdict


def assert_same_kv(a: KVSequence, b: KVSequence, layers: int) -> None:
    assert b.tokens == a.tokens and b.cached == a.cached
    for layer in range(layers):
        for got, want in zip(b.layer_kv(layer), a.layer_kv(layer), strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["pool", "pool-gather"])
def test_batched_logits_and_caches_match_unbatched(target: LoadedModel, layout: str) -> None:
    """Ragged rows (prefix 1..40 tokens, blocks of 0..8 drafts) in one forward: every row's logits
    and KV equal the row run alone; `pool-gather` puts the rows in non-consecutive slots."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 300) for _ in range(n)] for n in (1, 5, 17, 40)]
    blocks = [tuple(rng.randrange(1, 300) for _ in range(k)) for k in (3, 0, 8, 1)]
    pool = KVPool(target.model, target.vocab_size, slots=2, context=16)  # both must grow
    if layout == "pool-gather":
        spacers = [PooledSequence(pool, [1, 2]) for _ in range(3)]
    alone: list[KVSequence] = []
    batched: list[PooledSequence] = []
    for i, prefix in enumerate(prefixes):
        alone.append(KVSequence(target.model, target.vocab_size, prefix))
        batched.append(PooledSequence(pool, prefix))
        if layout == "pool-gather" and i < 3:
            spacers[i].prefill(2)  # occupies the slot between two rows
        for seq in (alone[-1], batched[-1]):
            seq.prefill(len(prefix) - 1)
    want = [seq.forward(ids) for seq, ids in zip(alone, blocks, strict=True)]
    got = pooled_forward(list(zip(batched, blocks, strict=True)))
    slots = [seq.slot for seq in batched]
    assert (sorted(slots) == list(range(min(slots), min(slots) + 4))) == (layout == "pool"), slots
    for w, g, a, b in zip(want, got, alone, batched, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
        assert_same_kv(a, b, target.model.config.num_hidden_layers)


def test_pool_grows_keeps_contents_and_reuses_released_slots(target: LoadedModel) -> None:
    pool = KVPool(target.model, target.vocab_size, slots=1, context=4)
    first = PooledSequence(pool, list(range(1, 4)))
    first.prefill(3)
    before = [t.clone() for t in first.layer_kv(0)]
    others = [PooledSequence(pool, list(range(5, 5 + n))) for n in (9, 2)]
    for seq in others:
        seq.prefill(len(seq.tokens))
    assert pool.slots == 4 and pool.context == 16  # doubled twice each way
    for got, want in zip(first.layer_kv(0), before, strict=True):
        assert torch.equal(got, want)
    freed = others[0].slot
    others[0].release()
    others[0].release()  # idempotent
    with pytest.raises(RuntimeError, match="released"):
        others[0].forward([1])
    again = PooledSequence(pool, [7, 8])
    again.prefill(2)
    assert again.slot == freed  # lowest free slot first
    fresh = KVSequence(target.model, target.vocab_size, [7, 8])
    fresh.prefill(2)
    assert_same_kv(fresh, again, target.model.config.num_hidden_layers)
    with pytest.raises(ValueError, match="context limit"):
        pool.ensure_context(pool.max_context + 1)


@pytest.mark.parametrize("layout", ["pool", "pool-gather"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ragged_sessions_joining_and_leaving(
    target: LoadedModel, drafter_model: LoadedModel, temperature: float, layout: str
) -> None:
    """Sessions with different prompts and K, joining and finishing at different rounds, batched in
    one forward per round, produce exactly the tokens they produce alone (sampling included: each
    session has its own seeded RNG stream); `pool-gather` keeps a spacer row in the slot after
    each session's, so no batch's rows are consecutive slots."""
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
        pool = KVPool(target.model, target.vocab_size, slots=1, context=8)
        for i, prompt in enumerate(prompts):
            params = SamplingParams(temperature=temperature, top_k=30, seed=100 + i)
            d = Drafter(drafter_model, params)
            d.start(prompt)
            s = TargetSession(f"s{i}", target, params, prompt, pool=pool if batched else None)
            s.prefill()
            if batched and layout == "pool-gather":
                PooledSequence(pool, [1, 2]).prefill(2)  # takes the next slot: never in a batch
            sessions.append(s)
            drafters.append(d)
        for rnd in range(14):
            live = [i for i, (_, _, first, n) in enumerate(specs) if first <= rnd < first + n]
            blocks = {i: drafters[i].draft(specs[i][1], sessions[i].rounds) for i in live}
            if batched and live:
                bases = {i: len(sessions[i].seq.tokens) for i in live}
                logits = pooled_forward([(sessions[i].seq, blocks[i].ids) for i in live])
                verdicts = {i: sessions[i].accept(blocks[i], bases[i], lg) for i, lg in zip(live, logits, strict=True)}
            else:
                verdicts = {i: sessions[i].verify(blocks[i]) for i in live}
            for i, (a, nxt) in verdicts.items():
                drafters[i].apply(blocks[i], Verdict(round=0, n_accepted=a, next_token=nxt))
        return [s.seq.tokens for s in sessions]

    assert run(batched=True) == run(batched=False)


def test_row_at_the_context_limit_batches_with_a_long_block(target: LoadedModel) -> None:
    """The batch needs context up to the furthest row END, not longest cache + longest block: a
    row ending exactly at the limit and a row feeding a 31-token block run in one forward (before,
    62 cached + 31 = 93 > 64 failed both). Logits and KV equal each row alone, padding queries of
    the short row write no KV (its slot past its end keeps a sentinel), and the pool never grows
    past the limit."""
    limit = 64
    rng = random.Random(2)
    prefixes = [[rng.randrange(1, 300) for _ in range(n)] for n in (63, 3, 20)]
    blocks = [(rng.randrange(1, 300),), tuple(rng.randrange(1, 300) for _ in range(30)), (5, 6)]
    pool = KVPool(target.model, target.vocab_size, slots=4, context=limit, max_context=limit)
    rows = [PooledSequence(pool, p) for p in prefixes]
    alone = [KVSequence(target.model, target.vocab_size, p) for p in prefixes]
    for seq in (*rows, *alone):
        seq.prefill(len(seq.tokens) - 1)
    with torch.inference_mode():  # a sentinel past each row's future end (pool tensors are inference tensors)
        for layer in range(pool.layers):
            for seq, ids in zip(rows, blocks, strict=True):
                assert seq.slot is not None
                pool.keys[layer][seq.slot, :, len(seq.tokens) + len(ids) :] = 7.0
                pool.values[layer][seq.slot, :, len(seq.tokens) + len(ids) :] = 7.0
    got = pooled_forward(list(zip(rows, blocks, strict=True)))
    want = [seq.forward(ids) for seq, ids in zip(alone, blocks, strict=True)]
    assert rows[0].cached == limit and pool.context == limit
    for w, g, a, b in zip(want, got, alone, rows, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)
        assert_same_kv(a, b, target.model.config.num_hidden_layers)
        for layer in range(pool.layers):
            assert b.slot is not None
            assert bool((pool.keys[layer][b.slot, :, b.cached :] == 7.0).all())
            assert bool((pool.values[layer][b.slot, :, b.cached :] == 7.0).all())
    with pytest.raises(ValueError, match="context limit of 64"):  # a row of its own past the limit
        pooled_forward([(rows[1], tuple(range(1, 33)))])


def test_failed_forward_restores_every_row(target: LoadedModel) -> None:
    """A forward that raises leaves every row's tokens and cache as they were, so each row can be
    retried alone (the batcher's fallback); the good row's retry equals a fresh run."""
    pool = KVPool(target.model, target.vocab_size, slots=2, context=16)
    good, bad = PooledSequence(pool, [5, 6, 7]), PooledSequence(pool, [8, 9])
    for seq in (good, bad):
        seq.prefill(len(seq.tokens) - 1)
    with pytest.raises(IndexError):  # an id past the embedding table breaks the whole forward
        pooled_forward([(good, (1, 2)), (bad, (target.model.config.vocab_size + 5,))])
    assert (good.tokens, good.cached, bad.tokens, bad.cached) == ([5, 6, 7], 2, [8, 9], 1)
    with pytest.raises(ValueError, match="twice"):
        pooled_forward([(good, (1,)), (good, (2,))])
    (retry,) = pooled_forward([(good, (1, 2))])
    fresh = KVSequence(target.model, target.vocab_size, [5, 6, 7])
    fresh.prefill(2)
    torch.testing.assert_close(retry, fresh.forward((1, 2)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("slots_used", [(0,), (0, 1, 2), (0, 2)])
def test_one_query_rows_at_equal_ends_pass_no_mask(target: LoadedModel, slots_used: tuple[int, ...]) -> None:
    """Rows of one query each, all ending at the same length (a lone fixed-0 session, or several
    in step): every query sees every key, so with SDPA the model gets no mask at all. Their logits
    equal each row alone and the explicit-mask path's; a ragged batch still gets its mask."""
    assert mask_free_ok(target.model.config)  # the test target runs SDPA with full attention only
    pool = KVPool(target.model, target.vocab_size, slots=4, context=32)
    rng = random.Random(3)
    prefix = [rng.randrange(1, 300) for _ in range(12)]
    seqs = [PooledSequence(pool, list(prefix)) for _ in range(3)]
    for seq in seqs:
        seq.prefill(len(prefix))
    rows = [(seqs[i], (rng.randrange(1, 300),)) for i in slots_used]
    masks: list[object] = []
    hook = target.model.register_forward_pre_hook(
        lambda _m, _a, kw: masks.append(kw["attention_mask"]), with_kwargs=True
    )
    try:
        got = pooled_forward(rows)
        for seq, _ in rows:  # again on the same KV through the explicit mask
            seq.rewind(len(prefix), len(prefix))
        pool.mask_free = False
        explicit = pooled_forward(rows)
        pool.mask_free = True
        ragged = pooled_forward([(seqs[0], (5, 6)), (seqs[1], (7,))])
    finally:
        hook.remove()
    assert masks[0] is None and isinstance(masks[1], torch.Tensor) and isinstance(masks[2], torch.Tensor)
    assert len(ragged) == 2
    for (_, ids), g, e in zip(rows, got, explicit, strict=True):
        alone = KVSequence(target.model, target.vocab_size, list(prefix))
        alone.prefill(len(prefix))
        torch.testing.assert_close(g, alone.forward(ids), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)


def test_prefill_computes_only_the_last_logits_row(target: LoadedModel) -> None:
    """A prefill keeps no logits, so the model is asked for the last position's alone (a long
    prompt's full [n, vocab] float32 logits would cost more than its KV); its KV is the same as a
    full forward's: the next token's logits equal a `KVSequence` prefilled the usual way."""
    pool = KVPool(target.model, target.vocab_size, slots=2, context=64)
    prompt = [random.Random(5).randrange(1, 300) for _ in range(40)]
    shapes: list[tuple[int, ...]] = []
    hook = target.model.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.logits.shape)))
    try:
        seq = PooledSequence(pool, list(prompt))
        seq.prefill(len(prompt))
    finally:
        hook.remove()
    assert shapes == [(1, 1, shapes[0][2])]
    alone = KVSequence(target.model, target.vocab_size, list(prompt))
    alone.prefill(len(prompt))
    torch.testing.assert_close(seq.forward([7]), alone.forward([7]), atol=2e-5, rtol=1e-4)


def test_mask_free_only_for_sdpa_with_full_attention() -> None:
    from types import SimpleNamespace

    assert mask_free_ok(SimpleNamespace(_attn_implementation="sdpa", layer_types=None))
    assert mask_free_ok(SimpleNamespace(_attn_implementation="sdpa", layer_types=["full_attention"] * 4))
    assert not mask_free_ok(SimpleNamespace(_attn_implementation="eager", layer_types=None))
    assert not mask_free_ok(SimpleNamespace(_attn_implementation="sdpa", layer_types=["sliding_attention"]))


def test_a_slot_is_clean_for_its_next_owner(target: LoadedModel) -> None:
    """A former owner left non-finite KV in its slot (as a float16 overflow does). The session
    that takes the slot next attends over that stale KV past its own end whenever it is batched
    with a longer row (masked by a large negative, which hides finite values only): its logits
    must still equal its logits alone, not NaN."""
    pool = KVPool(target.model, target.vocab_size, slots=2, context=64)
    old = PooledSequence(pool, list(range(1, 40)))
    old.prefill(39)
    slot = old.slot
    with torch.inference_mode():  # the pool's tensors are inference tensors
        for store in (pool.keys, pool.values):
            for layer in store:
                layer[slot, :, :39] = float("nan")
    old.release()
    new = PooledSequence(pool, [4, 5, 6])
    new.prefill(2)
    assert new.slot == slot
    longer = PooledSequence(pool, list(range(50, 80)))
    longer.prefill(29)
    alone = KVSequence(target.model, target.vocab_size, [4, 5, 6])
    alone.prefill(2)
    got = pooled_forward([(new, (7, 8)), (longer, (9,))])[0]
    torch.testing.assert_close(got, alone.forward([7, 8]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("piece", [1, 7, 39, 40])
def test_a_prompt_prefilled_in_pieces_verifies_as_one_prefilled_at_once(target: LoadedModel, piece: int) -> None:
    """`TargetSession.prefill(max_tokens)` caches the prompt a piece at a time (the edge's
    `--prefill-chunk-tokens`): it says when it is done, and the session's KV and verdicts equal
    those of a session prefilled in one forward."""
    prompt = [random.Random(6).randrange(1, 300) for _ in range(40)]
    pool = KVPool(target.model, target.vocab_size, slots=2, context=64)
    pieces, whole = TargetSession("p", target, SamplingParams(), list(prompt), pool=pool), None
    calls = 1
    while not pieces.prefill(piece):
        calls += 1
        assert pieces.seq.cached == min(calls - 1, 39 // piece) * piece
    assert calls == -(-39 // piece) and pieces.seq.cached == 39
    whole = TargetSession("w", target, SamplingParams(), list(prompt), pool=pool)
    assert whole.prefill()
    for layer in range(target.model.config.num_hidden_layers):
        for got, want in zip(pieces.seq.layer_kv(layer), whole.seq.layer_kv(layer), strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    block = DraftBlock(round=0, ids=(7, 8, 9))
    assert pieces.verify(block) == whole.verify(block)
