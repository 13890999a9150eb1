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
    KeyedRng,
    accept_greedy,
    draw_index,
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


def reference_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The target's distribution written out independently of `process_logits` (float64 numpy), in
    transformers' order: divide by the temperature, keep the top-k (ties with the k-th kept), softmax,
    then the nucleus: the smallest descending prefix reaching top_p plus ties with its last token."""
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < len(z):
        z = np.where(z >= np.sort(z)[::-1][params.top_k - 1], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if 0.0 < params.top_p < 1.0:
        desc = np.sort(p)[::-1]
        crossing = desc[np.searchsorted(np.cumsum(desc), params.top_p)]
        p = np.where(p >= crossing, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("temperature", [0.3, 0.9, 1.7])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (3, 1.0), (10, 1.0), (0, 0.6), (0, 0.9), (5, 0.8), (10, 0.5)])
def test_process_logits_equals_an_independent_reference(temperature: float, top_k: int, top_p: float) -> None:
    """Temperature with top-k, top-p and both: a temperature dropped whenever top-k or top-p is on
    passed every other test here, the chi-square ones included (their reference was
    `process_logits` itself)."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    gen = torch.Generator().manual_seed(int(temperature * 100) + top_k + int(top_p * 10))
    for _ in range(20):
        logits = torch.randn(40, generator=gen) * 3
        got = process_logits(logits, params).double().numpy()
        np.testing.assert_allclose(got, reference_probs(logits.numpy(), params), atol=1e-6)


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
    # ... and are the top-m probabilities renormalised, to float16's rounding (a uniform 1/m passed).
    top = torch.topk(probs, 8).values.double()
    np.testing.assert_allclose(q.probs, (top / top.sum()).numpy(), rtol=2**-10)
    gen = torch.Generator().manual_seed(1)
    draws = [sample_sparse(q, gen) for _ in range(4000)]
    assert set(draws) <= set(q.ids)
    # ... drawn with q's probabilities: a sampler that ignored them (uniform over the support) fails.
    observed = np.array([draws.count(i) for i in q.ids], dtype=float)
    expected = np.array(q.probs, dtype=float) / sum(q.probs) * len(draws)
    assert chisquare(observed, expected).pvalue > 1e-4
    assert chisquare(observed, np.full(8, len(draws) / 8)).pvalue < 1e-6


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


def emitted_pairs(
    draft: SamplingParams,
    top_m: int,
    wrong_q: bool,
    k: int,
    seed: int,
    target: SamplingParams = TARGET,
    keyed: bool = False,
) -> np.ndarray:
    """Counts of the first two emitted tokens over SAMPLES generations of speculative sampling.
    `keyed`: the draws as sessions make them (`KeyedRng`, the drafter's keyed by position and
    prefix, the edge's by position; a seed per generation) instead of from two streams."""
    p_table = process_logits(bigram(1, 1.5), target)
    q_true = [truncate_top_m(process_logits(row, draft), top_m) for row in bigram(2, 2.0)]
    q_full = [
        SparseDist(ids=tuple(range(V)), probs=tuple(process_logits(row, SamplingParams(1.0)).tolist()))
        for row in bigram(2, 2.0) / draft.temperature
    ]
    gen_d, gen_t = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    counts = np.zeros((V, V), dtype=np.int64)
    for n in range(SAMPLES):
        rng_d, rng_t = (KeyedRng(seed + n, "drafter"), KeyedRng(seed + n, "target")) if keyed else (gen_d, gen_t)
        out: list[int] = []
        ctx = 0
        while len(out) < 2:
            ids, qs, c = [], [], ctx
            for _ in range(k):
                pos = len(out) + len(ids)  # the prompt is the one token 0: position 0 is the first drawn
                draw = rng_d.uniform(pos, prefix=[0, *out, *ids]) if isinstance(rng_d, KeyedRng) else rng_d
                x = sample_sparse(q_true[c], draw)
                ids.append(x)
                qs.append(q_full[c] if wrong_q else q_true[c])
                c = x
            rows = torch.stack([p_table[t] for t in [ctx, *ids]])
            a, nxt = verify_sampling(rows, tuple(ids), tuple(qs), rng_t, len(out))
            out.extend([*ids[:a], nxt])
            ctx = out[-1]
        counts[out[0], out[1]] += 1
    return counts


