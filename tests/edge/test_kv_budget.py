"""The KV budget bounds the memory the edge's slot pool really holds.

`plan_pool` is pure and checked exhaustively on a grid; the pool's reshaping (growth, shrinking
with live rows moved to low slots) is checked against rows computed alone; the registry is checked
to refuse what the pool could not hold within the budget and to give all memory back when idle.
What happens when the device has no memory for the planned shape is in test_kv_budget_oom.py, with
the pool that runs out (`_SmallMemory`) and the check (`_consistent`) defined here."""

from __future__ import annotations

import itertools
import random

import grpc
import pytest
import torch

from gelato.device.drafter import Drafter
from gelato.edge.kv_pool import KVPool, PooledSequence, pooled_forward
from gelato.edge.sessions import AdmissionError, SessionRegistry, StatusError, TargetSession, plan_pool
from gelato.edge.verifier import verify_batch
from gelato.kv import KVSequence
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams, Verdict


def test_plan_pool_grows_shrinks_with_hysteresis() -> None:
    shape = (0, 0)
    seen = []
    for sessions in (1, 2, 3, 5, 4, 3, 2, 1, 0):
        shape = plan_pool(shape, sessions, 100)
        seen.append(shape)
    assert [s for s, _ in seen] == [1, 2, 4, 8, 8, 8, 8, 2, 0]  # doubles; halves only when 4x too many
    assert {c for _, c in seen[:-1]} == {128}  # aligned to 64, kept while the longest stays 100
    assert plan_pool((4, 256), 4, 100) == (4, 256)  # within [tokens, 2 x aligned]: kept
    assert plan_pool((4, 256), 4, 60) == (4, 64)  # far too long now: shrunk
    assert plan_pool((4, 128), 4, 300) == (4, 320)  # too short: grown to what is needed


def test_plan_pool_within_budget_on_a_grid() -> None:
    """None exactly when sessions x tokens passes the budget; otherwise every session has a slot,
    every slot holds the longest reservation, and slots x context stays within the budget."""
    for (slots, context), sessions, tokens, budget in itertools.product(
        [(0, 0), (1, 64), (3, 100), (8, 512), (64, 4096)], range(0, 10), [1, 33, 64, 65, 200, 700], [0, 300, 1000, 5000]
    ):
        got = plan_pool((slots, context), sessions, tokens, budget)
        if budget and sessions * tokens > budget:
            assert got is None
            continue
        assert got is not None
        s, c = got
        if sessions == 0:
            assert got == (0, 0)
            continue
        assert s >= sessions and c >= tokens, (got, sessions, tokens)
        assert not budget or s * c <= budget, (got, sessions, tokens, budget)


def _fresh_logits(target: LoadedModel, tokens: list[int], nxt: list[int]) -> torch.Tensor:
    seq = KVSequence(target.model, target.vocab_size, tokens)
    seq.prefill(len(tokens))
    return seq.forward(nxt)


def test_pool_shrinks_moving_live_rows_and_frees_everything(target: LoadedModel) -> None:
    pool = KVPool(target.model, target.vocab_size, slots=0, context=0)
    pool.set_target(4, 64)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 300) for _ in range(n)] for n in (5, 17, 9, 30)]
    seqs = [PooledSequence(pool, p) for p in prompts]
    for seq in seqs:
        seq.prefill(len(seq.tokens))
    assert (pool.slots, pool.context) == (4, 64) and [s.slot for s in seqs] == [0, 1, 2, 3]
    for seq in seqs[:3]:
        seq.release()
    pool.set_target(1, 32)
    last = seqs[3]
    (logits,) = [last.forward([7, 8])]  # the forward applies the target first: row 3 moves to slot 0
    assert last.slot == 0 and (pool.slots, pool.context) == (1, 32)
    torch.testing.assert_close(logits, _fresh_logits(target, prompts[3], [7, 8]), atol=2e-5, rtol=1e-4)
    pool.set_target(0, 0)  # the row is still alive: nothing of it may be dropped ...
    pool.apply_target()
    assert (pool.slots, pool.context) == (1, 32)
    last.release()
    pool.apply_target()  # ... and the target, still pending, is taken once it is gone
    assert pool.nbytes() == 0


class _ReshapeOnAlloc(KVPool):
    """A pool whose next `alloc` first meets a reshape, as when the event loop's registry asks
    for one (a session opened or closed) while the model thread is forming a batch."""

    reshape: tuple[int, int] | None = None

    def alloc(self, owner: PooledSequence) -> int:
        if self.reshape is not None:
            self.set_target(*self.reshape)
            self.reshape = None
        return super().alloc(owner)


