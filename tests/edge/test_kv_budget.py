"""The KV budget bounds the memory the edge's slot pool really holds.

`plan_pool` is pure and checked exhaustively on a grid; the pool's reshaping (growth, shrinking
with live rows moved to low slots) is checked against rows computed alone; the registry is checked
to refuse what the pool could not hold within the budget and to give all memory back when idle."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import grpc
import pytest
import torch

from gelato.device.drafter import Drafter
from gelato.edge.kv_pool import KVPool, PooledSequence, PoolMemoryError, plan_pool, pooled_forward
from gelato.edge.sessions import AdmissionError, SessionRegistry, StatusError, TargetSession
from gelato.edge.verifier import Accepted, verify_batch
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


def test_a_reshape_that_runs_out_of_memory_leaves_the_pool_and_its_sessions_as_they_were(
    target: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session admitted with a long reservation asks the pool to grow; the allocation fails
    part-way. The layers already grown go back (no memory held beyond what the pool reports),
    the target stays pending without being tried at every forward, and the other sessions' rows,
    which fit the shape the pool still has, are verified as if nothing happened (once every row
    of that forward failed, and the pool kept the grown layers forever)."""
    pool = _SmallMemory(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
    reg = SessionRegistry(max_sessions=8, kv_budget_bytes=0, max_draft_tokens=8)
    reg.pool = pool
    rng = random.Random(2)
    prompts = [[rng.randrange(1, 300) for _ in range(n)] for n in (5, 9, 7)]
    sessions = [reg.admit(target, SamplingParams(), p, 16) for p in prompts]
    solo = [TargetSession(f"solo{i}", target, SamplingParams(), p) for i, p in enumerate(prompts)]
    for s in sessions + solo:
        s.prefill()
    _consistent(pool)
    before = (pool.slots, pool.context)
    reg.admit(target, SamplingParams(), [1], 0)  # up to the context limit: every slot that long
    planned = pool._target
    pool.tokens, pool.fail_after = before[0] * before[1] * 2, 3  # three layers grow, the fourth fails
    for r in range(3):
        blocks = [DraftBlock(round=r, ids=(11, 12)) for _ in sessions]
        outcomes = verify_batch(list(zip(sessions, blocks, strict=True)))
        assert all(isinstance(o, Accepted) for o in outcomes), outcomes
        alone = [s.verify(b) for s, b in zip(solo, blocks, strict=True)]
        assert [(o.n_accepted, o.next_token) for o in outcomes] == alone  # type: ignore[union-attr]
        assert (pool.slots, pool.context) == before and pool._target == planned
        assert pool.attempts == 4  # the one reshape's: three layers grown, the fourth failed
        _consistent(pool)


class _ShrinkOutOfMemory(KVPool):
    """A device that, once `short` is set, lets `short` allocations through and then has no
    memory at all: a shrink fails part-way and so does the undo's re-allocation of the old shape."""

    short: int | None = None

    def _alloc(self, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
        if self.short is not None:
            if self.short <= 0:
                raise torch.OutOfMemoryError(f"simulated: no memory for {shape}")
            self.short -= 1
        return super()._alloc(shape, device)


def test_a_shrink_whose_undo_finds_no_memory_leaves_one_shape_and_the_rows_intact(target: LoadedModel) -> None:
    """The pool shrinks from 4 x 64 to 2 x 64 with two live rows; the third layer's allocation
    fails and so does the undo's (the old, larger shape). Once the pool was left with layers of
    two shapes while reporting the old one, and the next forward or reshape could fail every row:
    now each layer is a view of the 2 x 64 part both shapes hold, the rows' forwards equal those
    of rows that never met the failure, the memory held is reported, and the next reshape (memory
    back) gives the pool one allocation per layer again."""
    pool = _ShrinkOutOfMemory(target.model, target.vocab_size, slots=4, context=64)
    ref = KVPool(target.model, target.vocab_size, slots=4, context=64)
    prompts = [[3, 4, 5, 6], [7, 8, 9]]
    seqs = [PooledSequence(pool, list(p)) for p in prompts]
    refs = [PooledSequence(ref, list(p)) for p in prompts]
    for seq in seqs + refs:
        seq.prefill(len(seq.tokens))
    held = pool.nbytes()
    pool.short = 2  # two layers' keys shrink, the third fails, and the undo finds nothing
    pool.set_target(2, 64)
    got = pooled_forward([(seq, (11, 12)) for seq in seqs])  # the reshape fails; the rows go on
    want = pooled_forward([(seq, (11, 12)) for seq in refs])
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert (pool.slots, pool.context) == (2, 64)
    assert {tuple(t.shape) for t in [*pool.keys, *pool.values]} == {(2, pool.kv_heads, 64, pool.head_dim)}
    assert pool.nbytes() == held - 2 * (2 * 64 * pool.bytes_per_token() // (2 * pool.layers))  # two layers shrank
    pool.short = None  # memory back: a new row grows the pool, one allocation per layer again
    third = PooledSequence(pool, [1, 2, 3])
    third.prefill(3)
    again = pooled_forward([(seq, (13,)) for seq in [*seqs, third]])
    third_ref = PooledSequence(ref, [1, 2, 3])
    third_ref.prefill(3)
    want = pooled_forward([(seq, (13,)) for seq in [*refs, third_ref]])
    assert all(torch.equal(g, w) for g, w in zip(again, want, strict=True))
    _consistent(pool)


def test_a_new_session_takes_the_planned_shape_or_fails_never_a_doubling_past_it(target: LoadedModel) -> None:
    """The registry planned 6 slots (its budget's shape) and the device had no memory for them. A
    new session then finding no free slot asks for those 6 again, not for 8 by doubling (past
    the budget): it fails alone while the memory is short, and gets its slot in a pool of 6 once
    the memory is there."""
    pool = _SmallMemory(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
    pool.set_target(4, 64)
    seqs = [PooledSequence(pool, [3 + i, 4, 5]) for i in range(4)]
    for seq in seqs:
        seq.prefill(3)
    assert (pool.slots, pool.context) == (4, 64)
    pool.tokens = 4 * 64  # no more memory
    pool.set_target(6, 64)
    pooled_forward([(seq, (7,)) for seq in seqs])  # the reshape fails; the rows go on
    fifth = PooledSequence(pool, [9, 9, 9])
    with pytest.raises(PoolMemoryError, match="6 slots x 64 tokens"):
        fifth.prefill(3)
    assert (pool.slots, pool.context) == (4, 64) and fifth.slot is None
    pool.tokens = 7 * 64  # room for the planned 6, not for a doubling to 8
    fifth.prefill(3)
    assert (pool.slots, pool.context) == (6, 64) and fifth.slot == 4 and pool._target is None
    _consistent(pool)


def test_a_pending_shape_taken_for_a_longer_context_moves_rows_before_their_slots_are_read(
    target: LoadedModel,
) -> None:
    """A shape the device once had no memory for stays pending; a session closing then leaves a
    hole below a live row. When a row later needs a longer context and the memory is back, taking
    that shape moves the live row down and shrinks the pool: the forward must use the rows' new
    slots (it used their old ones, past the shrunk pool: IndexError, on a GPU a device-side
    assert), and every row's verdict is the one it gets alone."""
    pool = _SmallMemory(target.model, target.vocab_size, slots=4, context=64, max_context=target.context_limit)
    prompts = [list(range(1, 50)), [4, 5, 6], [5, 6, 7], [6, 7, 8]]
    sessions = [TargetSession(f"s{i}", target, SamplingParams(), p, pool=pool) for i, p in enumerate(prompts)]
    solo = [TargetSession(f"solo{i}", target, SamplingParams(), p) for i, p in enumerate(prompts)]
    for s in sessions + solo:
        s.prefill()
    assert [s.seq.slot for s in sessions] == [0, 1, 2, 3]
    pool.tokens = 4 * 64  # no memory for more
    pool.set_target(3, 128)
    assert isinstance(verify_batch([(sessions[1], DraftBlock(round=0, ids=()))])[0], Accepted)
    assert (pool.slots, pool.context) == (4, 64) and pool._failed == (3, 128)  # pending, not retried
    sessions[1].close()  # its slot 1 is free; the pending shape is not tried again
    pool.tokens = 1 << 30  # the memory is back
    long_block, short_block = DraftBlock(round=0, ids=tuple(range(60, 80))), DraftBlock(round=0, ids=(7,))
    out = verify_batch([(sessions[0], long_block), (sessions[3], short_block)])
    # one forward for both (batch_rows 2), not the fallback that re-runs each row alone
    assert all(isinstance(o, Accepted) and o.batch_rows == 2 for o in out), out
    alone = [solo[0].verify(long_block), solo[3].verify(short_block)]
    assert [(o.n_accepted, o.next_token) for o in out] == alone  # type: ignore[union-attr]
    assert (pool.slots, pool.context) == (3, 128) and sessions[3].seq.slot == 1
    _consistent(pool)


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


def test_a_row_that_needs_memory_the_pool_cannot_get_fails_alone(target: LoadedModel) -> None:
    """Growing the context for one long row fails: that row's outcome is `PoolMemoryError` (the
    server answers it RESOURCE_EXHAUSTED), the rows batched with it are verified as alone, and
    the pool is as it was."""
    pool = _SmallMemory(target.model, target.vocab_size, slots=2, context=64)
    long = TargetSession("long", target, SamplingParams(), list(range(1, 60)), pool=pool)
    short = TargetSession("short", target, SamplingParams(), [4, 5, 6], pool=pool)
    alone = TargetSession("alone", target, SamplingParams(), [4, 5, 6])
    for s in (long, short, alone):
        s.prefill()
    pool.tokens = 2 * 64  # no room to grow at all
    block = DraftBlock(round=0, ids=(7, 8, 9, 10, 11, 12, 13, 14))  # 59 + 8 tokens > 64
    out = verify_batch([(long, block), (short, block)])
    assert isinstance(out[0], PoolMemoryError) and "could not grow to 2 slots x 128 tokens" in str(out[0])
    # The allocator's own text stays in the cause (logged), not in what a device is sent.
    assert "simulated" not in str(out[0]) and "simulated" in str(out[0].__cause__)
    assert isinstance(out[1], Accepted) and (out[1].n_accepted, out[1].next_token) == alone.verify(block)
    assert len(long.seq.tokens) == 59 and long.rounds == 0  # the failed row as before
    assert (pool.slots, pool.context) == (2, 64)
    _consistent(pool)


def test_a_session_the_edge_has_no_kv_memory_for_is_refused_and_the_others_go_on(pair: dict[str, Path]) -> None:
    """Over real gRPC, an edge whose device memory holds one session's KV: a second session's
    open cannot get a slot and ends RESOURCE_EXHAUSTED naming the memory (it was INTERNAL, or,
    when another session's forward met the reshape first, that session failed instead), while
    the first session goes on being verified."""
    from gelato.edge.server import EdgeConfig, EdgeServer
    from gelato.v1 import gelato_pb2 as pb
    from gelato.v1 import gelato_pb2_grpc as pb_grpc
    from tests.edge.test_server_errors import draft, open_msg

    async def scenario() -> tuple[list[int], grpc.aio.AioRpcError, list[int]]:
        server = EdgeServer(EdgeConfig(port=0))
        port = await server.start()
        loaded = await server.load(str(pair["target"]), "float32", "cpu")
        small = _SmallMemory(loaded.model, loaded.vocab_size, slots=0, context=0, max_context=loaded.context_limit)
        small.tokens = 64  # one slot of 64 tokens: one session's reservation
        server.service.registry.pool = small
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GelatoStub(channel)
        try:
            first = stub.Session()
            await first.write(open_msg(loaded.fingerprint))
            assert (await first.read()).WhichOneof("kind") == "opened"
            tokens = []
            for r in range(2):
                await first.write(draft(r, []))
                tokens.append((await first.read()).verdict.next_token)
            second = stub.Session()
            await second.write(open_msg(loaded.fingerprint))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await second.read()
            rejected = server.service.metrics.registry.get_sample_value
            assert rejected("gelato_edge_sessions_rejected_total", {"reason": "kv_memory"}) == 1
            assert rejected("gelato_edge_sessions_rejected_total", {"reason": "admission"}) == 0
            for r in range(2, 4):
                await first.write(draft(r, []))
                tokens.append((await first.read()).verdict.next_token)
            await first.write(pb.DeviceMessage(close=pb.CloseSession()))
            await first.done_writing()
            alone = stub.Session()
            await alone.write(open_msg(loaded.fingerprint))
            await alone.read()
            ref = []
            for r in range(4):
                await alone.write(draft(r, []))
                ref.append((await alone.read()).verdict.next_token)
            alone.cancel()
            return tokens, refused.value, ref
        finally:
            await channel.close()
            await server.stop(0)

    tokens, refused, ref = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
    assert "edge out of KV memory" in (refused.details() or "")
    assert tokens == ref


@pytest.mark.parametrize(
    ("error", "code", "at_open", "at_block"),
    [
        (
            torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 2 GiB; process 4242 has 70 GiB"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "edge out of memory",
            "edge out of memory",
        ),
        (
            RuntimeError("simulated fault in /srv/secret/model.py, shape [3, 7]"),
            grpc.StatusCode.INTERNAL,
            "edge error (RuntimeError), incident ",
            "verification failed (RuntimeError), incident ",
        ),
    ],
    ids=["out-of-memory", "fault"],
)
def test_a_forward_failing_ends_its_session_alone_and_says_no_more_than_its_kind(
    pair: dict[str, Path], error: Exception, code: grpc.StatusCode, at_open: str, at_block: str
) -> None:
    """A forward that finds no memory for its activations (not the KV pool's: a prompt prefilled
    at once, a long block) is the device being full, not a server fault: that session ends
    RESOURCE_EXHAUSTED "edge out of memory" (it was INTERNAL "verification failed"), at open or at
    a block, and the next session is served as before. Any other failure of the forward is that
    session's INTERNAL. Neither status carries the exception's text (a CUDA allocator's names other
    processes; paths, shapes): the kind and an incident id that the edge's log line names."""
    from gelato.edge.server import EdgeConfig, EdgeServer
    from gelato.v1 import gelato_pb2_grpc as pb_grpc
    from tests.edge.test_server_errors import draft, open_msg

    async def scenario() -> list[grpc.aio.AioRpcError]:
        server = EdgeServer(EdgeConfig(port=0))
        port = await server.start()
        loaded = await server.load(str(pair["target"]), "float32", "cpu")
        forward, armed = loaded.model.forward, [False]

        def short_of_memory(*args: object, **kw: object) -> object:
            if armed[0]:
                raise error
            return forward(*args, **kw)

        async def refused(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 30)
            armed[0] = False
            return info.value

        loaded.model.forward = short_of_memory
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GelatoStub(channel)
        try:
            at_open = stub.Session()
            armed[0] = True  # the prompt's prefill finds no memory
            await at_open.write(open_msg(loaded.fingerprint))
            errors = [await refused(at_open)]
            at_block = stub.Session()
            await at_block.write(open_msg(loaded.fingerprint))
            assert (await asyncio.wait_for(at_block.read(), 30)).WhichOneof("kind") == "opened"
            armed[0] = True  # the block's forward finds none (alone, and again when re-run alone)
            await at_block.write(draft(0, [1, 2, 3]))
            errors.append(await refused(at_block))
            after = stub.Session()  # the edge goes on
            await after.write(open_msg(loaded.fingerprint))
            await asyncio.wait_for(after.read(), 30)
            await after.write(draft(0, [1]))
            assert (await asyncio.wait_for(after.read(), 30)).WhichOneof("kind") == "verdict"
            after.cancel()
            return errors
        finally:
            loaded.model.forward = forward
            await channel.close()
            await server.stop(0)

    for exc, needle in zip(asyncio.run(scenario()), (at_open, at_block), strict=True):
        details = exc.details() or ""
        assert exc.code() == code and needle in details and "incident" in details, details
        assert "simulated" not in details and "secret" not in details and "4242" not in details, details


def test_a_reshape_failing_for_another_reason_is_not_called_out_of_memory(target: LoadedModel) -> None:
    """Only an allocation failure becomes `PoolMemoryError` (RESOURCE_EXHAUSTED "edge out of KV
    memory"); any other error is raised as it is (a server fault), the pool put back all the same."""

    class Broken(KVPool):
        def _alloc(self, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
            if shape[2] > 64:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super()._alloc(shape, device)

    pool = Broken(target.model, target.vocab_size, slots=2, context=64)
    with pytest.raises(RuntimeError, match="illegal memory access") as info:
        pool.ensure_context(100)
    assert not isinstance(info.value, PoolMemoryError)
    assert (pool.slots, pool.context) == (2, 64)
    _consistent(pool)


@pytest.mark.parametrize("prompt", [[1, 2, 3, 4, 5], [9]], ids=["prompt", "one-token prompt"])
def test_an_open_takes_the_room_it_was_admitted_for_or_fails_then(target: LoadedModel, prompt: list[int]) -> None:
    """A session admitted for up to the context limit, while the device's memory holds only the
    short pool the other sessions need: its open (the prefill, on the model thread) fails with
    `PoolMemoryError` (RESOURCE_EXHAUSTED at open). It took a free slot of the short pool, was
    answered opened, and failed rounds later when its length passed that context; a one-token
    prompt, with nothing to cache, took no slot at all and failed its first draft. Once the memory
    is there, the open takes the planned shape and the generation runs past the old context."""
    reg = SessionRegistry(max_sessions=8, kv_budget_bytes=0, max_draft_tokens=8)
    reg.pool = _SmallMemory(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
    others = [reg.admit(target, SamplingParams(), [5 + i, 6, 7], 16) for i in range(3)]
    for s in others:
        s.prefill()
    assert (reg.pool.slots, reg.pool.context) == (4, 64)  # a free slot, a short context
    reg.pool.tokens = 4 * 64  # the device's memory is full
    new = reg.admit(target, SamplingParams(), prompt, 0)  # reserves up to the context limit
    assert new.reserved_tokens > 64
    with pytest.raises(PoolMemoryError):
        new.prefill()
    reg.release(new.session_id)
    new.close()
    assert (reg.pool.slots, reg.pool.context) == (4, 64) and len(reg.pool._owners) == 3
    reg.pool.tokens = 1 << 30  # memory back
    again = reg.admit(target, SamplingParams(), prompt, 0)
    assert again.prefill() and reg.pool.context >= again.reserved_tokens
    while again.length <= 64:  # past the old context; every round adds a token at least
        assert isinstance(verify_batch([(again, DraftBlock(round=again.rounds, ids=(9,) * 8))])[0], Accepted)
    _consistent(reg.pool)
