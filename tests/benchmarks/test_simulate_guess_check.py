"""The simulator replays the live drafter's guess check (`Drafter._forward_checking_guess`): a
round reports `bonus_guess_hit` exactly when the live loop's would — the block before it fully
accepted with nothing drafted past it, and this block drafting — and the value is the trace's
(teacher-forced: the drafter's pick at the target's token is right where the trace agrees)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from gelato.benchmarks.simulate import Channel, Device, RoundModel, load_traces
from gelato.device.policy import PolicyOptions, parse_policy
from gelato.types import Telemetry
from tests.benchmarks.test_simulate import RecordingPolicy, synthetic_traces


def _checked_after(prev: Telemetry, t: Telemetry, mode: str) -> bool:
    """Whether the live loop checks the guess of `prev`'s target token while drafting `t`."""
    nothing_past = prev.predrafted == 0 and (mode == "local" or not t.sent_ahead)
    return 0 < prev.k == prev.accepted and nothing_past and t.k > t.carried


@pytest.mark.parametrize("mode", ["local", "send-ahead"])
@pytest.mark.parametrize("name", ["lyapunov", "gelato"])
def test_the_guess_check_follows_the_live_rules(tmp_path: Path, mode: str, name: str) -> None:
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(synthetic_traces(seed=3, prompts=12)))
    traces, costs, _ = load_traces(path)
    model = RoundModel(costs, Channel(rtt_s=0.004, p_draft_w=4.0))
    # A budget of fixed-3's own J/token: pipelining pays on some blocks and not on others, so
    # both kinds of round occur.
    fixed = Device(parse_policy("fixed-3"), model, seed=0)
    for trace in traces:
        fixed.generate(trace)
    budget = fixed.totals.energy_j / fixed.totals.tokens
    policy = parse_policy(name, PolicyOptions(pipeline=mode, ahead_blocks=2, budget_j_per_token=budget))
    rec = RecordingPolicy(policy)
    device = Device(policy, model, seed=0)
    checked = 0
    for trace in traces:
        start = len(rec.seen)
        device.generate(trace)
        rounds = rec.seen[start:]
        assert rounds[0].bonus_guess_hit is None
        pos = 0
        for prev, t in itertools.pairwise(rounds):
            want = _checked_after(prev, t, mode)
            assert (t.bonus_guess_hit is not None) == want, (prev, t)
            if want:
                assert t.bonus_guess_hit == (trace.run[pos + prev.k] > 0)
                checked += 1
            pos += prev.emitted
    assert checked > 20 and sum(t.predrafted > 0 for t in rec.seen) > 20
