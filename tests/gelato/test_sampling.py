"""Exact and statistical tests of the sampling math.

The statistical tests run the real draft-side (`process_logits`, `truncate_top_m`,
`sample_sparse`) and edge-side (`verify_sampling`) functions on a toy bigram language model, and
compare the joint distribution of the first two emitted tokens with the target's own, by
chi-square over 24k samples with fixed seeds. A deliberately wrong q (the unfiltered drafter
distribution, while drafts come from the top-k-truncated one) must make the same test fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from gelato.benchmarks.top_p import full_sort_top_p  # the same nucleus, by a sort of the row
from gelato.sampling import (
    accept_greedy,
    process_logits,
    residual_distribution,
    sample_sparse,
    top_p_filter,
    truncate_top_m,
    verify_greedy,
    verify_sampling,
)
from gelato.types import SamplingParams, SparseDist

V = 6
SAMPLES = 24_000
TARGET = SamplingParams(temperature=0.9, top_k=5, seed=0)


def test_process_logits_top_k_top_p() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)
    # top_p = 0.8: the two largest hold 0.665+0.245 = 0.91 >= 0.8, the first alone 0.665 < 0.8.
    p = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert (p > 0).tolist() == [True, True, False, False, False]
    torch.testing.assert_close(p[:2], full[:2] / full[:2].sum())
    p = process_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(p, torch.softmax(logits / 0.5, -1))


@pytest.mark.parametrize("scale", [0.5, 2.0, 8.0])  # flat (nucleus of thousands) to peaked (a few)
@pytest.mark.parametrize("top_p", [1e-6, 0.5, 0.9, 0.999])
def test_top_p_filter_equals_a_full_sort(scale: float, top_p: float) -> None:
    gen = torch.Generator().manual_seed(int(scale * 10) + int(top_p * 1000))
    probs = torch.softmax(torch.randn(6, 5000, generator=gen) * scale, -1)
    probs[1, 100:] = 0.0  # a row with most of the vocabulary filtered out already (top-k)
    got = top_p_filter(probs, top_p)
    assert torch.equal(got, full_sort_top_p(probs, top_p))
    assert torch.equal(got, torch.cat([top_p_filter(row[None], top_p) for row in probs]))  # batch-independent
    kept = (got > 0).sum(-1)
    assert ((kept >= 1) & (kept <= (probs > 0).sum(-1))).all()
    if scale == 0.5 and top_p == 0.9:
        assert (kept[[0, 2, 3, 4, 5]] > 1024).all()  # past every window: the whole row was sorted


def test_top_p_filter_keeps_every_token_tied_with_the_crossing_one() -> None:
    # 0.4 alone is short of 0.5; the crossing token is one of the three 0.2s, whichever a kernel
    # puts first: all three stay, so the result does not depend on how ties are ordered.
    probs = torch.tensor([[0.2, 0.4, 0.2, 0.1, 0.2]]) / 1.1
    got = top_p_filter(probs, 0.5 / 1.1)
    assert (got > 0).tolist() == [[True, True, True, False, True]]
    torch.testing.assert_close(got.sum(), torch.tensor(1.0))


def test_truncate_top_m_is_exactly_what_is_sampled() -> None:
    probs = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), -1)
    q = truncate_top_m(probs, 8)
    assert len(q.ids) == 8 and abs(sum(q.probs) - 1.0) < 5e-3
    assert list(q.ids) == torch.topk(probs, 8).indices.tolist()
    # The values are float16-representable: the wire carries them without loss.
    assert all(float(np.float16(p)) == p for p in q.probs)
    gen = torch.Generator().manual_seed(1)
    assert all(sample_sparse(q, gen) in q.ids for _ in range(200))


def test_verify_greedy_counts_leading_matches() -> None:
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([3, 5, 7, 9]):
        logits[row, best] = 1.0
    assert verify_greedy(logits, (3, 5, 7)) == (3, 9)  # all accepted + bonus
    assert verify_greedy(logits, (3, 4, 7)) == (1, 5)  # correction at the first mismatch
    assert verify_greedy(logits[:1], ()) == (0, 3)  # k = 0: the target's own token
    assert accept_greedy([3, 5, 7, 9], (3, 4, 7)) == (1, 5)  # the same rule on argmaxes fetched already
    assert accept_greedy([3], ()) == (0, 3)


def bigram(seed: int, scale: float) -> torch.Tensor:
    return scale * torch.randn(V, V, generator=torch.Generator().manual_seed(seed))


def emitted_pairs(draft: SamplingParams, top_m: int, wrong_q: bool, k: int, seed: int) -> np.ndarray:
    """Counts of the first two emitted tokens over SAMPLES generations of speculative sampling."""
    p_table = process_logits(bigram(1, 1.5), TARGET)
    q_true = [truncate_top_m(process_logits(row, draft), top_m) for row in bigram(2, 2.0)]
    q_full = [
        SparseDist(ids=tuple(range(V)), probs=tuple(process_logits(row, SamplingParams(1.0)).tolist()))
        for row in bigram(2, 2.0) / draft.temperature
    ]
    gen_d, gen_t = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    counts = np.zeros((V, V), dtype=np.int64)
    for _ in range(SAMPLES):
        out: list[int] = []
        ctx = 0
        while len(out) < 2:
            ids, qs, c = [], [], ctx
            for _ in range(k):
                x = sample_sparse(q_true[c], gen_d)
                ids.append(x)
                qs.append(q_full[c] if wrong_q else q_true[c])
                c = x
            rows = torch.stack([p_table[t] for t in [ctx, *ids]])
            a, nxt = verify_sampling(rows, tuple(ids), tuple(qs), gen_t)
            out.extend([*ids[:a], nxt])
            ctx = out[-1]
        counts[out[0], out[1]] += 1
    return counts


def chi2_pvalue(counts: np.ndarray) -> float:
    p_table = process_logits(bigram(1, 1.5), TARGET).double().numpy()
    expected = (p_table[0][:, None] * p_table) * counts.sum()
    keep = expected > 1e-9
    obs, exp = counts[keep], expected[keep]
    exp = exp * obs.sum() / exp.sum()  # float32 tables sum to 1 only up to rounding
    assert counts[~keep].sum() == 0, "emitted a pair the target gives zero probability"
    return float(chisquare(obs, exp).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "draft", "top_m"),
    [
        ("full", SamplingParams(temperature=1.3), V),
        ("top-k-truncated", SamplingParams(temperature=1.0, top_k=3), V),
        ("top-m-truncated", SamplingParams(temperature=1.0), 2),
        ("top-p-truncated", SamplingParams(temperature=1.0, top_p=0.7), V),
    ],
)
def test_speculative_sampling_matches_target_distribution(name: str, draft: SamplingParams, top_m: int) -> None:
    counts = emitted_pairs(draft, top_m, wrong_q=False, k=3, seed=11)
    assert chi2_pvalue(counts) > 1e-3, name


@pytest.mark.slow
def test_unfiltered_q_is_detected() -> None:
    """Sampling drafts from the top-3 distribution but sending the unfiltered q breaks exactness,
    and the statistical test above is sharp enough to see it."""
    counts = emitted_pairs(SamplingParams(temperature=1.0, top_k=3), V, wrong_q=True, k=3, seed=11)
    assert chi2_pvalue(counts) < 1e-6


def test_residual_is_normalized_positive_part() -> None:
    p = torch.tensor([0.1, 0.6, 0.3])
    q = SparseDist(ids=(0, 2), probs=(0.5, 0.5))
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.0, 1.0, 0.0]))


def test_degenerate_residual_falls_back_to_p() -> None:
    """p == q up to rounding: the residual is empty; it must not divide by zero but return p."""
    p = torch.tensor([0.49999997, 0.5, 0.0])
    q = SparseDist(ids=(0, 1), probs=(0.5, 0.5))
    assert torch.equal(residual_distribution(p, q), p)


def test_process_logits_is_finite_at_tiny_temperatures() -> None:
    """Unvalidated tiny temperatures (1e-38 once made every logit +-inf and p NaN) give the
    argmax one-hot: the row max is subtracted before dividing."""
    logits = torch.tensor([[3.0, 2.5, -1.0], [0.0, 0.0, 7.0]])
    for t in (1e-38, 1e-30, SamplingParams.MIN_TEMPERATURE):
        p = process_logits(logits, SamplingParams(temperature=t))
        assert torch.isfinite(p).all(), t
        assert torch.equal(p, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])), t


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_verify_sampling_refuses_a_p_that_is_not_a_distribution(bad: float) -> None:
    p = torch.full((2, 4), 0.25)
    p[1, 2] = bad
    q = (SparseDist(ids=(1,), probs=(1.0,)),)
    with pytest.raises(ValueError, match="NaN, inf or negative"):
        verify_sampling(p, (1,), q, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("params", "ok"),
    [
        (SamplingParams(), True),
        (SamplingParams(temperature=SamplingParams.MIN_TEMPERATURE), True),
        (SamplingParams(temperature=float(np.float32(1e-4))), True),  # as the float32 wire delivers it
        (SamplingParams(temperature=1e4, top_p=0.0, top_k=5), True),
        (SamplingParams(temperature=1e-38), False),
        (SamplingParams(temperature=5e-5), False),
        (SamplingParams(temperature=float("nan")), False),
        (SamplingParams(temperature=float("inf")), False),
        (SamplingParams(temperature=-1.0), False),
        (SamplingParams(temperature=1.0, top_p=float("nan")), False),
        (SamplingParams(temperature=1.0, top_p=float("inf")), False),
        (SamplingParams(temperature=1.0, top_p=-0.1), False),
        (SamplingParams(temperature=1.0, top_p=1.5), False),
        (SamplingParams(top_k=-1), False),
    ],
)
def test_sampling_params_validate(params: SamplingParams, ok: bool) -> None:
    if ok:
        params.validate()
    else:
        with pytest.raises(ValueError, match=r"temperature|top_p|top_k"):
            params.validate()
