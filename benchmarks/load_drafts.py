"""Draft blocks the target accepts often and rejects sometimes: the load benchmark's sessions and
witnesses, and the isolation and fuzz tests.

Contract: `TargetDrafts(target)(spec, tokens, rnd, vocab)` has `make_block`'s signature and its
one property the tests rely on, a block that is a pure function of the session's history (a
session driven alone and among others sends the same blocks while their verdicts agree), but its
drafts come from the target itself, so verdicts exercise acceptance and KV rollback, not just the
first row of each forward (`make_block`'s n-gram guesses are almost always rejected at once):

- greedy: the target's own greedy continuation, with the draft at position `rnd % (k + 1)`
  changed (none when that is k: the whole block is accepted);
- sampling: each draft drawn from q = the target's own processed distribution (float16, its
  support at most `MAX_SUPPORT` tokens: accepted but for rounding), except the draft at position
  `rnd % (k + 1)`, drawn from a random 4-token q (mostly rejected).

The target runs without a cache over the whole history per draft: slow for real models, instant
for the tests' tiny one.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from gelato.benchmarks.load_streams import Make, Spec, random_q
from gelato.models import LoadedModel
from gelato.sampling import process_logits
from gelato.types import DraftBlock, SparseDist

MAX_SUPPORT = 64


class TargetDrafts:
    def __init__(self, target: LoadedModel) -> None:
        self.model = target.model

    def _last_logits(self, ids: list[int], vocab: int) -> torch.Tensor:
        """The next token's logits over the tokenizer's ids (a model's rows past them are padding)."""
        with torch.inference_mode():
            return self.model(torch.tensor([ids])).logits[0, -1, :vocab]  # type: ignore[no-any-return]

    def __call__(self, spec: Spec, tokens: list[int], rnd: int, vocab: int) -> DraftBlock:
        seq, ids, qs = list(tokens), [], []
        rng = random.Random(len(tokens) * 7919 + tokens[-1] * 31 + spec.k)
        off = rnd % (spec.k + 1)  # the draft made wrong (none when off == k)
        for i in range(spec.k):
            logits = self._last_logits(seq, vocab)
            if spec.params.greedy:
                x = int(logits.argmax())
                x = x % (vocab - 1) + 1 if i == off else x  # any other id
            else:
                q = random_q(rng, vocab) if i == off else _own_q(process_logits(logits, spec.params))
                x = rng.choices(q.ids, weights=q.probs)[0]
                qs.append(q)
            ids.append(x)
            seq.append(x)
        return DraftBlock(round=rnd, ids=tuple(ids), q=tuple(qs))


def _own_q(probs: torch.Tensor) -> SparseDist:
    top = torch.topk(probs, min(MAX_SUPPORT, int((probs > 0).sum())))
    half = np.asarray(top.values.tolist(), dtype=np.float16)
    keep = half > 0  # a mass float16 rounds to 0 cannot be sent as a weight
    return SparseDist(
        ids=tuple(int(t) for t, k in zip(top.indices.tolist(), keep, strict=True) if k),
        probs=tuple(float(p) for p in half[keep]),
    )


class Memo:
    """`make`, remembered by (spec, history, round): the solo `reference` run computes each block
    once, and the live sessions, whose histories are the same while their verdicts agree, get it
    back at once. Computed in the driver's event loop, `TargetDrafts`' forwards would pace 64
    sessions one after another (batches of 2 rows, streams past their deadline)."""

    def __init__(self, make: Make) -> None:
        self.make = make
        self.blocks: dict[tuple[Spec, tuple[int, ...], int], DraftBlock] = {}

    def __call__(self, spec: Spec, tokens: list[int], rnd: int, vocab: int) -> DraftBlock:
        key = (spec, tuple(tokens), rnd)
        if key not in self.blocks:
            self.blocks[key] = self.make(spec, tokens, rnd, vocab)
        return self.blocks[key]
