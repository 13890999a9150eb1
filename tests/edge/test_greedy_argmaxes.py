"""`greedy_argmaxes`: every greedy row's argmaxes in one transfer, equal to each row's own, and
never an exception (the verifier's rows would be left with their drafts appended)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gelato.benchmarks.accept_overhead import main
from gelato.edge.verifier import greedy_argmaxes


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


def test_a_failure_returns_nothing_and_rows_take_their_own() -> None:
    # A 1-D row makes a 0-d argmax, which torch.cat refuses: the batch answers {} instead of raising.
    assert greedy_argmaxes([torch.randn(5, 9), torch.randn(9)], [1, 0]) == {}


def test_accept_overhead_benchmark_runs_and_agrees(tmp_path: Path) -> None:
    out = tmp_path / "accept.json"
    assert main(["--vocab", "64", "--rows", "1,3", "--reps", "2", "--out", str(out)]) == 0  # raises on a mismatch
    report = json.loads(out.read_text())
    assert [r["rows"] for r in report["levels"]] == [1, 3] and report["meta"]["vocab"] == 64