def test_a_slot_taken_mid_batch_does_not_move_rows_already_placed(target: LoadedModel) -> None:
    pool = _ReshapeOnAlloc(target.model, target.vocab_size, slots=0, context=0)
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 300) for _ in range(n)] for n in (4, 4, 4, 12)]
    seqs = [PooledSequence(pool, p) for p in prompts]
    for seq in seqs:
        seq.prefill(len(seq.tokens))  # slots 0, 1, 2, 3
    moved = seqs[3]
    for seq in seqs[:3]:
        seq.release()
    fresh = PooledSequence(pool, [9])  # a one-token prompt caches nothing: no slot until its forward
    fresh.prefill(0)
    assert fresh.slot is None and moved.slot == 3
    pool.reshape = (2, 64)  # lands when `fresh` takes its slot, inside the batch: row 3 moves down
    logits = pooled_forward([(moved, (7, 8)), (fresh, ())])
    assert moved.slot < 2 and fresh.slot < 2 and moved.slot != fresh.slot
    torch.testing.assert_close(logits[0], _fresh_logits(target, prompts[3], [7, 8]), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1], _fresh_logits(target, [], [9]), atol=2e-5, rtol=1e-4)


def _registry(target: LoadedModel, budget_tokens: int) -> SessionRegistry:
    bpt = KVPool(target.model, target.vocab_size, slots=0, context=0).bytes_per_token()
    return SessionRegistry(max_sessions=16, kv_budget_bytes=budget_tokens * bpt, max_draft_tokens=8)


def test_registry_refuses_what_the_pool_cannot_hold(target: LoadedModel) -> None:
    reg = _registry(target, 300)
    params = SamplingParams()
    long = reg.admit(target, params, [3] * 10, 200)  # reserves 10 + 200 + 8 + 1 = 219 tokens
    long.prefill()
    assert reg.reserved_bytes == 219 * reg.pool.bytes_per_token()
    # Reservations alone would fit (219 + 34 <= 300), but every slot is as long as the longest.
    with pytest.raises(AdmissionError, match="KV budget exhausted: this session reserves 34 tokens; 2 sessions"):
        reg.admit(target, params, [3] * 5, 20)
    reg.release(long.session_id)
    shorts = [reg.admit(target, params, [3] * 5, 20) for _ in range(8)]  # 8 x 34 <= 300
    with pytest.raises(AdmissionError, match="KV budget"):
        reg.admit(target, params, [3] * 5, 20)
    for s in shorts:
        s.prefill()
        assert reg.pool.nbytes() <= reg.kv_budget_bytes
    for s in shorts:
        reg.release(s.session_id)
    # More than the whole budget even alone: said so, with nothing about trying again later.
    with pytest.raises(AdmissionError, match="too small for this session: it reserves 309 tokens") as info:
        reg.admit(target, params, [3] * 100, 200)
    assert "try again" not in str(info.value) and "max_new_tokens 200" in str(info.value)
    assert len(reg) == 0 and reg.reserved_bytes == 0 and reg.pool_bytes() == 0


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_sessions_under_a_tight_budget_match_solo(
    target: LoadedModel, drafter_model: LoadedModel, temperature: float
) -> None:
    """Sessions join and leave through the registry, so the pool grows, shrinks and moves live rows
    between rounds; every session still produces exactly its solo tokens, and the pool never holds
    more than the budget."""
    rng = random.Random(2)
    # Five open at once, then only the one in slot 4 is left (the pool halves: it moves to slot 0),
    # then two more join.
    specs = [(4, 3, 0, 2), (20, 6, 0, 3), (9, 2, 0, 2), (12, 5, 0, 3), (6, 8, 0, 9), (15, 1, 4, 5), (7, 4, 5, 4)]
    prompts = [[rng.randrange(1, 300) for _ in range(n)] for n, *_ in specs]
    max_new = 90  # reservations cover every session's length (K=8 for 9 rounds adds at most 81)
    budget_tokens = 5 * (20 + max_new + 9)  # five sessions at a time, the longest reservation each
    moved = []

    def run(batched: bool) -> list[list[int]]:
        reg = _registry(target, budget_tokens)
        sessions: dict[int, TargetSession] = {}
        drafters: dict[int, Drafter] = {}
        out: dict[int, list[int]] = {}
        slots: dict[int, int | None] = {}  # each live session's slot at the last forward
        for rnd in range(12):
            for i, (_, _, first, n) in enumerate(specs):
                if rnd == first:
                    params = SamplingParams(temperature=temperature, top_k=30, seed=7 + i)
                    sessions[i] = (
                        reg.admit(target, params, prompts[i], max_new)
                        if batched
                        else TargetSession(f"s{i}", target, params, prompts[i])
                    )
                    sessions[i].prefill()
                    drafters[i] = Drafter(drafter_model, params)
                    drafters[i].start(prompts[i])
                if rnd == first + n:
                    out[i] = list(sessions[i].seq.tokens)
                    if batched:
                        reg.release(sessions.pop(i).session_id)
                    else:
                        sessions.pop(i).close()
            live = sorted(sessions)
            blocks = {i: drafters[i].draft(specs[i][1], sessions[i].rounds) for i in live}
            if batched and live:
                bases = {i: len(sessions[i].seq.tokens) for i in live}
                logits = pooled_forward([(sessions[i].seq, blocks[i].ids) for i in live])
                verdicts = {i: sessions[i].accept(blocks[i], bases[i], lg) for i, lg in zip(live, logits, strict=True)}
                assert reg.pool_bytes() <= reg.kv_budget_bytes
                moved.extend(
                    (rnd, i, slots[i], sessions[i].seq.slot)
                    for i in live
                    if slots.get(i, -1) not in (-1, sessions[i].seq.slot)
                )
                slots = {i: sessions[i].seq.slot for i in live}
            else:
                verdicts = {i: sessions[i].verify(blocks[i]) for i in live}
            for i, (a, nxt) in verdicts.items():
                drafters[i].apply(blocks[i], Verdict(round=0, n_accepted=a, next_token=nxt))
        if batched:
            assert reg.pool_bytes() == 0 and moved == [(3, 4, 4, 0)], moved
        return [out[i] for i in range(len(specs))]

    assert run(batched=True) == run(batched=False)


