"""The controller's pure math: the deficit queue and the outer and inner decisions (K_ref, the budget,
pre-drafting, send-ahead chains). Its estimators and calibrator are in test_controller_estimators.py."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from gelato.controller import (
    CostModel,
    DeficitQueue,
    Objective,
    chain_frame,
    cheapest_k,
    choose_chain_k,
    choose_k_ref,
    expected_emitted,
    keep_drafting,
    predraft_pays,
)


def cost(**kw: float) -> CostModel:
    base = dict(
        t_draft_s=0.001,
        t_edge0_s=0.004,
        t_edge_per_token_s=0.0,
        t_net0_s=0.016,
        t_net_per_token_s=0.0,
        p_draft_w=2.0,
        p_wait_w=0.5,
        e_radio0_j=0.0,
        e_radio_per_token_j=0.0,
        alpha=0.8,
    )
    base.update(kw)
    return CostModel(**base)


def test_queue_arithmetic() -> None:
    q = DeficitQueue(0.01)
    assert q.update(0.05, 3) == pytest.approx(0.02)  # 0 + 0.05 - 0.03
    assert q.update(0.0, 1) == pytest.approx(0.01)
    assert q.update(0.0, 5) == 0.0  # never below zero
    assert q.update(math.nan, 4) == 0.0 and q.unmeasured_rounds == 1  # NaN is no reading, not 0 J
    assert q.tokens == 9 and q.j_per_token == pytest.approx(0.05 / 9)
    assert q.update(0.03, 1) == pytest.approx(0.02)
    assert q.update(math.nan, 2) == pytest.approx(0.02) and q.unmeasured_rounds == 2  # Q kept as it was
    with pytest.raises(ValueError):
        DeficitQueue(0.0)


def test_queue_bounds_the_overshoot() -> None:
    """Σ E − ē Σ N ≤ Q_R: the long-run J/token exceeds ē by at most Q_R / Σ N."""
    rng = random.Random(0)
    q = DeficitQueue(0.02)
    energy = tokens = 0.0
    for _ in range(1000):
        e, n = rng.uniform(0, 0.2), rng.randint(1, 6)
        q.update(e, n)
        energy, tokens = energy + e, tokens + n
    assert energy - 0.02 * tokens <= q.q_j + 1e-9


def test_expected_emitted_closed_form() -> None:
    assert expected_emitted(0.5, 0) == 1.0
    assert expected_emitted(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_emitted(1.0, 4) == 5.0


def test_k_ref_hand_computed() -> None:
    # No budget: maximise N(K)/T(K), T = 0.02 + 0.001 K, α = 0.8.
    c = cost()
    ratios = [expected_emitted(0.8, k) / (0.02 + 0.001 * k) for k in range(9)]
    k, score = choose_k_ref(Objective(c), 8)
    assert k == max(range(9), key=lambda i: ratios[i]) and score == pytest.approx(max(ratios))
    # Hand check of two points: K=0 -> 1/0.02 = 50; K=8 -> (1-0.8^9)/0.2/0.028.
    assert ratios[0] == pytest.approx(50.0) and ratios[8] == pytest.approx((1 - 0.8**9) / 0.2 / 0.028)
    # Useless drafter: drafting only costs time.
    assert choose_k_ref(Objective(cost(alpha=0.0)), 8)[0] == 0
    # Perfect drafter, free drafting: the cap.
    assert choose_k_ref(Objective(cost(alpha=0.999, t_draft_s=0.0)), 8)[0] == 8
    # Made to draft (`k_min`): the best K >= 1, not K = 0 however it scores.
    forced = [expected_emitted(0.0, k) / (0.02 + 0.001 * k) for k in range(1, 9)]
    assert choose_k_ref(Objective(cost(alpha=0.0)), 8, k_min=1) == (1, pytest.approx(max(forced)))
    assert choose_k_ref(Objective(c), 8, k_min=1) == choose_k_ref(Objective(c), 8)  # already >= 1


def test_k_ref_stops_early_but_equals_the_full_enumeration() -> None:
    """`choose_k_ref` stops at the score's first real fall (quasi-concave over K >= 1): over random
    cost models, budgets and backlogs it picks what scoring every K would, ties to the smaller K."""
    rng = random.Random(7)

    def every_k(obj: Objective, k_max: int) -> tuple[int, float]:
        scores = [obj.score(expected_emitted(obj.cost.alpha, k), k) for k in range(k_max + 1)]
        best = max(scores)
        return scores.index(best), best

    stopped_early = over_budget = 0
    for _ in range(3000):
        c = cost(
            t_draft_s=rng.uniform(1e-4, 0.05),
            t_draft0_s=rng.uniform(0, 0.01),
            t_edge0_s=rng.uniform(1e-4, 0.05),
            t_edge_per_token_s=rng.uniform(0, 0.01),
            t_net0_s=rng.choice([0.0, rng.uniform(0, 0.2)]),
            t_net_per_token_s=rng.uniform(0, 1e-3),
            p_draft_w=rng.uniform(0.5, 10),
            p_wait_w=rng.uniform(0.1, 3),
            e_radio0_j=rng.uniform(0, 0.05),
            e_radio_per_token_j=rng.uniform(0, 1e-3),
            alpha=rng.choice([rng.random(), 0.0, 0.999999, 1.0]),
        )
        k_max = rng.choice([1, 4, 8, 32])
        budget = rng.choice([None, rng.uniform(0.01, 2), cheapest_k(c, k_max)[1] * rng.uniform(0.5, 1.5)])
        # With k_max known the objective may be over budget (score λ·N̂ − Ê): concave in K ≥ 1.
        bound = rng.choice([None, k_max])
        obj = Objective(c, rng.uniform(0.1, 10), rng.choice([0.0, rng.uniform(0, 100)]), budget, bound)
        over_budget += obj.over_budget
        assert choose_k_ref(obj, k_max) == every_k(obj, k_max)
        stopped_early += choose_k_ref(obj, k_max)[0] + 2 < k_max
    assert stopped_early > 1000  # most optima lie well inside the range: the stop is exercised
    assert over_budget > 100  # and so is the over-budget score


# The cost model at the end of a live lyapunov run whose device had slowed down (drafting 2.7 ms a
# token): its cheapest K is 2, at 13.2 mJ/token.
SLOWED = dict(t_draft_s=2.74e-3, t_draft0_s=0.56e-3, t_edge0_s=5.6e-3, t_net0_s=22.7e-3, p_draft_w=2.7,
              p_wait_w=0.57, e_radio0_j=0.08e-3, e_radio_per_token_j=6e-6, alpha=0.808)  # fmt: skip


def test_over_budget_spends_the_least_per_token() -> None:
    """Every K costs more than ē per token (that run's budget): the queue can only grow. The ratio
    score, maximising (N − Ẽ)/T, would pick short rounds, which grow the queue slowest per second
    but cost more per token; over budget the choice is the cheapest K per token, for a backlog of
    any size."""
    c = cost(**SLOWED)
    budget = 0.01008
    k_cheap, j_cheap = cheapest_k(c, 8)
    per_token = [c.energy_j(k) / expected_emitted(c.alpha, k) for k in range(9)]
    assert (k_cheap, j_cheap) == (2, pytest.approx(min(per_token))) and j_cheap > budget
    for q_j in (0.05, 1.0, 6.6, 100.0):
        ratio = Objective(c, 20.0, q_j, budget)  # no bound given: the ratio score, as before
        over = Objective(c, 20.0, q_j, budget, k_max=8)
        assert over.over_budget and not ratio.over_budget
        assert choose_k_ref(over, 8) == (2, pytest.approx(0.0, abs=1e-12))  # λ·N̂ − Ê = 0 at λ's K
        if q_j >= 6.6:  # a large backlog: the ratio score picks a dearer K
            k_ratio = choose_k_ref(ratio, 8)[0]
            assert per_token[k_ratio] > j_cheap * 1.02
    # Chains are priced the same way: λ·N − E of the chain's frame.
    n, t, e = chain_frame(over, 2, 0.5, 2)
    assert over.score_of(n, t, e) == pytest.approx(j_cheap * n - e)


def test_not_over_budget_when_a_k_fits_or_the_queue_is_empty() -> None:
    """The ratio score stays wherever some K fits the budget (the queue drains), with an empty
    queue (pure throughput), without a budget, and when the bound on K leaves out the cheap K."""
    c = cost(**SLOWED)
    _, j_cheap = cheapest_k(c, 12)
    assert not Objective(c, 1.0, 1e3, j_cheap * 1.01, k_max=12).over_budget
    assert Objective(c, 1.0, 1e3, j_cheap * 0.99, k_max=12).over_budget
    assert not Objective(c, 1.0, 0.0, j_cheap * 0.99, k_max=12).over_budget
    assert not Objective(c, 1.0, 1e3, None, k_max=12).over_budget
    k_cheap = cheapest_k(c, 12)[0]
    assert k_cheap > 1 and Objective(c, 1.0, 1e3, j_cheap * 1.01, k_max=1).over_budget


def test_k_ref_with_a_backlog_prefers_energy() -> None:
    """A large Q makes the score energy-dominated: K moves to the lowest energy per token."""
    c = cost(t_draft_s=0.004, p_draft_w=4.0, p_wait_w=0.1, alpha=0.7)
    budget = 1e-3
    fast, _ = choose_k_ref(Objective(c, v=1.0, q_j=0.0, budget_j_per_token=budget), 12)
    frugal, _ = choose_k_ref(Objective(c, v=1.0, q_j=1e3, budget_j_per_token=budget), 12)
    per_token = [c.energy_j(k) / expected_emitted(0.7, k) for k in range(13)]
    assert frugal == min(range(13), key=lambda k: per_token[k])
    assert fast != frugal


def test_score_is_the_drift_plus_penalty_ratio() -> None:
    """[(V + Q̃)·N̂ − Q̃·Ê/ē] / T̂ with Q̃ = Q/ē, hand-computed at V ≠ 1, and K_ref its argmax over
    backlogs from none to large: `(V + Q̃)·N̂` written `V·N̂`, or V dropped, passed every other
    test of this file (the backlog test's cost model could not tell them apart; here each
    changes K_ref at some backlog)."""
    c = cost()
    budget, v = 0.02, 3.0
    obj = Objective(c, v=v, q_j=2 * budget, budget_j_per_token=budget, k_max=8)  # Q̃ = 2
    assert not obj.over_budget and obj.q_tokens == pytest.approx(2.0)
    n, t, e = expected_emitted(0.8, 4), c.time_s(4), c.energy_j(4)
    assert obj.score(n, 4) == pytest.approx(((v + 2.0) * n - 2.0 * e / budget) / t)
    assert Objective(c, v=v, budget_j_per_token=budget).score(n, 4) == pytest.approx(v * n / t)  # Q = 0
    assert Objective(c).score(n, 4) == pytest.approx(n / t)  # no budget: tokens per second

    def argmax(score: Callable[[float, float, float], float]) -> int:
        rows = [(1.0 if k == 0 else expected_emitted(0.8, k), c.time_s(k), c.energy_j(k)) for k in range(13)]
        return max(range(13), key=lambda k: (score(*rows[k]), -k))

    chosen, wrong_n, no_v = [], [], []
    for q in (0.0, 0.5, 2.0, 8.0, 50.0):
        k = choose_k_ref(Objective(c, v=v, q_j=q * budget, budget_j_per_token=budget, k_max=12), 12)[0]
        assert k == argmax(lambda n, t, e, q=q: ((v + q) * n - q * e / budget) / t), q
        chosen.append(k)
        wrong_n.append(argmax(lambda n, t, e, q=q: (v * n - q * e / budget) / t))
        no_v.append(argmax(lambda n, t, e, q=q: ((1.0 + q) * n - q * e / budget) / t))
    assert chosen != wrong_n and chosen != no_v, (chosen, wrong_n, no_v)


def test_predraft_pays_only_where_its_score_says() -> None:
    """Pre-drafting during the wait: with no budget it pays when it can hit (time saved); never
    when it cannot (p_hit 0: energy spent, nothing saved), and under a budget with a backlog a
    pre-draft that costs more joules than its time saving is worth is refused (an always-yes
    or energy-blind `predraft_pays` passed every test, and a budgeted run then spent 1.4-3x ē)."""
    c = cost(t_draft_s=0.002, p_draft_w=4.0, p_wait_w=0.1)  # drafting is dear, waiting cheap
    n = expected_emitted(0.8, 4)
    free = Objective(c)
    assert predraft_pays(free, 4, n, 0.9, 5)
    assert not predraft_pays(free, 4, n, 0.0, 5)  # cannot hit: no time saved
    assert not predraft_pays(free, 4, n, 0.9, 1)  # one token is only the target's own
    budget = c.energy_j(4) / n  # this round's own J/token: no room for extra drafting
    tight = Objective(c, v=1.0, q_j=100 * budget, budget_j_per_token=budget, k_max=8)
    t, e = c.time_s(4), c.energy_j(4)
    m, p_hit = 5, 0.3
    saved_s = p_hit * (m - 1) * c.t_draft_s
    extra_j = m * c.t_draft_s * (c.p_draft_w - c.p_wait_w) - p_hit * (m - 1) * c.t_draft_s * c.p_draft_w
    assert extra_j > 0 and tight.score_of(n, t - saved_s, e + extra_j) < tight.score_of(n, t, e)
    assert not predraft_pays(tight, 4, n, p_hit, m) and predraft_pays(free, 4, n, p_hit, m)


def test_chain_frame_hand_computed_and_its_limits() -> None:
    """Send-ahead's renewal frame: a chain that never goes on is one round plus the waste; one that
    always goes on runs at the per-block step; the choice follows the round trip."""
    c = cost()  # T(k) = 0.02 + 0.001 k, edge 4 ms, α = 0.8
    obj = Objective(c)
    n, t, e = chain_frame(obj, 4, 0.0, 2)
    assert n == pytest.approx(expected_emitted(0.8, 4)) and t == pytest.approx(c.time_s(4))
    assert e == pytest.approx(c.energy_j(4) + 2 * 0.005 * (2.0 - 0.5))  # two blocks of 5 drafted for nothing
    # cont = 0.5: one more block expected, costing max(5 ms drafting, 4 ms edge, 24 ms / 3) = 8 ms.
    n, t, _ = chain_frame(obj, 4, 0.5, 2)
    assert n == pytest.approx(2 * expected_emitted(0.8, 4)) and t == pytest.approx(0.024 + 0.008)
    # Hits are likely: chains beat rounds one at a time; a useless guess (match 0) never does.
    k_round, round_score = choose_k_ref(obj, 8)
    k_chain, chain_score = choose_chain_k(obj, 8, 0.95, 4)
    assert chain_score > 1.3 * round_score
    assert choose_chain_k(obj, 8, 0.0, 4)[1] <= round_score  # no budget: the waste costs no time
    priced = Objective(c, v=1.0, q_j=0.01, budget_j_per_token=1e-3)
    assert choose_chain_k(priced, 8, 0.0, 4)[1] < choose_k_ref(priced, 8)[1]  # with one, it costs energy
    # Short blocks continue more often: the chain's K is no larger than the round's.
    assert 0 < k_chain <= k_round
    # No round trip to hide (edge-bound steps): the chain's gain shrinks.
    near = Objective(cost(t_net0_s=0.0))
    gain_near = choose_chain_k(near, 8, 0.95, 4)[1] / choose_k_ref(near, 8)[1]
    assert gain_near < chain_score / round_score


def test_chain_choice_priced_with_how_often_chains_start() -> None:
    """`follow` mixes a chain frame with a lone round of the same k: at 1 the chain alone, at 0 a
    round one at a time of k, which never beats the round's own choice; in between, in between."""
    obj = Objective(cost())
    k_round, round_score = choose_k_ref(obj, 8)
    k_chain, chain_score = choose_chain_k(obj, 8, 0.95, 4)
    assert choose_chain_k(obj, 8, 0.95, 4, follow=1.0) == (k_chain, chain_score)
    k0, s0 = choose_chain_k(obj, 8, 0.95, 4, follow=0.0)
    assert s0 == pytest.approx(round_score) and k0 == k_round  # a lone round of k: the round choice
    k_half, s_half = choose_chain_k(obj, 8, 0.95, 4, follow=0.5)
    n, t, e = chain_frame(obj, k_half, 0.8**k_half * 0.95, 4)
    lone = (expected_emitted(0.8, k_half), obj.cost.time_s(k_half), obj.cost.energy_j(k_half))
    mixed = obj.score_of((n + lone[0]) / 2, (t + lone[1]) / 2, (e + lone[2]) / 2)
    assert s_half == pytest.approx(mixed) and round_score < s_half < chain_score
    # With a budget the energies are mixed too; the choice is the best mixed frame over every k.
    priced = Objective(cost(), v=1.0, q_j=0.004, budget_j_per_token=1e-3)
    for follow in (0.0, 0.3, 0.7):
        k, score = choose_chain_k(priced, 8, 0.95, 4, follow=follow)
        scores = {}
        for kk in range(1, 9):
            frame = chain_frame(priced, kk, 0.8**kk * 0.95, 4)
            lone = (expected_emitted(0.8, kk), priced.cost.time_s(kk), priced.cost.energy_j(kk))
            scores[kk] = priced.score_of(*(follow * x + (1 - follow) * y for x, y in zip(frame, lone, strict=True)))
        assert score == pytest.approx(max(scores.values())) and k == max(scores, key=lambda kk: scores[kk])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8])
