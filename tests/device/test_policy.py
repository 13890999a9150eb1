"""Policies behind the one control seam: parsing, schedules, stop rules and the controller's decisions
(budgets, chains priced for send-ahead, exploration, a cold start). Losslessness of the round loop under
early exit is in test_policy_lossless.py, what it charges in test_policy_energy.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gelato.controller import CostModel, Objective, cheapest_k, choose_k_ref, expected_emitted
from gelato.device.cli import build_parser as device_parser
from gelato.device.config import DeviceConfig
from gelato.device.policy import (
    POLICY_NAMES,
    Controller,
    EntropyStop,
    Heuristic,
    PolicyOptions,
    _Continuation,
    parse_policy,
)
from gelato.types import Telemetry


def tele(k: int, accepted: int) -> Telemetry:
    t_draft = 0.001 * k
    return Telemetry(0, k, accepted, accepted + 1, 0.02, t_draft, 0.015, 0.0, 0.004, 0.01, 0.0, 0.01, 20, 30, "x", "x")


def test_parse_every_policy_and_refuse_unknown() -> None:
    for name in [n for n in POLICY_NAMES if n != "fixed-K"] + ["fixed-0", "fixed-7"]:
        assert parse_policy(name).name == name
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy("fixed-K")
    with pytest.raises(ValueError, match="offline bound"):
        parse_policy("oracle")
    with pytest.raises(ValueError, match="--v must be > 0"):
        PolicyOptions(v=0).validate()


def test_heuristic_schedule() -> None:
    p = Heuristic(PolicyOptions(heuristic_start=4, k_max=8))
    ks = []
    for accepted_all in (True, True, False, False, True, True, True):
        k = p.decide(32).k_ref
        ks.append(k)
        p.observe(tele(k, k if accepted_all else 0))
    assert ks == [4, 6, 8, 7, 6, 8, 8]  # +2 after a full accept, −1 otherwise, within [1, K_max]


def test_a_short_round_caps_only_its_own_block() -> None:
    """A generation's last round (or the room a send-ahead chain projects) may leave room for fewer
    drafts than the schedule's K: that block is shorter, K is not. One policy serves every prompt
    of a run, so the next prompt goes on where the schedule was, not at K = 1."""
    p = Heuristic(PolicyOptions(heuristic_start=4))
    for _ in range(3):
        k = p.decide(32).k_ref
        p.observe(tele(k, k))  # full accepts: 4 -> 6 -> 8 -> 10
    assert p.decide(32).k_ref == 10
    assert [p.decide(limit).k_ref for limit in (2, 0, 1)] == [2, 0, 1]  # the end of a generation
    assert p.decide(32).k_ref == 10  # the next prompt
    p.observe(tele(2, 2))  # a short block fully accepted: the schedule grows as always
    assert p.decide(32).k_ref == 12
    for _ in range(20):
        k = p.decide(32).k_ref
        p.observe(tele(k, k))
    assert p.decide(32).k_ref == 32  # never past the largest cap a round had (the edge's block limit)


@pytest.mark.parametrize("k", [0, 3, 8])
def test_fixed_k_keeps_within_k_max(k: int) -> None:
    """`--k-max` is a hard cap on drafts per round for every policy, fixed-K included."""
    capped = parse_policy(f"fixed-{k}", PolicyOptions(k_max=4))
    decision = capped.decide(32)
    assert (decision.k_ref, decision.k_max) == (min(k, 4), min(k, 4))
    assert capped.decide(2).k_ref == min(k, 2)  # and the round's own limit
    assert parse_policy(f"fixed-{k}").decide(32).k_ref == k  # `--k-max 0`: the edge's limit only
    assert parse_policy(f"fixed-{k}").decide(5).k_ref == min(k, 5)


def test_entropy_and_adaedl_gates() -> None:
    gate = EntropyStop(PolicyOptions(entropy_threshold=1.0)).gate(parse_policy("entropy").decide(8))
    assert gate(1, 0.5, None) is None and gate(2, 1.5, None) == "entropy"
    assert len(gate.p_accept) == 2
    ada = parse_policy("adaedl", PolicyOptions(adaedl_gamma=0.2, adaedl_lambda=0.5))
    g = ada.gate(ada.decide(8))
    h_stop = (1 - 0.5) ** 2 / 0.2  # 1 - sqrt(0.2 h) < 0.5  <=>  h > 1.25
    assert g(1, h_stop - 0.01, None) is None and g(1, h_stop + 0.01, None) == "entropy"


def test_lyapunov_and_gelato_follow_the_estimates() -> None:
    good, bad = parse_policy("lyapunov"), parse_policy("gelato")
    for _ in range(40):
        good.observe(tele(6, 6))
        bad.observe(tele(6, 0))
    assert good.decide(32).k_ref >= 6  # everything accepted: draft long
    assert bad.decide(32).k_ref == 0  # nothing accepted: the edge alone is faster
    assert bad.decide(32).k_max == 0  # and the inner loop does not draft at all


def test_lyapunov_over_budget_drafts_the_cheapest_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that slowed down (the estimates at the end of such a live run): every K costs more
    per token than the budget and the queue has grown. The decision is the K with the fewest
    joules per token by those estimates, not the shorter rounds the ratio score picks (they grow
    the queue slowest per second, but cost more per token)."""
    model = CostModel(t_draft_s=2.74e-3, t_draft0_s=0.56e-3, t_edge0_s=5.6e-3, t_edge_per_token_s=0.0,
                      t_net0_s=22.7e-3, t_net_per_token_s=0.0, p_draft_w=2.7, p_wait_w=0.57,
                      e_radio0_j=0.08e-3, e_radio_per_token_j=6e-6, alpha=0.808)  # fmt: skip
    budget = 0.01008
    for name in ("lyapunov", "gelato"):
        p = parse_policy(name, PolicyOptions(budget_j_per_token=budget))
        monkeypatch.setattr(p.controller.cost, "model", lambda: model)
        assert p.controller.queue is not None
        p.controller.queue.q_j = 6.6
        decision = p.decide(8)
        assert decision.k_ref == cheapest_k(model, 8)[0] == 2
        # The trace's view of it: over budget, and the model's J/token of K_ref (above ē).
        assert decision.over_budget and decision.j_per_token_model == pytest.approx(cheapest_k(model, 8)[1])
        assert decision.j_per_token_model > budget
        assert choose_k_ref(Objective(model, 20.0, 6.6, budget), 8)[0] < 2  # the ratio score's choice
        if name == "gelato":
            # Tokens accepted at the prior rate: the per-token rule drafts exactly K_ref, as the
            # outer decision priced it (a ratio-score gate stopped after one token, as "entropy").
            monkeypatch.setattr(p.controller.calibrator, "p_accept", lambda h: model.alpha)
            gate = p.gate(decision)
            assert gate is not None and gate(1, 0.0, None) is None and gate(2, 0.0, None) == "budget"
        p.controller.queue.q_j = 0.0  # no backlog: pure throughput, longer blocks
        relaxed = p.decide(8)
        assert relaxed.k_ref > 2 and not relaxed.over_budget
        assert relaxed.j_per_token_model == pytest.approx(
            model.energy_j(relaxed.k_ref) / expected_emitted(model.alpha, relaxed.k_ref)
        )