def chi2_pvalue(counts: np.ndarray, target: SamplingParams = TARGET) -> float:
    # The target's distribution from the independent reference, not from `process_logits` (which
    # the sessions use: a fault in it would move the samples and their reference together).
    p_table = np.stack([reference_probs(row.numpy(), target) for row in bigram(1, 1.5)])
    expected = (p_table[0][:, None] * p_table) * counts.sum()
    keep = expected > 1e-9
    obs, exp = counts[keep], expected[keep]
    exp = exp * obs.sum() / exp.sum()  # float32 tables sum to 1 only up to rounding
    assert counts[~keep].sum() == 0, "emitted a pair the target gives zero probability"
    return float(chisquare(obs, exp).pvalue)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "draft", "top_m", "k"),
    [
        ("full", SamplingParams(temperature=1.3), V, 3),
        ("top-k-truncated", SamplingParams(temperature=1.0, top_k=3), V, 3),
        ("top-m-truncated", SamplingParams(temperature=1.0), 2, 3),
        ("top-p-truncated", SamplingParams(temperature=1.0, top_p=0.7), V, 3),
        # One draft per block: the second token emitted is the bonus draw from p whenever the
        # draft was accepted, so that draw is counted too (with k = 3 it never is).
        ("bonus draw, top-m-truncated", SamplingParams(temperature=1.0), 2, 1),
    ],
)
def test_speculative_sampling_matches_target_distribution(name: str, draft: SamplingParams, top_m: int, k: int) -> None:
    counts = emitted_pairs(draft, top_m, wrong_q=False, k=k, seed=11)
    assert chi2_pvalue(counts) > 1e-3, name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "target", "top_m"),
    [
        ("keyed draws, top-m-truncated q", TARGET, 2),
        ("keyed draws, target top-p", SamplingParams(temperature=0.9, top_p=0.8), 4),
    ],
)
def test_keyed_draws_match_target_distribution(name: str, target: SamplingParams, top_m: int) -> None:
    """The same test with the draws sessions make: uniforms from `KeyedRng` (53 bits of SHA-256),
    tokens by the inverse CDF; and with the target's own top-p nucleus."""
    draft = SamplingParams(temperature=1.0)
    counts = emitted_pairs(draft, top_m, wrong_q=False, k=3, seed=11, target=target, keyed=True)
    assert chi2_pvalue(counts, target) > 1e-3, name
    wrong = emitted_pairs(draft, top_m, wrong_q=True, k=3, seed=11, target=target, keyed=True)
    assert chi2_pvalue(wrong, target) < 1e-6, name  # and sharp enough to see a wrong q with them


def test_draw_index_inverts_the_cdf_and_never_picks_a_zero_weight() -> None:
    weights = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    n = 10_000
    counts = np.bincount([draw_index(weights, (j + 0.5) / n) for j in range(n)], minlength=6)
    np.testing.assert_array_equal(counts, [0, 2000, 0, 5000, 3000, 0])  # a uniform grid: exact shares
    assert draw_index(weights, 0.0) == 1 and draw_index(weights, 1.0 - 2.0**-53) == 4
    assert sample_sparse(SparseDist(ids=(7, 9), probs=(0.25, 0.75)), 0.3) == 9


