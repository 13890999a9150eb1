"""Local pre-drafting in the simulator (`Device._local_round`) records a round's transport time as
the live loop does (`gelato.device.generate._verify_pipelined`: to the verdict's arrival): the
pre-draft's last forward, which runs past the verdict, is in the round's time but not in
`t_net_s`. Counted as transport, it grew with the block (rounds that draft are the ones that
pre-draft), the cost fit read it as transport per drafted token (0.43 ms at 0 ms round trip) and
a budgeted gelato then drafted nothing in most rounds."""

from __future__ import annotations

import json
from pathlib import Path

from gelato.benchmarks.simulate import Channel, Device, RoundModel, load_traces
from gelato.device.policy import FixedK, PolicyOptions
from tests.benchmarks.test_simulate import RecordingPolicy, perfect_traces, synthetic_traces


def test_the_pre_drafts_overrun_is_the_rounds_not_the_transports(tmp_path: Path) -> None:
    """At 0 ms (a 2 ms edge, 1 ms a draft) the pre-draft starts 3 tokens, the last ends ~1 ms after
    the verdict: in the round, not in its transport, and the transport fit stays at ~0."""
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(synthetic_traces(prompts=2)))
    _, costs, _ = load_traces(path)
    zero = RoundModel(costs, Channel(rtt_s=0.0))
    policy = FixedK(2, PolicyOptions(pipeline="local"))
    rec = RecordingPolicy(policy)
    device = Device(policy, zero, seed=0)
    for trace in perfect_traces(300, 2):
        device.generate(trace)
    pre = [t for t in rec.seen if t.predrafted]
    assert len(pre) > 100
    assert all(t.t_net_s < 1e-4 for t in pre)  # the transfers alone: tens of bytes at 50 Mbit/s
    # The overrun, in the round: all but where the trace's end cut the pre-draft short.
    overruns = [t.t_round_s - t.t_draft_s - t.t_edge_compute_s - t.t_net_s for t in pre]
    assert sum(o > 0.5e-3 for o in overruns) > 0.9 * len(pre)
    fit = policy.controller.cost.model()
    assert fit.t_net0_s + 8 * fit.t_net_per_token_s < 1e-4, fit
