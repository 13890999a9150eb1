"""The controller's pure math, what it learns from rounds: the EWMA and linear fits, the cost estimator
(powers, times, the radio's cost, what it leaves out), the acceptance estimate and its Wilson bound, and
the entropy calibrator (isotonic fit, prior, unobserved tokens)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from gelato.controller import (
    CostEstimator,
    CostModel,
    EntropyCalibrator,
    EwLinear,
    Ewma,
    Objective,
    chain_frame,
    cheapest_k,
    expected_emitted,
    predraft_pays,
)
from gelato.controller.calibrator import isotonic_non_increasing
from gelato.controller.estimators import decay_of, wilson_upper
from gelato.types import Telemetry
from tests.gelato.test_controller import cost


def test_ewma_and_linear_fit() -> None:
    e = Ewma(0.9, prior=5.0)
    assert e.value == 5.0
    for _ in range(200):
        e.update(2.0)
    assert e.value == pytest.approx(2.0)
    lin = EwLinear(0.99, prior_intercept=0.0, ridge=1e-6)
    for x in range(1, 200):
        lin.update(x % 9, 0.004 + 0.0005 * (x % 9))
    a, b = lin.coefficients()
    assert a == pytest.approx(0.004, rel=1e-3) and b == pytest.approx(0.0005, rel=1e-3)


def test_linear_fit_keeps_its_measured_slope_through_rounds_at_one_k() -> None:
    """Rounds at one K re-measure only the level at that K: the slope measured while K varied
    stays (with the ridge anchored at the prior it fell from 0.04 to 0.007 in 200 rounds, the
    intercept taking the rest, so longer blocks looked nearly free), and a new slope is followed
    once K varies again. A fit that never saw K vary keeps the prior."""
    lin = EwLinear(decay_of(20), 0.0, prior_slope=2e-3)
    for i in range(64):
        k = 1 + i % 8
        lin.update(k, 0.005 + 0.04 * k)
    for _ in range(400):
        lin.update(6, 0.005 + 0.04 * 6)
    a, b = lin.coefficients()
    assert b == pytest.approx(0.04, rel=0.02) and a == pytest.approx(0.005, abs=0.002)
    for i in range(200):  # the machine halves its speed, K varies again: the fit follows
        k = 1 + i % 8
        lin.update(k, 0.01 + 0.08 * k)
    a, b = lin.coefficients()
    assert b == pytest.approx(0.08, rel=0.02) and a == pytest.approx(0.01, abs=0.004)
    fixed = EwLinear(decay_of(20), 0.0, prior_slope=2e-3)
    for _ in range(300):
        fixed.update(4, 0.1)
    assert fixed.coefficients() == pytest.approx((0.1 - 4 * 2e-3, 2e-3))


def tele(k: int, accepted: int, t_draft: float, t_wait: float, e: float, radio: float = 0.0) -> Telemetry:
    return Telemetry(
        round=0,
        k=k,
        accepted=accepted,
        emitted=accepted + 1,
        t_round_s=t_draft + t_wait,
        t_draft_s=t_draft,
        t_net_s=t_wait * 0.75,
        t_edge_queue_s=0.0,
        t_edge_compute_s=t_wait * 0.25,
        e_compute_j=e,
        e_radio_j=radio,
        e_j=e + radio,
        bytes_up=20 + 3 * k,
        bytes_down=30,
        energy_source="replay",
        energy_kind="measured",
    )


def test_cost_estimator_recovers_powers_and_times() -> None:
    rng = random.Random(1)
    est = CostEstimator(halflife_rounds=50)
    for _ in range(300):
        k = rng.randint(0, 8)
        t_draft, t_wait = (0.0015 + 0.0012 * k) if k else 0.0, 0.02 + 0.0004 * k
        est.observe(tele(k, min(k, rng.randint(0, k)), t_draft, t_wait, 3.0 * t_draft + 0.4 * t_wait))
    m = est.model()
    assert m.t_draft_s == pytest.approx(0.0012, rel=1e-2) and m.t_draft0_s == pytest.approx(0.0015, rel=2e-2)
    assert m.p_draft_w == pytest.approx(3.0, rel=0.02) and m.p_wait_w == pytest.approx(0.4, rel=0.02)
    assert m.wait_s(0) == pytest.approx(0.02, rel=0.01) and m.wait_s(8) == pytest.approx(0.0232, rel=0.01)
    assert m.time_s(4) == pytest.approx(0.0015 + 4 * 0.0012 + 0.02 + 4 * 0.0004, rel=0.01)
    assert m.time_s(0) == pytest.approx(0.02, rel=0.01)  # no block, no per-block drafting cost


def test_power_split_is_measured_when_drafting_is_metered() -> None:
    """With the meter read at the end of drafting, P_draft and P_wait are measured ratios, even
    when every round drafts the same K (where a fit of whole rounds cannot separate them)."""
    from dataclasses import replace

    est = CostEstimator()
    for _ in range(50):
        t = tele(6, 3, 0.006, 0.03, 2.4 * 0.006 + 0.55 * 0.03)
        est.observe(replace(t, e_draft_j=2.4 * 0.006))
    m = est.model()
    assert m.p_draft_w == pytest.approx(2.4) and m.p_wait_w == pytest.approx(0.55)


def test_rounds_that_draft_nothing_leave_the_measured_drafting_power_alone() -> None:
    """K = 0 rounds (a policy sitting at K = 0 over its budget) read the meter around a few
    microseconds of "drafting": with a meter's quantum in them (RAPL: ~1 ms of energy at once) such
    a ratio is noise. They must not take P_draft from the drafting rounds' 2.4 W toward it."""
    from dataclasses import replace

    est = CostEstimator()
    for _ in range(50):
        t = tele(6, 3, 0.006, 0.03, 2.4 * 0.006 + 0.55 * 0.03)
        est.observe(replace(t, e_draft_j=2.4 * 0.006))
    for _ in range(300):
        t = tele(0, 0, 0.00002, 0.03, 7.0 * 0.00002 + 0.55 * 0.03)
        est.observe(replace(t, t_drafted_s=0.00002, e_draft_j=7.0 * 0.00002))
    m = est.model()
    assert m.p_draft_w == pytest.approx(2.4) and m.p_wait_w == pytest.approx(0.55, rel=0.01)


