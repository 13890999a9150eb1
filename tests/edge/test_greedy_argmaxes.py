"""`greedy_argmaxes`: every greedy row's argmaxes in one transfer, equal to each row's own, and
never an exception (the verifier's rows would be left with their drafts appended)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pytest import MonkeyPatch

from gelato.benchmarks.accept_overhead import main
from gelato.edge.kv_pool import KVPool
from gelato.edge.verifier import Accepted, StatusError, TargetSession, greedy_argmaxes, verify_batch
from gelato.models import LoadedModel
from gelato.types import DraftBlock, SamplingParams, SparseDist


def test_ragged_rows_mixed_with_sampling_rows_equal_their_own_argmaxes() -> None:
    gen = torch.Generator().manual_seed(3)
    padded = torch.randn(4, 7, 50, generator=gen)  # as the pool returns them: views of one tensor
    logits = [padded[0, :3], padded[1, :7], padded[2, :5], padded[3, :1]]
    ks: list[int | None] = [2, 4, None, 0]  # row 2 samples: no argmax for it
    best = greedy_argmaxes(logits, ks)
    assert set(best) == {0, 1, 3}
    for j, k in enumerate(ks):
        if k is not None:
            assert best[j] == logits[j][-(k + 1) :].argmax(-1).tolist() and len(best[j]) == k + 1
    assert greedy_argmaxes(logits, [None] * 4) == {}


def test_a_failure_returns_nothing_and_rows_take_their_own(target: LoadedModel, monkeypatch: MonkeyPatch) -> None:
    # A 1-D row makes a 0-d argmax, which torch.cat refuses: the batch answers {} instead of raising.
    assert greedy_argmaxes([torch.randn(5, 9), torch.randn(9)], [1, 0]) == {}
    # With nothing fetched, each greedy row takes its own argmaxes in acceptance: its verdict is
    # the one it gets alone, drafts taken included.
    from gelato.edge import verifier

    monkeypatch.setattr(verifier, "greedy_argmaxes", lambda logits, ks: {})
    prompts = [[5, 9, 14, 3], [40, 41, 42, 43, 44, 45], [7, 8]]
    pool = KVPool(target.model, target.vocab_size, slots=3, context=32)
    blocks = [DraftBlock(round=0, ids=(best_of(target, p), 11, 12)) for p in prompts]
    rows = [TargetSession(f"s{i}", target, SamplingParams(), p, pool=pool) for i, p in enumerate(prompts)]
    for s in rows:
        s.prefill()
    outcomes = verify_batch(list(zip(rows, blocks, strict=True)))
    for p, block, got in zip(prompts, blocks, outcomes, strict=True):
        alone = TargetSession("alone", target, SamplingParams(), p)
        alone.prefill()
        assert isinstance(got, Accepted) and got.batch_rows == 3
        assert (got.n_accepted, got.next_token) == alone.verify(block) and got.n_accepted >= 1


def test_accept_overhead_benchmark_runs_and_agrees(tmp_path: Path) -> None:
    out = tmp_path / "accept.json"
    assert main(["--vocab", "64", "--rows", "1,3", "--reps", "2", "--out", str(out)]) == 0  # raises on a mismatch
    report = json.loads(out.read_text())
    assert [r["rows"] for r in report["levels"]] == [1, 3] and report["meta"]["vocab"] == 64


def test_verify_batch_aligns_fetched_argmaxes_with_rows_after_a_failed_check(target: LoadedModel) -> None:
    """A pair that fails its check is left out of the forward, so the forward's rows are not the
    pairs' positions: each greedy row must still get its own argmaxes (its verdict equals the one it
    gets alone), and a sampling row among them its own acceptance."""
    prompts = [[5, 9, 14, 3], [40, 41, 42, 43, 44, 45], [7, 8], [100, 3, 50], [60, 61, 62]]
    ids = (11, 12, 13)
    pool = KVPool(target.model, target.vocab_size, slots=5, context=32)
    params = [SamplingParams()] * 3 + [SamplingParams(temperature=1.0, seed=4), SamplingParams()]

    def session(i: int, pooled: bool) -> TargetSession:
        s = TargetSession(f"s{i}", target, params[i], prompts[i], pool=pool if pooled else None)
        s.prefill()
        return s

    batched = [session(i, True) for i in range(5)]
    # Row 1 drafts the target's own first token: accepted only with its own argmaxes.
    blocks = [DraftBlock(round=5, ids=ids), DraftBlock(round=0, ids=(best_of(target, prompts[1]), *ids[1:]))]
    # Row 3 samples: drafts with a q over a few candidates each, so its acceptance and its draws
    # are its own (equal to the ones it makes alone: draws keyed by position, its seed).
    q = tuple(SparseDist((t, t + 1, t + 2), (0.5, 0.3, 0.2)) for t in ids)
    blocks += [DraftBlock(round=0, ids=ids), DraftBlock(round=0, ids=ids, q=q), DraftBlock(round=0, ids=ids)]
    outcomes = verify_batch(list(zip(batched, blocks, strict=True)))
    assert isinstance(outcomes[0], StatusError)  # round 5: refused, left out of the forward
    for i in (1, 2, 3, 4):
        alone = session(i, False).verify(blocks[i])
        got = outcomes[i]
        assert isinstance(got, Accepted) and (got.n_accepted, got.next_token) == alone and got.batch_rows == 4
    assert isinstance(outcomes[1], Accepted) and outcomes[1].n_accepted >= 1


def best_of(target: LoadedModel, prompt: list[int]) -> int:
    """The target's greedy next token after `prompt`."""
    s = TargetSession("probe", target, SamplingParams(), prompt)
    s.prefill()
    return s.verify(DraftBlock(round=0, ids=()))[1]
