"""Pipelining in the trace-driven simulator (`gelato.benchmarks.simulate`): send-ahead chains and local
pre-drafting replayed as the device runs them (chains following the trace, ending before a block that
guesses the end token, empty blocks ahead, blocks cut mid-draft, guesses dropped unsent), what it pays
with wrong and perfect guesses, gelato's budget when pipelined, and the CLI's pipelining sweep."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from gelato.benchmarks.simulate import (
    Channel,
    Costs,
    Device,
    RoundModel,
    Spec,
    Trace,
    agree_runs,
    load_traces,
    main,
    run_spec,
)
from gelato.device.policy import FixedK, PolicyOptions, parse_policy
from tests.benchmarks.test_simulate import RecordingPolicy, perfect_traces
from tests.benchmarks.test_simulate import setup as setup
from tests.benchmarks.test_simulate import trace_file as trace_file


def test_send_ahead_chain_follows_the_trace(setup: tuple[list[Trace], RoundModel]) -> None:
    """A hand-made trace, fixed-2 with one block ahead: the guess after the second block (position
    5) is wrong, so the block sent ahead after it comes back stale and the chain restarts."""
    _, model = setup
    agree = [1] * 12
    agree[5] = 0
    trace = Trace((0.1,) * 12, agree_runs(agree), frozenset(), 12, 20)
    policy = FixedK(2, PolicyOptions(pipeline="send-ahead", ahead_blocks=1))
    rec = RecordingPolicy(policy)
    Device(policy, model, seed=0).generate(trace)
    got = [
        (t.k, t.accepted, t.emitted, t.sent_ahead, t.stale_blocks, t.predraft_hit, t.wasted_tokens) for t in rec.seen
    ]
    assert got == [
        (2, 2, 3, False, 0, True, 0),  # positions 0-2; the block after it (guess at 2) is verified
        (2, 2, 3, True, 1, False, 3),  # positions 3-5; the target's token at 5 is not the guess: a miss
        (2, 2, 3, False, 0, True, 0),  # a new chain from 6
        (2, 2, 3, True, 0, False, 0),  # the last block: nothing after it (the generation's end)
    ]
    assert sum(t.emitted for t in rec.seen) == trace.n
    # A block sent ahead saves its round trip: its verdict comes a few ms after its parent's.
    assert rec.seen[1].t_round_s < 0.3 * rec.seen[0].t_round_s
    assert rec.seen[3].t_round_s < 0.3 * rec.seen[2].t_round_s
    # A stale block is still transmitted: its bytes are charged to the miss's round.
    assert rec.seen[1].bytes_up > rec.seen[3].bytes_up
    for t in rec.seen:  # each block's own transport: the round trip (20 ms) plus transfers
        assert 0.02 <= t.t_net_s < 0.03


def test_a_chain_ends_before_a_block_guessing_the_end_token(setup: tuple[list[Trace], RoundModel]) -> None:
    """As `gelato.device.pipeline._extend`: a block sent ahead whose guess is the end token (the
    drafter's pick at position 5 here, where the target's is another token and goes on) is drafted
    but not sent, and the chain drafts nothing more after its parent: the next block starts fresh
    after its verdict (sent, it would have come back stale)."""
    _, model = setup
    agree = [1] * 12
    agree[5] = 0
    trace = Trace((0.1,) * 12, agree_runs(agree), frozenset({5}), 12, 20)
    policy = FixedK(2, PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    rec = RecordingPolicy(policy)
    device = Device(policy, model, seed=0)
    device.generate(trace)
    got = [(t.k, t.accepted, t.emitted, t.sent_ahead) for t in rec.seen]
    assert got == [(2, 2, 3, False), (2, 2, 3, True), (2, 2, 3, False), (2, 2, 3, True)]
    assert (device.totals.unsent, device.totals.stale) == (1, 0) and sum(t.wasted_tokens for t in rec.seen) == 1


@pytest.mark.parametrize("mode", ["send-ahead", "local"])
def test_pipelining_with_wrong_guesses_never_pays(trace_file: Path, mode: str) -> None:
    """Guess-match probability 0: nothing drafted ahead is ever used, so a fixed K is never faster
    pipelined (but for the empty block sent ahead for a generation's last token, which needs no
    guess) and spends more energy; gelato, which decides itself, is never faster beyond noise
    unless it sends empty blocks ahead mid-generation (K = 0), which no guess can spoil."""
    traces, costs, _ = load_traces(trace_file)
    for rtt in (0.0, 0.02):
        model = RoundModel(costs, Channel(rtt_s=rtt), guess_match=0.0)
        for policy in ("fixed-2", "fixed-4", "gelato"):
            off = run_spec(Spec(policy), traces, model, tokens=2000)
            piped = run_spec(Spec(policy, pipeline=mode), traces, model, tokens=2000)
            assert piped["tokens"] == off["tokens"]  # the same generations
            assert piped["sent_ahead"] == 0 and piped["predraft_hit_rate"] in (0.0, None)
            ends_only = piped["sent_empty"] <= piped["generations"]  # at most each generation's last token
            if mode == "local":
                assert piped["sent_empty"] == 0
            elif policy != "gelato":
                assert ends_only
            if ends_only:
                slack = 1.02 if policy == "gelato" else 1.01
                assert piped["tokens_per_s"] <= slack * off["tokens_per_s"], (policy, rtt, piped["label"])
            if policy != "gelato":
                assert piped["j_per_token"] > off["j_per_token"] and piped["wasted_tokens_per_token"] > 0


@pytest.mark.parametrize("mode", ["send-ahead", "local"])
@pytest.mark.parametrize("guess_match", [0.0, 0.3])
def test_pipelined_gelato_stays_within_its_budget(trace_file: Path, mode: str, guess_match: float) -> None:
    """Under a feasible budget the energy-priced pipelining decisions (pre-draft or not, send a
    block ahead or not) keep gelato's long-run J/token within 1.05 ē, even where guesses rarely
    or never hit. Without a budget those decisions are speed alone, so an always-yes or
    energy-blind pre-draft rule, or a send-ahead rule without the score, passed every other test;
    with ē = 10 mJ/token they spent 13.6-33 mJ/token, drafting 1.8-7 wasted tokens per token."""
    traces, costs, _ = load_traces(trace_file)
    model = RoundModel(costs, Channel(rtt_s=0.02), guess_match=guess_match)
    fixed = [run_spec(Spec(f"fixed-{k}"), traces, model, tokens=2000)["j_per_token"] for k in range(9)]
    for budget in (1.05 * min(fixed), 1.3 * min(fixed)):
        row = run_spec(Spec("gelato", budget=budget, pipeline=mode), traces, model, tokens=4000)
        assert row["j_per_token"] <= 1.05 * budget, (mode, guess_match, budget, row["j_per_token"])


def test_send_ahead_with_perfect_guesses_reaches_the_drafting_bound() -> None:
    """Drafter = target and every guess right: a deep enough chain keeps the device drafting all
    the time, so throughput approaches what drafting alone allows — K + 1 tokens per K + 1 forwards
    (the guess + K drafts) — and nothing is wasted. With one block ahead and a long round trip it
    is the window instead: two blocks per (round trip + edge + drafting)."""
    costs = Costs(0.0, 1e-3, 2e-3, 5e-5, 19.0, 1.8, 35.0)
    traces = perfect_traces()
    k = 4
    model = RoundModel(costs, Channel(rtt_s=0.02), guess_match=1.0)
    r = run_spec(Spec(f"fixed-{k}", pipeline="send-ahead", ahead_blocks=8), traces, model, tokens=5000)
    bound = (k + 1) / max(model.draft_s(k + 1), model.edge_s(k))
    assert 0.95 * bound <= r["tokens_per_s"] <= bound * (1 + 1e-9)
    assert r["ahead_hit_rate"] == 1.0 and r["wasted_tokens_per_token"] == 0 and r["drafting_share"] > 0.95
    off = run_spec(Spec(f"fixed-{k}"), traces, model, tokens=5000)
    assert r["tokens_per_s"] > 4 * off["tokens_per_s"]

    slow = RoundModel(costs, Channel(rtt_s=0.1), guess_match=1.0)
    w = run_spec(Spec(f"fixed-{k}", pipeline="send-ahead", ahead_blocks=1), traces, slow, tokens=5000)
    up, down = slow.wire(k + 1)
    transfer = sum(slow.ch.radio.transfer_s(up, down)) if slow.ch.radio else 0.0
    window = 2 * (k + 1) / (0.1 + transfer + slow.edge_s(k) + slow.draft_s(k + 1))
    assert w["tokens_per_s"] == pytest.approx(window, rel=0.03)


def test_local_predrafting_with_perfect_guesses_skips_drafting() -> None:
    """Local pre-drafting, drafter = target, every guess right, a round trip long enough to
    pre-draft a whole block: after a generation's first round each block starts with the previous
    round's pre-draft. `Policy.predraft_depth` pre-drafts K + 1 tokens after a K-draft block, the
    first of them the target's own token, so all K drafts are carried and none is drafted."""
    costs = Costs(0.0, 1e-3, 2e-3, 5e-5, 19.0, 1.8, 35.0)
    model = RoundModel(costs, Channel(rtt_s=0.02), guess_match=1.0)
    policy = FixedK(4, PolicyOptions(pipeline="local"))
    rec = RecordingPolicy(policy)
    Device(policy, model, seed=0).generate(perfect_traces(200, 1)[0])
    first, rest = rec.seen[0], rec.seen[1:-1]
    assert first.carried == 0 and first.t_draft_s == pytest.approx(4e-3)
    assert all(t.carried == 4 and t.t_draft_s == pytest.approx(0.0) and t.predraft_hit for t in rest)
    off = run_spec(Spec("fixed-4"), perfect_traces(), model, tokens=3000)
    local = run_spec(Spec("fixed-4", pipeline="local"), perfect_traces(), model, tokens=3000)
    assert local["tokens_per_s"] > 1.1 * off["tokens_per_s"] and local["predraft_hit_rate"] > 0.99


