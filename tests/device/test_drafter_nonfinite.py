"""A drafter whose logits are not finite (a float16 overflow to +inf, a NaN) drafts from their
finite part instead of failing: sampled drafting raised IndexError (every probability NaN, an empty
q), and greedy drafting read a NaN entropy that no threshold stops on. The output is still the
target's, token for token: the drafter samples from the q it sends, whatever it is."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator

import pytest
import torch

from gelato.device.drafter import Drafter
from gelato.device.generate import Limits, local_verifier, speculative_generate
from gelato.device.policy import parse_policy
from gelato.edge.sessions import TargetSession
from gelato.kv import KVSequence
from gelato.models import LoadedModel, encode_prompt
from gelato.sampling import finite_logits
from gelato.types import DraftBlock, SamplingParams, SparseDist
from tests.conftest import target_greedy

INF, NAN = float("inf"), float("nan")


def test_finite_logits() -> None:
    row = torch.tensor([0.0, INF, 1.0, INF, NAN])
    assert finite_logits(row).tolist() == [-INF, 0.0, -INF, 0.0, -INF]  # type: ignore[union-attr]  # +inf: tied likeliest
    assert finite_logits(torch.tensor([0.0, NAN, 2.0])).tolist() == [0.0, -INF, 2.0]  # type: ignore[union-attr]
    assert finite_logits(torch.tensor([NAN, NAN])) is None
    assert finite_logits(torch.tensor([-INF, NAN])) is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_with_inf_or_nan_is_drafted_from(drafter_model: LoadedModel, temperature: float) -> None:
    drafter = Drafter(drafter_model, SamplingParams(temperature=temperature), top_m=8)
    drafter.begin_generation([5, 6, 7])
    drafter.start([5, 6, 7])
    vocab = drafter_model.vocab_size
    overflow = torch.zeros(vocab)
    overflow[11] = INF
    x, q, h, _ = drafter._pick(overflow, 3)
    assert x == 11 and h == 0.0
    assert q is None if temperature == 0 else (q.ids, q.probs) == ((11,), (1.0,))  # type: ignore[union-attr]
    nan = torch.linspace(0.0, 1.0, vocab)
    nan[3] = NAN
    x, _, h, _ = drafter._pick(nan, 3)
    assert math.isfinite(h) and x != 3
    with pytest.raises(ValueError, match=r"position 3 \(float32\) are all NaN"):
        drafter._pick(torch.full((vocab,), NAN), 3)


@pytest.fixture
def overflowing(drafter_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every third drafter forward gives token 9 a +inf logit (the target's own forwards are left alone)."""
    real, calls = KVSequence.forward_last, [0]

    def forward_last(self: KVSequence, *args: object, **kwargs: object) -> torch.Tensor:
        logits = real(self, *args, **kwargs)  # type: ignore[arg-type]
        if self.model is drafter_model.model:
            calls[0] += 1
            if calls[0] % 3 == 0:
                logits = logits.clone()
                logits[9] = INF
        return logits

    monkeypatch.setattr(KVSequence, "forward_last", forward_last)
    yield
    assert calls[0] >= 3  # it did overflow


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_an_overflowing_drafter_still_gives_the_targets_output(
    target: LoadedModel,
    drafter_model: LoadedModel,
    overflowing: None,
    temperature: float,
    caplog: pytest.LogCaptureFixture,
) -> None:
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples.")
    params = SamplingParams(temperature=temperature, seed=3)
    session = TargetSession("s", target, params, prompt)
    session.prefill()
    limits = Limits(24, target.context_limit, 32, ())
    drafter = Drafter(drafter_model, params)
    blocks: list[DraftBlock] = []

    class Recording:  # the session, seeing every block the edge would
        def verify(self, block: DraftBlock) -> tuple[int, int]:
            blocks.append(block)
            return session.verify(block)

    with caplog.at_level(logging.WARNING, logger="gelato.device.drafter"):
        res = asyncio.run(
            speculative_generate(drafter, local_verifier(Recording()), parse_policy("entropy"), prompt, limits)
        )
    assert len(res.token_ids) == 24
    if temperature > 0:
        # Exactness needs each draft sent with the q it was drawn from: on an overflowing row that
        # q is token 9 alone (the +inf's limit), and the draft is 9.
        drafts = [(x, q) for b in blocks for x, q in zip(b.ids, b.q, strict=True)]
        assert all(x in q.ids for x, q in drafts)
        inf_rows = [x for x, q in drafts if q == SparseDist((9,), (1.0,))]
        assert inf_rows and set(inf_rows) == {9}
    assert all(math.isfinite(h) for t in res.stats.rounds_log for h in t.entropies)
    assert sum("hold NaN or inf" in r.message for r in caplog.records) == 1  # said once
    if temperature == 0:
        assert res.token_ids == target_greedy(target, prompt, 24)


def test_a_nucleus_of_a_row_with_inf_is_drafted_from(drafter_model: LoadedModel) -> None:
    """With --top-p, the nucleus filter met the NaN row first and raised (index -1), before any
    check for an empty q could see it."""
    drafter = Drafter(drafter_model, SamplingParams(temperature=0.8, top_p=0.9), top_m=8)
    drafter.begin_generation([5, 6, 7])
    drafter.start([5, 6, 7])
    row = torch.zeros(drafter_model.vocab_size)
    row[11] = INF
    x, q, _, _ = drafter._pick(row, 3)
    assert x == 11 and q is not None and q.ids == (11,)
    row[11], row[12] = 0.0, NAN
    x, q, _, _ = drafter._pick(row, 3)
    assert x != 12 and q is not None and 12 not in q.ids
