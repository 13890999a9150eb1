"""The simulator replays the live drafter's guess check (`Drafter._forward_checking_guess`): a
round reports `bonus_guess_hit` exactly when the live loop's would — the block before it fully
accepted with nothing drafted past it, and this block drafting — and the value is the trace's
(teacher-forced: the drafter's pick at the target's token is right where the trace agrees)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from gelato.benchmarks.simulate import Channel, Device, RoundModel, load_traces
from gelato.device.policy import PolicyOptions, parse_policy
from gelato.types import Telemetry
from tests.benchmarks.test_simulate import RecordingPolicy, synthetic_traces


def _checked_after(prev: Telemetry, t: Telemetry, mode: str) -> bool:
    """Whether the live loop checks the guess of `prev`'s target token while drafting `t`: nothing
    drafted after `prev` (no pre-draft token; with send-ahead, no block sent after it, nor one
    dropped unsent, e.g. for a guess of the drafter's end token, which `wasted_tokens` counts)."""
    nothing_past = prev.predrafted == 0 and (mode == "local" or not (t.sent_ahead or prev.wasted_tokens))
    return 0 < prev.k == prev.accepted and nothing_past and t.k > t.carried


def _with_drafter_eos(traces: dict[str, Any], every: int) -> dict[str, Any]:
    """The drafter drafts its end token at every `every`-th position the target rejects there."""
    for p in traces["prompts"]:
        rejected = [i for i, a in enumerate(p["agree"]) if not a]
        p["drafter_eos"] = rejected[::every]
    return traces


@pytest.mark.parametrize("mode", ["local", "send-ahead"])
@pytest.mark.parametrize("name", ["lyapunov", "gelato"])
def test_the_guess_check_follows_the_live_rules(tmp_path: Path, mode: str, name: str) -> None:
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(_with_drafter_eos(synthetic_traces(seed=3, prompts=12), every=3)))
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
            if pos + prev.k in trace.eos_at and mode == "send-ahead":
                # The drafter's guess there is its end token: a block drafted after `prev` with
                # that guess is dropped unsent, and its waste charged to whichever round settles
                # next, so the rounds alone cannot tell whether anything was drafted after `prev`.
                pos += prev.emitted
                continue
            want = _checked_after(prev, t, mode)
            assert (t.bonus_guess_hit is not None) == want, (prev, t)
            if want:
                assert t.bonus_guess_hit == (trace.run[pos + prev.k] > 0)
                checked += 1
            pos += prev.emitted
    assert checked > 20 and sum(t.predrafted > 0 for t in rec.seen) > 20
