"""The edge's KV pool when the device has no memory for the shape it planned: a reshape, a shrink and
its undo, a new session's slot, a pending shape, a long row, an open failing part-way or for another
reason leave the pool one consistent shape and the other rows verified as alone; over real gRPC a
session with no memory (KV or a forward's) ends RESOURCE_EXHAUSTED alone and the others go on."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest
import torch

from gelato.edge.kv_pool import KVPool, PooledSequence, PoolMemoryError, pooled_forward
from gelato.edge.sessions import SessionRegistry, TargetSession, plan_pool
from gelato.edge.verifier import Accepted, verify_batch
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams
from tests.edge.test_kv_budget import _consistent, _SmallMemory


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


def test_a_new_session_takes_its_own_slot_where_the_planned_headroom_finds_no_memory(target: LoadedModel) -> None:
    """With no KV budget the registry plans slots by doubling (4 -> 8). A device with room for 5
    but not 8 once refused the fifth session (its open retried the 8 and failed): the edge stayed
    capped below what fits. The fifth now gets one more slot; the eighth-slot plan stays pending,
    taken once the memory is there. A longer context likewise falls back to the row's own length."""
    pool = _SmallMemory(target.model, target.vocab_size, slots=0, context=0, max_context=target.context_limit)
    pool.set_target(4, 64)
    seqs = [PooledSequence(pool, [3 + i, 4, 5]) for i in range(4)]
    for seq in seqs:
        seq.prefill(3)
    pool.tokens = 5 * 64  # room for one more slot, not for the doubling
    pool.set_target(8, 64)
    fifth = PooledSequence(pool, [9, 9, 9])
    fifth.prefill(3)
    assert (pool.slots, pool.context) == (5, 64) and fifth.slot == 4 and pool._target == (8, 64)
    sixth = PooledSequence(pool, [8, 8, 8])
    with pytest.raises(PoolMemoryError, match="8 slots x 64 tokens"):  # the planned shape is named
        sixth.prefill(3)
    assert (pool.slots, pool.context) == (5, 64) and sixth.slot is None
    # A row that needs 100 tokens: the plan's (8, 128) finds no memory, its own (5, 100) does.
    pool.tokens = 5 * 100
    pool.set_target(8, 128)
    seqs[0].tokens += list(range(10, 107))
    seqs[0].prefill(100)
    assert (pool.slots, pool.context) == (5, 100) and seqs[0].cached == 100
    pool.tokens = 1 << 30  # the memory is back: the next row's need takes the plan
    sixth.prefill(3)
    assert (pool.slots, pool.context) == (8, 128) and pool._target is None
    ref = PooledSequence(KVPool(target.model, target.vocab_size), [9, 9, 9])
    ref.prefill(3)
    want = pooled_forward([(ref, (5,))])[0]
    assert torch.equal(pooled_forward([(fifth, (5,))])[0], want)  # its KV moved with the reshapes
    _consistent(pool)


def test_the_pool_plan_never_has_more_slots_than_sessions_can_be_admitted(target: LoadedModel) -> None:
    assert plan_pool((4, 64), 5, 60) == (8, 64)  # doubling
    assert plan_pool((4, 64), 5, 60, max_slots=5) == (5, 64)  # the session limit caps it
    assert plan_pool((4, 64), 5, 60, max_slots=6) == (6, 64)
    assert plan_pool((16, 64), 5, 60, max_slots=8) == (8, 64)  # a pool planned larger comes down
    reg = SessionRegistry(max_sessions=5, kv_budget_bytes=0, max_draft_tokens=8)
    for _ in range(5):
        reg.admit(target, SamplingParams(), [4, 5, 6], 20)
    assert reg.shape[0] == 5  # not 8: a sixth session is refused at its open anyway
