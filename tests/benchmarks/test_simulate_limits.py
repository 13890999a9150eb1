"""The simulator at its limits, where it must do what the device loop does or say why not.

A local pre-draft stops where the real loop's (`gelato.device.generate`: `fits`, none past the
generation's last round token): the simulator once went one token further and priced the depth
uncapped. A model pricing every round at no time (fitted intercepts clamped to 0, no round trip)
reports rates as the controller prices such a frame (1 ns), not a division by zero. A budget of
0 J/token is no budget, for the objective as for the controller's queue (it divided by it)."""

from __future__ import annotations

import math

from gelato.benchmarks.simulate import Channel, Device, RoundModel, run_spec
from gelato.benchmarks.simulate_model import Costs, Spec, Trace, agree_runs
from gelato.device.policy import FixedK, PolicyOptions, parse_policy
from tests.benchmarks.test_simulate import RecordingPolicy

COSTS = Costs(0.0, 1.0e-3, 1.9e-3, 6e-5, 19.0, 1.8, 35.0)


def test_a_local_pre_draft_stops_where_the_real_loops_does() -> None:
    """n = 4, fixed-2, every draft agreed: the first round emits positions 0-2, and its round
    token (position 2) leaves one position (3) for the next block: one token pre-drafted, not
    the two the round trip had time for."""
    for n in (4, 5, 9):
        policy = FixedK(2, PolicyOptions(pipeline="local"))
        rec = RecordingPolicy(policy)
        device = Device(policy, RoundModel(COSTS, Channel(rtt_s=0.020)), seed=0)
        device.generate(Trace((0.01,) * n, agree_runs([1] * n), frozenset(), n, 20))
        pos, predrafted = 0, []
        for tele in rec.seen:
            assert tele.predrafted <= max(0, n - pos - 1 - tele.k), (n, pos, tele)
            predrafted.append(tele.predrafted)
            pos += tele.accepted + 1
        assert pos == n and predrafted[0] == min(3, n - 3), (n, predrafted)


def test_a_model_with_no_time_reports_rates_not_a_division_by_zero() -> None:
    traces = [Trace((0.01,) * 50, agree_runs([1] * 50), frozenset(), 50, 20)]
    free = Costs(0.001, 0.002, 0.0, 0.003, 20.0, 4.0, 20.0)  # the edge's intercept clamped to 0
    row = run_spec(Spec("fixed-0"), traces, RoundModel(free, Channel(rtt_s=0.0, radio=None)), 1, 200, 0)
    assert row["tokens"] >= 200 and row["tokens_per_s"] == row["tokens"] / 1e-9
    assert math.isfinite(row["fleet_tokens_per_s"]) and row["drafting_share"] == 0.0


def test_a_zero_budget_is_no_budget() -> None:
    for name in ("lyapunov", "gelato"):
        zero = parse_policy(name, PolicyOptions(budget_j_per_token=0.0))
        none = parse_policy(name, PolicyOptions())
        assert zero.controller.queue is None
        assert zero.decide(4) == none.decide(4)
