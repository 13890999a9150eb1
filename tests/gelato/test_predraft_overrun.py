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