def test_a_negative_drafting_reading_is_no_negative_power() -> None:
    """Drafting readings net negative (a meter's step backwards) gave P_draft < 0 W, pricing
    longer blocks cheaper; the waiting power was already clipped at 0 W, the drafting one is too."""
    from dataclasses import replace

    est = CostEstimator()
    for _ in range(20):
        t = tele(6, 3, 0.006, 0.03, 0.55 * 0.03)
        est.observe(replace(t, e_draft_j=-0.02))
    assert est.model().p_draft_w == 0.0


def test_cost_estimator_skips_unmeasured_energy() -> None:
    est = CostEstimator()
    before = est.model()
    est.observe(tele(4, 2, 0.005, 0.02, math.nan))
    after = est.model()
    assert (after.p_draft_w, after.p_wait_w) == (before.p_draft_w, before.p_wait_w)
    assert after.draft_s(4) == pytest.approx(0.005, rel=0.05)


def test_transport_time_is_learned_from_blocks_not_sent_ahead() -> None:
    """A block sent ahead waits at the edge behind the blocks before it, inside its `t_net_s`:
    the channel estimate ignores such rounds, the edge's time still learns from them."""
    from dataclasses import replace

    est = CostEstimator()
    for _ in range(30):
        est.observe(tele(4, 4, 0.004, 0.02, 0.05))  # t_net_s 15 ms, edge 5 ms
    before = est.model()
    assert before.t_net0_s + 4 * before.t_net_per_token_s == pytest.approx(0.015, abs=1e-3)
    for _ in range(30):  # sent ahead: 60 ms "transport" (45 of it queued behind its parent), edge 8 ms
        est.observe(replace(tele(4, 4, 0.004, 0.02, 0.05), sent_ahead=True, t_net_s=0.06, t_edge_compute_s=0.008))
    m = est.model()
    assert m.t_net0_s + 4 * m.t_net_per_token_s == pytest.approx(0.015, abs=1e-3)
    assert m.t_edge0_s + 4 * m.t_edge_per_token_s > before.t_edge0_s + 4 * before.t_edge_per_token_s + 2e-3


