"""`predraft_pays` prices the pre-draft's overrun: the verdict stops a pre-draft only after the
token in progress (`Drafter.predraft`, the simulator's `_local_round`), so at a wait of a couple of
forwards the round ends up to a forward later than the verdict. Unpriced, pre-drafting at a short
round trip looked free of time, and a budgeted gelato with local pre-drafting at 0 ms paid for it
with edge-only rounds (README, simulated pipelining)."""

from __future__ import annotations

import math

from gelato.controller import CostModel, Objective, expected_emitted, predraft_pays


def _cost() -> CostModel:
    """A wait of 2.1 ms (the edge's forward, no round trip) and 0.97 ms a draft: the pre-draft
    starts 3 tokens before the verdict, the third ends 0.81 ms after it."""
    return CostModel(
        t_draft_s=0.00097,
        t_edge0_s=0.0021,
        t_edge_per_token_s=0.0,
        t_net0_s=0.0,
        t_net_per_token_s=0.0,
        p_draft_w=2.5,
        p_wait_w=0.5,
        e_radio0_j=0.0,
        e_radio_per_token_j=0.0,
        alpha=0.8,
    )


def test_a_pre_draft_that_overruns_a_short_wait_pays_only_when_it_hits_often() -> None:
    """No budget (tokens per second): three tokens started, two of them the next block's on a hit,
    so it pays iff p_hit · 2 · 0.97 ms > the 0.81 ms overrun, i.e. p_hit > 0.42."""
    c = _cost()
    n = expected_emitted(c.alpha, 2)
    free = Objective(c)
    overrun = 3 * c.t_draft_s - c.wait_s(2)
    assert math.isclose(overrun, 0.00081, rel_tol=1e-6)
    threshold = overrun / (2 * c.t_draft_s)
    assert not predraft_pays(free, 2, n, threshold - 0.02, 8)
    assert predraft_pays(free, 2, n, threshold + 0.02, 8)


def test_a_pre_draft_that_its_depth_ends_before_the_verdict_does_not_overrun() -> None:
    """Two tokens fit in the 2.1 ms wait: no overrun, so any chance of a hit saves time."""
    c = _cost()
    n = expected_emitted(c.alpha, 2)
    assert predraft_pays(Objective(c), 2, n, 0.05, 2)


def test_the_overruns_energy_is_charged_too() -> None:
    """Over budget (score λ·N − E: energy alone decides) with waiting nearly as dear as drafting
    (2.0 W against 2.5 W): three tokens drafted instead of idling cost 3 · 0.97 ms · 0.5 W, a hit
    returns the two kept tokens' drafting (2 · 0.97 ms · 2.5 W), and the 0.81 ms overrun idles no
    longer but still costs the 2.0 W it replaced. At p_hit 0.5 the overrun's joules are what make
    it not pay (without them: −0.97 mJ, pays); at 0.9 it pays all the same."""
    from dataclasses import replace

    c = replace(_cost(), p_wait_w=2.0)
    n = expected_emitted(c.alpha, 2)
    budget = 0.5 * c.energy_j(2) / n  # every K dearer than this: over budget with a backlog
    over = Objective(c, v=1.0, q_j=1.0, budget_j_per_token=budget, k_max=4)
    assert over.over_budget
    assert not predraft_pays(over, 2, n, 0.5, 8)
    assert predraft_pays(over, 2, n, 0.9, 8)


def test_only_the_tokens_the_next_block_keeps_are_saved() -> None:
    """A next block of one draft keeps one of the two pre-drafted tokens past the target's own:
    at p_hit 0.6 that saves 0.58 ms against the 0.81 ms overrun (does not pay), where keeping both
    would save 1.16 ms (pays)."""
    c = _cost()
    n = expected_emitted(c.alpha, 2)
    free = Objective(c)
    assert predraft_pays(free, 2, n, 0.6, 8)
    assert not predraft_pays(free, 2, n, 0.6, 8, next_k=1)
    assert predraft_pays(free, 2, n, 0.6, 8, next_k=2)