def test_empty_blocks_ahead_as_the_device_sends_them(setup: tuple[list[Trace], RoundModel]) -> None:
    """`fixed-0` with send-ahead, as `pipelined_generate` runs it: after each generation's first
    round every block is an empty one sent ahead (`follow`), none is stale or drafted, and with
    two in flight past the awaited one a token costs about a third of a round trip."""
    traces, base = setup
    model = RoundModel(base.costs, Channel(rtt_s=0.03))
    policy = FixedK(0, PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    rec = RecordingPolicy(policy)
    device = Device(policy, model, seed=0)
    device.generate(traces[0])
    first, rest = rec.seen[0], rec.seen[1:]
    assert not first.sent_ahead and rest and all(t.follow and t.sent_ahead and t.k == 0 for t in rest)
    assert sum(t.emitted for t in rec.seen) == traces[0].n and device.totals.stale == 0
    assert device.totals.wasted_tokens == 0 and all(t.predrafted == 0 for t in rec.seen)
    steady = sorted(t.t_round_s for t in rest)[len(rest) // 2]
    assert steady < 0.5 * first.t_round_s  # no round trip per token
    off = run_spec(Spec("fixed-0"), traces, model, tokens=1000)
    piped = run_spec(Spec("fixed-0", pipeline="send-ahead"), traces, model, tokens=1000)
    assert piped["tokens_per_s"] > 2 * off["tokens_per_s"] and piped["sent_empty"] > 0 == piped["sent_ahead"]


def test_guesses_dropped_unsent_count_as_misses() -> None:
    """Drafter = target (every block fully accepted), guesses right half the time, no round trip
    and slow drafting: most verdicts come while the next block is drafted, and a block whose guess
    missed is dropped unsent. The guess-match rate the controller prices chains with must learn
    from those too (counting only the guesses sent, it drifts to 1), as the live loop reports them."""
    costs = Costs(0.0, 5e-3, 1e-3, 5e-5, 19.0, 1.8, 35.0)
    model = RoundModel(costs, Channel(rtt_s=0.0), guess_match=0.5)
    policy = FixedK(4, PolicyOptions(pipeline="send-ahead", ahead_blocks=1, halflife_rounds=1e9))
    rec = RecordingPolicy(policy)
    device = Device(policy, model, seed=0)
    for trace in perfect_traces(400, 3):
        device.generate(trace)
    assert device.totals.unsent > 50  # the case at hand: guesses known to miss while drafting
    assert 0.4 < policy.controller.bonus_match.value < 0.6
    dropped = [t for t in rec.seen if t.predrafted and not t.predraft_hit]
    assert dropped and all(t.accepted == t.k for t in dropped)


def test_a_block_cut_mid_draft_stops_at_its_next_draft() -> None:
    """As the live loop's `_CutRule`: once the awaited verdict shows a partial accept, the block
    being drafted after it stops at its next draft instead of being drafted whole, so a miss wastes
    a couple of forwards, not a block's worth."""
    costs = Costs(0.0, 5e-3, 1e-3, 5e-5, 19.0, 1.8, 35.0)
    model = RoundModel(costs, Channel(rtt_s=0.002), guess_match=1.0)
    agree = ([1] * 3 + [0]) * 300  # every 6-draft block is rejected at its fourth draft
    trace = Trace((0.1,) * len(agree), agree_runs(agree), frozenset(), len(agree), 20)
    policy = FixedK(6, PolicyOptions(pipeline="send-ahead", ahead_blocks=1))
    device = Device(policy, model, seed=0)
    device.generate(trace)
    tot = device.totals
    assert tot.unsent > 50 and tot.wasted_tokens <= 3 * tot.unsent  # a guess + 1-2 drafts each, not 7


def test_send_ahead_telemetry_is_consistent(setup: tuple[list[Trace], RoundModel]) -> None:
    """On the synthetic traces (guesses from the trace): every generation emits its n tokens, a
    round sent ahead always follows a hit, and the waste adds up to the stale and unsent blocks."""
    traces, model = setup
    for name in ("fixed-3", "gelato"):
        policy = parse_policy(name, PolicyOptions(pipeline="send-ahead", ahead_blocks=3))
        rec = RecordingPolicy(policy)
        device = Device(policy, model, seed=1)
        for trace in traces[:8]:
            start = len(rec.seen)
            device.generate(trace)
            rounds = rec.seen[start:]
            assert sum(t.emitted for t in rounds) == trace.n
            assert not rounds[0].sent_ahead
            for prev, t in itertools.pairwise(rounds):
                assert t.sent_ahead == prev.predraft_hit
                assert not (prev.predraft_hit and prev.stale_blocks)
                # A hit is a full accept with the guess right, or an empty block after it (it
                # follows any outcome: K = 0 sent ahead, never stale).
                assert not prev.predraft_hit or prev.accepted == prev.k or t.follow
        tot = device.totals
        assert tot.busy_s < tot.time_s
        if name == "fixed-3":  # always sends ahead (gelato decides: here it mostly does not)
            assert tot.sent_ahead > 0 and tot.stale > 0
            # Each stale or unsent block wasted its guess and up to 3 drafts (an empty one none).
            assert 0 < tot.wasted_tokens <= 4 * (tot.stale + tot.unsent)


def test_cli_pipelining_sweep(trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pipe"
    args = ["--traces", str(trace_file), "--out", str(out), "--tokens-per-device", "400", "--pipelining"]
    assert main([*args, "--rtts-ms", "0,20"]) == 0
    assert {p.name for p in out.iterdir()} == {"simulate.json", "table.md", "pipelining.png"}
    assert (out / "table.md").read_text().startswith("Simulated:")
    data = json.loads((out / "simulate.json").read_text())
    assert [r["rtt_ms"] for r in data["rtts"]] == [0, 20] and "--pipelining" in data["command"]
    r20 = data["rtts"][1]
    labels = {x["label"] for x in r20["runs"]}
    assert {"gelato", "gelato +local", "gelato +send-ahead", "oracle", f"{r20['fastest_fixed']} +send-ahead"} <= labels
    assert set(r20["gelato"]) == {"no_budget", "at_fixed_j"}
    assert r20["gelato"]["at_fixed_j"]["budget_j_per_token"] == r20["fastest_fixed_j_per_token"]
    assert "gelato +send-ahead" in capsys.readouterr().out