def test_a_guess_is_fitted_as_the_drafter_forward_it_is() -> None:
    """A block sent ahead drafts its guess and then its k drafts: k + 1 forwards in `t_draft_s`.
    Fitted as k, the guess would land in the per-block intercept, which `chain_frame` (pricing the
    guess itself) and every round one at a time would then pay again. An empty block sent ahead
    drafted nothing."""
    from dataclasses import replace

    def fitted(send_ahead: bool) -> CostModel:
        rng = random.Random(0)
        est = CostEstimator()
        for i in range(400):
            k = rng.choice([2, 3, 4, 5, 6])
            ahead = send_ahead and i % 2 == 1
            est.observe(replace(tele(k, k, 0.005 * (k + ahead), 0.02, 0.05), sent_ahead=ahead, guessed=ahead))
            if send_ahead:
                est.observe(replace(tele(0, 0, 0.0, 0.02, 0.05), sent_ahead=True, follow=True))
        return est.model()

    lone, mixed = fitted(False), fitted(True)  # 0 per block, 5 ms per forward (the lone fit's ridge bias aside)
    assert lone.t_draft0_s < 5e-4
    assert mixed.t_draft0_s == pytest.approx(lone.t_draft0_s, abs=5e-5)
    assert mixed.t_draft_s == pytest.approx(lone.t_draft_s, rel=1e-2)


def test_radio_cost_is_learned_from_rounds_that_cut_nothing() -> None:
    """A miss's round carries the bytes (and radio energy) of the blocks it cut, and the round
    after it those of their stale verdicts; a chain's price adds both as waste itself: the
    per-block radio line is fitted on the other rounds only."""
    from dataclasses import replace

    est = CostEstimator()
    for i in range(200):
        k = 2 + i % 5
        est.observe(tele(k, k, 0.004, 0.02, 0.05, radio=1e-3 + 1e-4 * k))
        # A miss that cut two blocks: their radio energy rides on this round.
        est.observe(replace(tele(k, 1, 0.004, 0.02, 0.05, radio=3 * (1e-3 + 1e-4 * k)), stale_blocks=2))
        # A miss that cut two empty blocks (sent ahead with nothing drafted): their bytes ride too.
        est.observe(replace(tele(k, 1, 0.004, 0.02, 0.05, radio=3 * (1e-3 + 1e-4 * k)), stale_empty=2))
        # The next round: the two stale verdicts' bytes (and radio energy) arrived with its own.
        late = replace(tele(k, k, 0.004, 0.02, 0.05, radio=1e-3 + 1e-4 * k + 2e-3), stale_bytes_down=60)
        est.observe(late)
    m = est.model()
    # (the fit's ridge pulls the slope a little towards 0; counting the misses in would double both)
    assert m.e_radio0_j == pytest.approx(1e-3, rel=0.05) and m.e_radio_per_token_j == pytest.approx(1e-4, rel=0.05)


def test_radio_connected_state_is_priced_by_time() -> None:
    """The radio's connected state between transfers (`Telemetry.e_radio_link_j`, ~1 W on LTE for
    the whole round) is learned as a power, apart from the transfers' per-byte energy, and priced
    over time: Ê(K) gains T̂(K) x P_link, a send-ahead frame P_link x its whole time (not a round's
    worth per block), and a pre-draft's saved time saves it too. It moves the choice: with the
    radio on anyway, a round that emits more per second is cheaper per token."""
    from dataclasses import replace

    est = CostEstimator()
    for i in range(300):
        k = i % 7
        t_draft, t_wait = (0.001 + 0.002 * k) if k else 0.0, 0.02
        link = 1.06 * (t_draft + t_wait)
        est.observe(replace(tele(k, k, t_draft, t_wait, 0.05, radio=1e-3 + 1e-4 * k + link), e_radio_link_j=link))
    m = est.model()
    assert m.p_link_w == pytest.approx(1.06, rel=1e-6)
    assert m.e_radio0_j == pytest.approx(1e-3, rel=0.05) and m.e_radio_per_token_j == pytest.approx(1e-4, rel=0.05)

    c, linked = cost(), cost(p_link_w=1.06)
    for k in range(9):
        assert linked.energy_j(k) == pytest.approx(c.energy_j(k) + 1.06 * c.time_s(k))
    for cont in (0.0, 0.5, 0.9):
        n, t, e = chain_frame(Objective(c), 4, cont, 2)
        n1, t1, e1 = chain_frame(Objective(linked), 4, cont, 2)
        assert (n1, t1) == (n, t) and e1 == pytest.approx(e + 1.06 * t)
    # A pre-draft that does not pay for its energy under a budget does once the time it saves
    # also saves the radio's power (hand-computed: 39 mJ more drafting; 2.4 ms saved, worth 9.6 mJ of
    # drafting and, at 20 W, 48 mJ of radio).
    n = expected_emitted(0.8, 4)
    verdicts = []
    for p_link in (0.0, 20.0):
        dear = cost(t_draft_s=0.002, p_draft_w=4.0, p_wait_w=0.1, p_link_w=p_link)
        budget = dear.energy_j(4) / n
        tight = Objective(dear, v=1.0, q_j=100 * budget, budget_j_per_token=budget, k_max=8)
        saved_s = 0.3 * 4 * 0.002
        extra_j = 5 * 0.002 * (4.0 - 0.1) - saved_s * (4.0 + p_link)
        t, e = dear.time_s(4), dear.energy_j(4)
        pays = tight.score_of(n, t - saved_s, e + extra_j) > tight.score_of(n, t, e)
        assert predraft_pays(tight, 4, n, 0.3, 5) == pays
        verdicts.append(pays)
    assert verdicts == [False, True]
    # The fewest joules per token: no drafting without the radio's power, drafting with it.
    cheap = cost(t_draft_s=0.002, p_draft_w=4.0, p_wait_w=0.1)
    assert cheapest_k(cheap, 8)[0] == 0 and cheapest_k(replace(cheap, p_link_w=5.0), 8)[0] == 4