def test_keyed_uniforms_use_every_bit_of_the_key() -> None:
    """Seeds, positions, purposes and prefixes that differ anywhere give different uniforms (a
    torch generator's seed keeps 32 bits: seeds 5 and 5 + 2**40 drew the same stream)."""
    a, b = KeyedRng(5, "drafter"), KeyedRng(5 + 2**40, "drafter")
    assert a.uniform(3) != b.uniform(3)
    assert a.uniform(3) == KeyedRng(5, "drafter").uniform(3)  # a pure function of the key
    assert len({a.uniform(3), a.uniform(4), a.uniform(3, "emit"), a.uniform(3, prefix=[1, 2, 3])}) == 4
    assert a.uniform(3, prefix=[1, 2, 3]) != a.uniform(3, prefix=[1, 2, 4])
    us = [a.uniform(i) for i in range(20_000)]
    assert min(us) >= 0.0 and max(us) < 1.0 and abs(float(np.mean(us)) - 0.5) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verify_sampling_draws_the_same_with_p_on_a_gpu() -> None:
    """p on an accelerator: the draws run on the CPU (its draft entries and the one row drawn from
    come over), so a session's tokens do not depend on where the target runs."""
    p = process_logits(bigram(1, 1.5), TARGET)
    q = tuple(truncate_top_m(process_logits(row, SamplingParams(temperature=1.0)), 2) for row in bigram(2, 2.0))
    for ids in [(1, 2, 3), (4, 0, 1), ()]:
        rows = p[: len(ids) + 1]
        want = [verify_sampling(rows, ids, q[: len(ids)], KeyedRng(s, "target"), 10) for s in range(50)]
        got = [verify_sampling(rows.cuda(), ids, q[: len(ids)], KeyedRng(s, "target"), 10) for s in range(50)]
        assert got == want, ids


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
    ("params", "field"),
    [
        (SamplingParams(), None),
        (SamplingParams(temperature=SamplingParams.MIN_TEMPERATURE), None),
        (SamplingParams(temperature=float(np.float32(1e-4))), None),  # as the float32 wire delivers it
        (SamplingParams(temperature=1e4, top_p=0.0, top_k=5), None),
        (SamplingParams(temperature=1e-38), "temperature"),
        (SamplingParams(temperature=5e-5), "temperature"),
        # Above the bound as float64, below it as the float32 the edge receives: refused here too.
        (SamplingParams(temperature=9.999990463256836e-05), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(temperature=float("inf")), "temperature"),
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(temperature=1.0, top_p=float("nan")), "top_p"),
        (SamplingParams(temperature=1.0, top_p=float("inf")), "top_p"),
        (SamplingParams(temperature=1.0, top_p=-0.1), "top_p"),
        (SamplingParams(temperature=1.0, top_p=1.5), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        # What the wire cannot carry (float32 temperature, uint32 top_k, uint64 seed): refused at
        # settings time, not by the encoder for every prompt.
        (SamplingParams(temperature=3.4e38, top_k=2**32 - 1, seed=2**64 - 1), None),
        (SamplingParams(temperature=1e39), "temperature"),
        (SamplingParams(top_k=2**32), "top_k"),
        (SamplingParams(seed=-1), "seed"),
        (SamplingParams(seed=2**64), "seed"),
    ],
)
def test_sampling_params_validate(params: SamplingParams, field: str | None) -> None:
    """Each refusal names the field at fault first (`top_k must be in ...`)."""
    if field is None:
        params.validate()
    else:
        with pytest.raises(ValueError, match=rf"^{field} "):
            params.validate()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.8), (0.6, 20, 0.9), (1.0, 3, 0.5)],
)
def test_process_logits_is_what_transformers_generate_samples_from(
    temperature: float, top_k: int, top_p: float
) -> None:
    """The target's distribution here is transformers' own: its temperature, top-k and top-p
    warpers, in `generate`'s order, then softmax, give the same probabilities on random rows (no
    ties: their order is where the two may differ, and `top_p_filter` keeps every tied token)."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(64, 500) * 3
    warpers: list[object] = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    scores = logits.clone()
    for warp in warpers:
        scores = warp(torch.zeros(64, 1, dtype=torch.long), scores)  # type: ignore[operator]
    theirs = torch.softmax(scores, dim=-1)
    ours = process_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(ours > 0, theirs > 0)  # the same support, row by row
    assert torch.allclose(ours, theirs, atol=2e-6, rtol=0)


def test_the_accept_test_reads_p_relative_to_its_row_sum() -> None:
    """A float32 softmax over a Qwen-sized vocabulary sums to 1 only within ~3e-5; the accept test
    compared u * q(x) with p(x) as it came, so p's rounding biased acceptance (the residual and the
    emitted draws were normalised). Scaled by 2 (exactly, in binary), p must give the same verdicts."""
    gen = torch.Generator().manual_seed(5)
    vocab, k = 50, 3
    p = torch.softmax(torch.randn(k + 1, vocab, generator=gen) * 2, dim=-1)
    q = []
    for _ in range(k):
        qp = torch.softmax(torch.randn(vocab, generator=gen) * 2, dim=-1)
        q.append(truncate_top_m(qp, 8))
    ids = tuple(qi.ids[0] for qi in q)
    for seed in range(200):
        want = verify_sampling(p, ids, tuple(q), KeyedRng(seed, "target"))
        assert verify_sampling(p * 2, ids, tuple(q), KeyedRng(seed, "target")) == want, seed
    with pytest.raises(ValueError, match="row of zeros"):
        verify_sampling(torch.zeros(2, vocab), ids[:1], tuple(q[:1]), KeyedRng(0, "target"))
