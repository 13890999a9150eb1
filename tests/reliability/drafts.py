"""`TargetDrafts` (now `gelato.benchmarks.load_drafts`, which the load benchmark uses too) and what
the isolation and fuzz tests check of the verdicts it gets."""

from __future__ import annotations

from gelato.benchmarks.load_drafts import MAX_SUPPORT, TargetDrafts
from gelato.benchmarks.load_streams import Spec

__all__ = ["MAX_SUPPORT", "TargetDrafts", "assert_both_paths"]


def assert_both_paths(name: str, spec: Spec, verdicts: list[tuple[int, int]]) -> None:
    """A drafting session's verdicts took drafts and turned some down: both ends of acceptance,
    and a rollback of the KV written for the rejected ones, really ran."""
    if spec.k == 0:
        return
    accepted = [a for a, _ in verdicts]
    assert max(accepted) >= 1 and min(accepted) < spec.k, (name, accepted)