def test_estimates_add_up_to_the_meter_with_thread_hops_around_the_drafting() -> None:
    """The drafting reading covers the forwards and the thread hops around them (0.3 ms a block,
    at drafting power here); the estimates split time and energy the same way, so their energy
    and time for a K add up to the rounds' (once the split's powers came from one interval and
    the times from another, and the energy came out low by the hops' share)."""
    from dataclasses import replace

    p_draft, p_wait, hop, per = 3.0, 0.5, 0.0003, 0.001
    est = CostEstimator()
    rounds = {}
    for i in range(400):
        k = 1 + i % 8
        span, t_wait = hop + per * k, 0.02
        e = p_draft * span + p_wait * t_wait
        t = replace(
            tele(k, k // 2, per * k, t_wait, e),
            t_drafted_s=span,
            e_draft_j=p_draft * span,
            t_round_s=span + t_wait,
            t_net_s=0.75 * t_wait,
        )
        est.observe(t)
        rounds[k] = (e, span + t_wait)
    m = est.model()
    for k, (e, t) in rounds.items():
        assert m.energy_j(k) == pytest.approx(e, rel=0.01), k
        assert m.time_s(k) == pytest.approx(t, rel=0.01), k
    assert m.p_draft_w == pytest.approx(p_draft, rel=1e-6) and m.p_wait_w == pytest.approx(p_wait, rel=1e-6)


def test_acceptance_estimate_excludes_unobserved_drafts() -> None:
    est = CostEstimator(halflife_rounds=1e9)
    for _ in range(500):  # 8 drafts, first rejected: 0 of 1 observed token accepted
        est.observe(tele(8, 0, 0.008, 0.02, 0.1))
        est.observe(tele(8, 8, 0.008, 0.02, 0.1))  # all 8 observed and accepted
    # 4000 accepted of 4500 observed (a biased estimator would say 4000 / 8000).
    assert est.model().alpha == pytest.approx(4000 / 4500, abs=0.01)


def test_wilson_upper_bound() -> None:
    # Hand-computed: 0 of 4 at z = 2 -> (0 + 4/8 + 2·sqrt(4/64)) / (1 + 4/4) = 0.5.
    assert wilson_upper(0.0, 4.0, 2.0) == pytest.approx(0.5)
    assert wilson_upper(0.3, 10.0, 0.0) == pytest.approx(0.3)  # z = 0: the rate itself
    assert wilson_upper(0.5, 0.0, 2.0) == 1.0  # nothing seen: anything is possible
    bounds = [wilson_upper(0.4, n, 2.0) for n in (1, 4, 16, 64, 256, 4096)]
    assert all(a > b > 0.4 for a, b in itertools.pairwise(bounds))  # closes on p from above
    assert bounds[-1] == pytest.approx(0.4, abs=0.02) and wilson_upper(1.0, 3.0, 2.0) == 1.0


def test_acceptance_upper_end_and_the_evidence_count() -> None:
    est = CostEstimator(halflife_rounds=1e9)
    # The prior only, 0.6 over 4 pseudo-tokens: (0.6 + 4/8 + 2·sqrt(0.24/4 + 4/64)) / 2 = 0.9.
    assert est.observed_drafts == 0 and est.alpha_upper() == pytest.approx(0.9)
    est.observe(tele(8, 0, 0.008, 0.02, 0.1))  # 1 observed draft, rejected
    est.observe(tele(8, 8, 0.008, 0.02, 0.1))  # 8 observed, accepted
    est.observe(tele(0, 0, 0.0, 0.02, 0.1))  # no drafts: no evidence
    assert est.observed_drafts == 9
    a = est.model().alpha
    assert a == pytest.approx((0.6 * 4 + 8) / 13)
    assert est.alpha_upper() == pytest.approx(wilson_upper(a, 13.0, 2.0)) and est.alpha_upper() > a


def test_isotonic_fit() -> None:
    assert isotonic_non_increasing([0.9, 0.5, 0.7, 0.2], [1, 1, 1, 1]) == pytest.approx([0.9, 0.6, 0.6, 0.2])
    assert isotonic_non_increasing([0.1, 0.9], [3, 1]) == pytest.approx([0.3, 0.3])


def test_calibrator_converges_on_synthetic_data() -> None:
    """Drafts accepted with probability exp(-h): the calibrator learns the curve within a few
    percent, and tokens after a block's first rejection (which would bias it) are excluded."""
    rng = random.Random(2)
    cal = EntropyCalibrator(halflife_tokens=1e9)
    for _ in range(6000):
        hs = [rng.expovariate(1.0) for _ in range(6)]
        a = 0
        while a < len(hs) and rng.random() < math.exp(-hs[a]):
            a += 1
        cal.observe_block(hs, a)
    checked = 0
    for row in cal.table():
        if row["observed"] > 300 and math.isfinite(row["h_high"]):
            lo, hi = row["h_low"], row["h_high"]
            # E[exp(-h) | h in the bin] with h's own density exp(-h) (a plain mean over the bin was
            # 0.0258 instead of 0.0304 at 3-4.5 nats), within 2.5 standard errors of a binomial
            # over the bin's observations, plus what the prior's 4 pseudo-tokens can pull (an
            # absolute 0.04 let p̂ = 0 pass where the true value is 0.03).
            truth = (math.exp(-2 * lo) - math.exp(-2 * hi)) / (2 * (math.exp(-lo) - math.exp(-hi)))
            n = row["observed"]
            tol = 2.5 * math.sqrt(truth * (1 - truth) / n) + 4.0 / n
            assert row["p_hat"] == pytest.approx(truth, abs=tol), (row, truth, tol)
            checked += 1
    assert checked >= 10
    p = [cal.p_accept(h) for h in (0.0, 0.3, 1.0, 3.0, 8.0)]
    assert p == sorted(p, reverse=True)
    assert cal.survival([0.01, 0.01]) == pytest.approx(cal.p_accept(0.01) ** 2)


def test_calibrator_prior_and_unobserved_tokens() -> None:
    cal = EntropyCalibrator(prior_alpha=0.6)
    assert cal.p_accept(2.0) == pytest.approx(0.6)
    cal.observe_block([0.1, 0.1, 5.0, 5.0], 1)  # accepted, rejected, two unobserved
    assert sum(r["observed"] for r in cal.table()) == pytest.approx(2.0)
    cal.observe_block([], 0)  # an empty block observes nothing
    assert sum(r["observed"] for r in cal.table()) == pytest.approx(2.0)


def test_an_empty_bin_does_not_pull_the_observed_tail_towards_the_overall_rate() -> None:
    """An easy workload (overall acceptance ~0.97), then 12 drafts at 5 nats of which one was
    accepted: their bin says ~0.3 (its data, smoothed by the prior), and the empty bin above it the
    same. The empty top bin's prior weight once pooled 0.97 into it: 0.44, which keeps drafting past
    exactly the tokens the early exit is for."""
    cal = EntropyCalibrator()
    for i in range(300):
        cal.observe_block([0.01] * 4, 4 if i % 8 else 3)
    for i in range(12):
        cal.observe_block([0.01, 5.0], 2 if i == 0 else 1)
    assert cal.overall > 0.95
    smoothed = (1 + cal.prior_tokens * cal.overall) / (12 + cal.prior_tokens)  # the bin's own, decay aside
    assert cal.p_accept(5.0) == pytest.approx(smoothed, abs=0.01) and cal.p_accept(5.0) < 0.35
    assert cal.p_accept(7.0) == cal.p_accept(5.0)  # unseen, above: no more trusted than the bin below
    assert cal.p_accept(0.01) > 0.95