class _SmallMemory(KVPool):
    """A pool on a device that holds at most `tokens` (slots x context) per layer tensor and
    fails the allocation after `fail_after` more of those, as a GPU runs out of memory part-way
    through a reshape (the allocations before it succeeded)."""

    tokens = 1 << 30
    fail_after = 0
    attempts = 0  # allocations asked for past `tokens`

    def _alloc(self, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
        if shape[0] * shape[2] > self.tokens:
            self.attempts += 1
            if self.fail_after <= 0:
                raise torch.OutOfMemoryError(f"simulated: no memory for {shape}")
            self.fail_after -= 1
        return super()._alloc(shape, device)


def _held_bytes(pool: KVPool) -> int:
    return sum(t.numel() * t.element_size() for t in [*pool.keys, *pool.values])


def _consistent(pool: KVPool) -> None:
    """Every layer has the shape the pool reports, and the pool reports the bytes it holds."""
    shape = (pool.slots, pool.kv_heads, pool.context, pool.head_dim)
    assert [tuple(t.shape) for t in [*pool.keys, *pool.values]] == [shape] * (2 * pool.layers)
    assert _held_bytes(pool) == pool.nbytes()


def test_a_block_of_a_released_session_still_queued_is_refused_not_verified(target: LoadedModel) -> None:
    """A device goes away while its block waits on the model thread: the registry releases the
    session on the event loop (and re-plans the pool without it) before its slot is given back
    behind that batch. The block is refused FAILED_PRECONDITION, the other rows are verified as
    alone, and the pool keeps the planned shape (the dead row was verified for nobody, and its
    context, past the new plan, doubled the pool past the budget)."""
    deferred: list[TargetSession] = []
    reg = SessionRegistry(max_sessions=8, kv_budget_bytes=0, max_draft_tokens=8, closer=deferred.append)
    prompts = [[5, 6, 7], [6, 7, 8], [7, 8, 9], [i % 300 + 1 for i in range(200)]]
    sessions = [reg.admit(target, SamplingParams(), p, 40 if len(p) < 10 else 100) for p in prompts]
    solo = [TargetSession(f"solo{i}", target, SamplingParams(), p) for i, p in enumerate(prompts[:3])]
    for s in sessions + solo:
        s.prefill()
    gone = sessions[3]
    reg.release(gone.session_id)  # its close is still on its way to the model thread
    block = DraftBlock(round=0, ids=(9, 9, 9))
    out = verify_batch([(s, block) for s in sessions])
    assert isinstance(out[3], StatusError) and out[3].code == grpc.StatusCode.FAILED_PRECONDITION, out[3]
    assert [(o.n_accepted, o.next_token) for o in out[:3]] == [s.verify(block) for s in solo]  # type: ignore[union-attr]
    assert gone.rounds == 0 and len(gone.seq.tokens) == len(prompts[3])
    assert reg.pool is not None and reg.pool.context <= max(reg.shape[1], gone.seq.cached)
    for s in deferred:
        s.close()
    assert (reg.pool.slots, reg.pool.context) == reg.shape
    _consistent(reg.pool)