def test_inner_rule_at_start_is_the_outer_decision(alpha: float) -> None:
    obj = Objective(cost(alpha=alpha))
    k_ref, _ = choose_k_ref(obj, 8)
    assert (k_ref > 0) == (alpha > 0)  # both answers are asked for
    # With S_0 = 1 and nothing drafted, "continue" holds iff K_ref > 0.
    assert keep_drafting(obj, 0, 1.0, 1.0, 8) == (k_ref > 0)


def test_chain_choice_with_every_time_at_zero() -> None:
    """A replayed or synthetic trace can fit every time at 0: chains are still ranked (by score),
    not a ZeroDivisionError."""
    free = cost(t_draft_s=0.0, t_edge0_s=0.0, t_net0_s=0.0)
    k, score = choose_chain_k(Objective(free), 8, 0.9, 2)
    assert 1 <= k <= 8 and score == math.inf


def test_inner_rule_stops_on_doubt_and_extends_on_confidence() -> None:
    obj = Objective(cost(alpha=0.7))
    k_ref, _ = choose_k_ref(obj, 16)
    assert 0 < k_ref < 16
    # An unlikely token (survival collapsed) ends the block before K_ref.
    s = 0.05
    assert not keep_drafting(obj, 1, 1.0 + s, s, 16)
    # A run of near-certain tokens keeps going past K_ref.
    n, s = 1.0, 1.0
    for _ in range(k_ref):
        s *= 0.99
        n += s
    assert keep_drafting(obj, k_ref, n, s, 16)


def test_a_round_priced_at_no_time_scores_by_its_sign() -> None:
    """Fits whose intercepts both sit at 0 price K = 0 at no time: with a backlog that makes its
    energy outweigh its tokens, that round is the worst choice, not an infinitely good one."""
    free = cost(t_edge0_s=0.0, t_net0_s=0.0, p_wait_w=0.5, e_radio0_j=0.05)
    obj = Objective(free, v=1.0, q_j=10.0, budget_j_per_token=0.001)
    assert not obj.over_budget and free.time_s(0) == 0.0
    assert obj.score(expected_emitted(free.alpha, 0), 0) == -math.inf
    assert choose_k_ref(obj, 8)[0] > 0
    assert Objective(free).score(1.0, 0) == math.inf  # no budget: tokens at no time
