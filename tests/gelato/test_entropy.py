"""Entropy helpers against closed forms."""

from __future__ import annotations

import math

import torch

from gelato.entropy import entropy_nats, entropy_of_probs


def test_uniform_and_point_mass() -> None:
    assert math.isclose(entropy_nats(torch.zeros(8)), math.log(8), rel_tol=1e-6)
    assert entropy_nats(torch.tensor([0.0, 100.0, 0.0])) < 1e-6
    assert math.isclose(entropy_of_probs(torch.tensor([0.5, 0.5, 0.0])), math.log(2), rel_tol=1e-6)


def test_logits_and_probs_agree() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert math.isclose(entropy_nats(logits), entropy_of_probs(torch.softmax(logits, -1)), rel_tol=1e-5)


def test_masked_tokens_count_zero() -> None:
    """-inf logits (tokens a drafter masks out) have p log p = 0, not NaN; NaN logits stay NaN."""
    inf = float("inf")
    assert math.isclose(entropy_nats(torch.tensor([0.0, 0.0, -inf])), math.log(2), rel_tol=1e-6)
    assert math.isclose(
        entropy_nats(torch.tensor([0.0, 1.0, -inf])),
        entropy_of_probs(torch.softmax(torch.tensor([0.0, 1.0]), -1)),
        rel_tol=1e-6,
    )
    assert math.isnan(entropy_nats(torch.tensor([0.0, float("nan")])))
