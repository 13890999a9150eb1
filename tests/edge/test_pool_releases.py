"""Sessions released while the model thread still holds them keep the KV pool within its plan.

A device that goes away is released on the event loop at once (the registry re-plans the pool
without it), while its slot is given back later, behind the model thread's queued work. The work
that runs in between must neither verify the released session nor grow the pool past the shape
the budget allows."""

from __future__ import annotations

import grpc
import pytest

from gelato.edge.kv_pool import KVPool
from gelato.edge.sessions import SessionRegistry, StatusError, TargetSession
from gelato.edge.verifier import Accepted, verify_batch
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams


def _record_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every shape the pool is reallocated to, in order (the real `_resize` does the work)."""
    shapes: list[tuple[int, int]] = []
    resize = KVPool._resize

    def recorded(self: KVPool, slots: int, context: int) -> None:
        shapes.append((slots, context))
        resize(self, slots, context)

    monkeypatch.setattr(KVPool, "_resize", recorded)
    return shapes


def test_a_session_released_while_its_batch_failed_is_not_verified_alone(
    target: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched forward fails (an out-of-memory error in its activations) and, while it ran, a
    long session's device went away. Each row is then verified alone: the released one must be
    refused FAILED_PRECONDITION like a queued block of a released session, not verified for
    nobody (its context, past the new plan, regrew the pool to twice the planned context, right
    after an out-of-memory error)."""
    deferred: list[TargetSession] = []
    bytes_per_token = KVPool(target.model, target.vocab_size, slots=0, context=0).bytes_per_token()
    budget_tokens = 4 * 320
    reg = SessionRegistry(8, budget_tokens * bytes_per_token, 8, closer=deferred.append)
    prompts = [[5, 6, 7], [6, 7, 8], [7, 8, 9], [i % 300 + 1 for i in range(200)]]
    sessions = [reg.admit(target, SamplingParams(), p, 40 if len(p) < 10 else 100) for p in prompts]
    solo = [TargetSession(f"solo{i}", target, SamplingParams(), p) for i, p in enumerate(prompts[:3])]
    for s in sessions + solo:
        s.prefill()
    gone = sessions[3]
    forward, failed = KVPool.forward, [False]

    def fails_once(self: KVPool, *args: object, **kw: object) -> object:
        if not failed[0]:
            failed[0] = True
            reg.release(gone.session_id)  # the device goes away meanwhile (the event loop, concurrently)
            raise RuntimeError("simulated: out of memory in the batched forward")
        return forward(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(KVPool, "forward", fails_once)
    shapes = _record_shapes(monkeypatch)
    block = DraftBlock(round=0, ids=(9, 9, 9))
    out = verify_batch([(s, block) for s in sessions], [True] * len(sessions))
    assert isinstance(out[3], StatusError) and out[3].code == grpc.StatusCode.FAILED_PRECONDITION, out[3]
    assert all(isinstance(o, Accepted) and o.batch_rows == 1 for o in out[:3]), out
    assert [(o.n_accepted, o.next_token) for o in out[:3]] == [s.verify(block) for s in solo]  # type: ignore[union-attr]
    assert gone.rounds == 0 and len(gone.seq.tokens) == len(prompts[3])
    assert all(s * c <= budget_tokens for s, c in shapes), shapes
    for s in deferred:
        s.close()
    assert reg.pool is not None and (reg.pool.slots, reg.pool.context) == reg.shape


def test_a_new_session_finding_slots_held_by_pending_releases_takes_one_more_not_double(
    target: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five sessions end while a sixth's prefill waits on the model thread (their closes queue
    behind it): the plan is now one session's, but the five still hold their slots. The new
    session gets one more slot (the shape that held all six before fitted the budget), not a
    doubling to 10 (past the 8-slot budget), and the pool takes the plan once the closes ran."""
    deferred: list[TargetSession] = []
    bytes_per_token = KVPool(target.model, target.vocab_size, slots=0, context=0).bytes_per_token()
    budget_tokens = 8 * 64
    reg = SessionRegistry(64, budget_tokens * bytes_per_token, 8, closer=deferred.append)
    ending = [reg.admit(target, SamplingParams(), [5 + i, 6, 7], 40) for i in range(5)]
    for s in ending:
        s.prefill()
    assert reg.pool is not None and reg.pool.slots >= 5
    new = reg.admit(target, SamplingParams(), [9, 9, 9], 40)
    for s in ending:
        reg.release(s.session_id)  # their closes wait behind the new session's prefill
    shapes = _record_shapes(monkeypatch)
    new.prefill()
    assert reg.pool.slots == 6 and new.seq.slot == 5
    assert all(s * c <= budget_tokens for s, c in shapes), shapes
    alone = TargetSession("alone", target, SamplingParams(), [9, 9, 9])
    alone.prefill()
    block = DraftBlock(round=0, ids=(4, 5))
    got = verify_batch([(new, block)])[0]
    assert isinstance(got, Accepted) and (got.n_accepted, got.next_token) == alone.verify(block)
    for s in deferred:
        s.close()
    assert (reg.pool.slots, reg.pool.context) == reg.shape


def test_a_long_session_whose_close_is_queued_keeps_the_pool_from_growing_its_slots_at_its_context(
    target: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long session ends and its close waits behind a short session's verify; meanwhile eight
    short sessions are admitted, so the plan is many slots of a short context. The verify takes
    the plan before the close ran: the long row still holds its context, and the plan's slots at
    that context were 3x the budget. It keeps the slots it has until the long row is gone."""
    deferred: list[TargetSession] = []
    bytes_per_token = KVPool(target.model, target.vocab_size, slots=0, context=0).bytes_per_token()
    budget_tokens = 2 * 320
    reg = SessionRegistry(16, budget_tokens * bytes_per_token, 8, closer=deferred.append)
    long = reg.admit(target, SamplingParams(), [i % 300 + 1 for i in range(200)], 100)
    short = reg.admit(target, SamplingParams(), [5, 6, 7], 20)
    for s in (long, short):
        s.prefill()
    reg.release(long.session_id)  # its close waits behind the verify below
    for i in range(8):
        reg.admit(target, SamplingParams(), [6 + i, 7, 8], 20)
    assert reg.shape[0] >= 9 and reg.shape[0] * reg.shape[1] <= budget_tokens
    shapes = _record_shapes(monkeypatch)
    alone = TargetSession("alone", target, SamplingParams(), [5, 6, 7])
    alone.prefill()
    block = DraftBlock(round=0, ids=(4, 5))
    got = verify_batch([(short, block)])[0]
    assert isinstance(got, Accepted) and (got.n_accepted, got.next_token) == alone.verify(block)
    assert all(s * c <= budget_tokens for s, c in shapes), shapes
    for s in deferred:
        s.close()
    assert reg.pool is not None and (reg.pool.slots, reg.pool.context) == reg.shape
