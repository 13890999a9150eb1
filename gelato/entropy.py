"""Softmax entropy of the drafter's distribution, the per-token risk signal.

Contract: pure tensor math, no I/O. `entropy_nats(logits)` is the entropy of softmax(logits) in
nats over the last dim, one pass over the vocabulary; `entropy_of_probs(probs)` does the same for
an already processed distribution (the one actually sampled from, when sampling). Both run once per
drafted token, so they use as few tensor operations as the formula allows (the negation happens
on the Python float, which is exact). Tokens with zero probability (-inf logits) count 0.
"""

from __future__ import annotations

import torch


def entropy_nats(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)
    plogp = logp.exp()
    plogp.mul_(logp)
    h = -float(plogp.sum(dim=-1))
    if h != h:  # NaN: a -inf logit (a masked token) gives 0 * -inf, where p log p is 0. Rare: off the fast path
        h = -float(plogp.masked_fill_(logp == float("-inf"), 0.0).sum(dim=-1))
    return h


def entropy_of_probs(probs: torch.Tensor) -> float:
    p = probs if probs.dtype == torch.float32 else probs.float()
    return -float((p * torch.log(p.clamp_min(1e-30))).sum(dim=-1))