def test_chains_are_priced_only_while_send_ahead_runs() -> None:
    """`--pipeline send-ahead` alone does not make the controller price chains: the send-ahead
    loop sets `ahead_blocks` (its link's `max_ahead`) for the generation it runs; an edge without
    send-ahead gets rounds one at a time (local pre-drafting), decided as such."""
    p = parse_policy("lyapunov", PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    for _ in range(40):
        p.observe(tele(6, 6))  # everything accepted, 15 ms of transport: chains pay
    alone = p.decide(6)
    assert p.ahead_blocks is None and alone.score == pytest.approx(choose_k_ref(p.controller.objective(), 6)[1])
    p.ahead_blocks = 4
    chained = p.decide(6)
    assert chained.score > alone.score  # a chain's frame beat rounds one at a time
    p.ahead_blocks = 1
    assert p.decide(6).score < chained.score  # priced with the link's depth, not the option's


def test_chains_the_per_block_check_refuses_stop_shaping_k() -> None:
    """The outer decision sizes blocks for chains only as often as the per-block check (on each
    block's own entropies) starts one: refused at every chance, the chain's short blocks would go
    one at a time, so K returns to the round choice; accepted again, chains come back."""
    p = parse_policy("gelato", PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    for _ in range(40):
        p.observe(tele(6, 4))  # most drafts accepted, 15 ms of transport: chains pay
    p.ahead_blocks = 2
    k_round = choose_k_ref(p.controller.objective(), 8)[0]
    chained = p.decide(8)
    assert chained.k_ref < k_round  # chains favour shorter blocks
    assert p.send_ahead(chained, 0.0, first=True) is False  # a block certain to miss: refused
    assert p.controller.ahead_follow.value == 1.0  # counted when its round is observed, not before
    p.observe(tele(6, 4))
    assert 0.5 < p.controller.ahead_follow.value < 1.0  # one refusal: the prior's weight holds
    for _ in range(80):  # ~4 half-lives
        d = p.decide(8)
        p.send_ahead(d, 0.0, first=True)
        p.observe(tele(6, 4))
    assert p.controller.ahead_follow.value < 0.05 and p.decide(8).k_ref == k_round
    for _ in range(120):  # ~6 half-lives
        d = p.decide(8)
        p.send_ahead(d, 0.99, first=True)  # blocks sure to be hits: chains start again
        p.send_ahead(d, 0.0)  # a deeper block's check is not a chain's start: not counted
        p.observe(tele(6, 4))
    assert p.controller.ahead_follow.value > 0.9 and p.decide(8).k_ref == chained.k_ref


def test_gelato_drafts_a_chain_block_only_up_to_its_size() -> None:
    """When the outer decision sizes blocks for a chain (shorter than the round choice), gelato's
    inner rule, which scores rounds one at a time, must not draft past that size on confident
    tokens: the chain was priced, and chosen, for it. Rounds one at a time keep K_max as the cap."""
    for name in ("lyapunov", "gelato"):
        p = parse_policy(name, PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
        for _ in range(40):
            p.observe(replace(tele(6, 4), entropies=(0.01,) * 6))  # calibrated: p(accept | 0.01 nats) high
        p.ahead_blocks = 2  # as `pipelined_generate` sets it
        k_round = choose_k_ref(p.controller.objective(), 8)[0]
        d = p.decide(8)
        assert d.k_ref < k_round and d.k_max == d.k_ref  # a chain's block, capped at its size
        gate = p.gate(d)
        drafted = 0
        while drafted < d.k_max:  # as `Drafter.draft` asks the gate after each token
            drafted += 1
            if gate is not None and gate(drafted, 0.01, None):
                break
        assert drafted == d.k_ref, name
        p.ahead_blocks = None  # the generation is over: rounds one at a time again
        lone = p.decide(8)
        assert lone.k_ref == k_round and lone.k_max == (8 if name == "gelato" else k_round)


def test_gelato_explores_after_idle_rounds() -> None:
    p = parse_policy("gelato", PolicyOptions(explore_every_rounds=4, explore_k=3))
    for _ in range(40):
        p.observe(tele(6, 0))
    ks = []
    for _ in range(8):
        ks.append(p.decide(32).k_ref)
        assert p.decide(32).k_ref == ks[-1]  # deciding again (a round lost to a failover) decides the same
        p.observe(tele(ks[-1], 0))
    assert ks == [0, 0, 0, 3, 0, 0, 0, 3]


def test_exploring_rounds_say_why_and_a_remeasuring_block_is_drafted_whole() -> None:
    """The periodic block after rounds at K = 0 re-measures acceptance and drafting costs: gelato's
    per-token rule, whose estimates say drafting does not pay, would cut it to a draft or two, so
    it is drafted whole (cap = K_ref, no early stop). Before enough drafts were verified, a round
    the estimates would leave empty drafts as "evidence" and keeps the per-token rule."""
    p = parse_policy("gelato", PolicyOptions(explore_every_rounds=4, explore_k=3))
    for _ in range(40):
        p.observe(tele(6, 0))
    seen = []
    for _ in range(4):
        d = p.decide(32)
        seen.append((d.k_ref, d.k_max, d.explore))
        gate = p.gate(d)
        if d.k_ref:
            assert all(gate(i, 9.0, None) is None for i in range(1, 4))  # 9 nats: no stop all the same
        p.observe(tele(d.k_ref, 0))
    assert seen == [(0, 0, ""), (0, 0, ""), (0, 0, ""), (3, 3, "remeasure")]
    fresh = parse_policy("gelato", PolicyOptions(budget_j_per_token=0.9 * _synthetic_round(0, 0).e_j, k_max=8))
    fresh.observe(_synthetic_round(3, 0))  # one rejected block: 1 draft verified
    assert fresh.controller.queue is not None
    fresh.controller.queue.q_j = 0.5  # a backlog: K = 0 is the cheapest K by α̂
    d = fresh.decide(8)
    assert d.explore == "evidence" and d.k_ref >= 1 and d.k_max == 8
    assert isinstance(fresh.gate(d), _Continuation)


def _synthetic_round(k: int, accepted: int) -> Telemetry:
    """A phone-like round: 4 ms to start a block and 1 ms a draft at 2.5 W, 3 ms edge and 20 ms
    transport at 0.5 W idle (the live pair's shape: a block's first forward is the dear one)."""
    t_draft = (0.004 + 0.001 * k) if k else 0.0
    t_wait = 0.003 + 0.020
    e_draft, e_wait = 2.5 * t_draft, 0.5 * t_wait
    return Telemetry(
        0, k, accepted, accepted + 1, t_draft + t_wait, t_draft, 0.020, 0.0, 0.003,
        e_draft + e_wait, 0.0, e_draft + e_wait, 20, 30, "x", "estimated",
        e_draft_j=e_draft, t_drafting_s=t_draft,
    )  # fmt: skip


def _cold_start_run(name: str, options: PolicyOptions, rounds: int = 80) -> tuple[int, float, float]:
    """(rounds that drafted nothing, J/token, α̂ at the end) of a policy whose first four blocks were all rejected
    although the drafter agrees with the target 85 % of the time: bad luck at the start."""
    p = parse_policy(name, options)
    rng = __import__("random").Random(1)
    idle, energy_j, tokens = 0, 0.0, 0
    for r in range(rounds):
        d = p.decide(8)
        gate = p.gate(d)
        k = d.k_max if gate else d.k_ref
        if gate:  # entropy 0.5 nats for every draft; the rule may end the block early
            k = next((i for i in range(1, d.k_max + 1) if gate(i, 0.5, None) is not None), d.k_max)
        accepted = 0 if r < 4 else next((i for i in range(k) if rng.random() >= 0.85), k)
        t = _synthetic_round(k, accepted)
        p.observe(t)
        idle, energy_j, tokens = idle + (k == 0), energy_j + t.e_j, tokens + t.emitted
    return idle, energy_j / tokens, p.controller.cost.accept.value


@pytest.mark.parametrize("name", ["lyapunov", "gelato"])
def test_a_rejected_start_does_not_trap_the_controller_at_k0(name: str) -> None:
    """Four rejected blocks make α̂ low enough that drafting nothing (K = 0) looks cheapest per
    token, and K = 0 observes no acceptance to correct it. While fewer than `min_observed_drafts`
    drafts were verified the controller drafts all the same, learns α̂ ≈ 0.85 and keeps within
    the budget; without that rule it sits at K = 0 until its periodic exploration (15 of 80
    rounds, at 2.7× the time per token of the others: with a loose budget, in a short run, that
    is a few percent of the run's speed, within the noise of the drafts' random acceptance)."""
    budget = 0.9 * _synthetic_round(0, 0).e_j  # within reach of K ≈ 4 at α = 0.85, never of K = 0
    idle, j_per_token, alpha = _cold_start_run(name, PolicyOptions(budget_j_per_token=budget, k_max=8))
    assert idle == 0 and j_per_token < budget and alpha > 0.75, (idle, j_per_token, alpha)
    stuck, _, _ = _cold_start_run(name, PolicyOptions(budget_j_per_token=budget, k_max=8, min_observed_drafts=0))
    assert stuck >= 10


def test_a_drafter_that_never_agrees_still_settles_at_k0() -> None:
    """Enough rejections are evidence: drafting nothing wins in the end, marked as the estimates'
    own choice, not an exploration."""
    p = parse_policy("lyapunov")
    drafted = []
    for _ in range(60):
        d = p.decide(8)
        drafted.append(d.k_ref)
        p.observe(_synthetic_round(d.k_ref, 0))
    d = p.decide(8)
    assert d.k_ref == 0 and not d.explore
    assert drafted[-10:].count(0) >= 9


def test_the_calibrator_half_life_is_the_device_setting() -> None:
    """`--calibrator-halflife-tokens` reaches the controller's calibrator, and a shorter half-life
    follows a change of acceptance sooner: after 2000 drafts accepted at one entropy, 2000 rejected
    ones there move p̂ below the middle with a half-life of 500 drafts but not with 4000's."""
    args = device_parser().parse_args(["--prompt", "x", "--calibrator-halflife-tokens", "500"])
    options = DeviceConfig.from_args(args).controller
    assert options.calibrator_halflife_tokens == 500.0
    assert Controller(options).calibrator.halflife_tokens == 500.0
    assert Controller(PolicyOptions()).calibrator.halflife_tokens == 4000.0

    def after_a_change(halflife_tokens: float) -> float:
        cal = Controller(PolicyOptions(calibrator_halflife_tokens=halflife_tokens)).calibrator
        for _ in range(500):
            cal.observe_block([0.3] * 4, 4)  # 2000 drafts, all accepted
        for _ in range(2000):
            cal.observe_block([0.3], 0)  # 2000 first drafts rejected
        return cal.p_accept(0.3)

    assert after_a_change(500.0) < 0.1 < 0.4 < after_a_change(4000.0)
    with pytest.raises(ValueError, match="--calibrator-halflife-tokens must be > 0"):
        DeviceConfig.from_args(
            device_parser().parse_args(["--prompt", "x", "--calibrator-halflife-tokens", "0"])
        ).validate()


def test_gelatos_inner_rule_ends_a_block_at_an_uncertain_token() -> None:
    """gelato's per-token rule reads each draft's entropy through the trained calibrator: with
    confident (0.01-nat) drafts accepted and 5-nat ones rejected, a block goes on through confident
    tokens and ends with "entropy" at the first uncertain one, before K_ref; lyapunov, the same
    outer loop without the rule, drafts K_ref whatever the entropies."""
    for name in ("gelato", "lyapunov"):
        p = parse_policy(name)
        for i in range(60):
            if i % 2:
                p.observe(replace(tele(6, 6), entropies=(0.01,) * 6))
            else:  # the 5th draft, uncertain, rejected; the 6th never judged
                p.observe(replace(tele(6, 4), entropies=(0.01,) * 4 + (5.0, 5.0)))
        assert p.controller.calibrator.p_accept(0.01) > 0.95 > 0.2 > p.controller.calibrator.p_accept(5.0)
        d = p.decide(8)
        assert d.k_ref >= 4, d
        gate = p.gate(d)
        entropies = (0.01, 0.01, 5.0) + (0.01,) * 8
        drafted, reason = 0, None
        while drafted < d.k_max and reason is None:  # as `Drafter.draft` asks the gate after each token
            drafted += 1
            reason = gate(drafted, entropies[drafted - 1], None) if gate is not None else None
        if name == "gelato":
            assert (drafted, reason) == (3, "entropy")
            assert gate is not None and gate.p_accept[:2] == [p.controller.calibrator.p_accept(0.01)] * 2
        else:
            assert (drafted, reason) == (d.k_ref, None)
