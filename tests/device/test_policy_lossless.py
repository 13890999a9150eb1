"""Losslessness of the round loop under every policy and early exit, in process against a target
session: greedy token-exact (rounds one at a time, local pre-drafting, `ar-device`), sampling by
chi-square against the target's exact distribution; the drafter's stop rule, eos and window, and the
decision's view reaching every round's trace."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import chisquare

from gelato.controller import Decision
from gelato.controller.calibrator import EntropyCalibrator
from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant
from gelato.device.generate import Exchange, Limits, Verify, local_verifier, self_verifier, speculative_generate
from gelato.device.local_link import local_link
from gelato.device.pipeline import pipelined_generate
from gelato.device.policy import EntropyStop, Gate, PolicyOptions, parse_policy
from gelato.device.run import result_record
from gelato.edge.kv_pool import KVPool
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.power import open_meter, radio_profile
from gelato.sampling import process_logits
from gelato.types import DraftBlock, SamplingParams, Telemetry
from tests.conftest import target_greedy


def test_the_decision_reaches_the_trace(target: LoadedModel, drafter_model: LoadedModel) -> None:
    """The objective's view of each decision is in every round's telemetry, unpipelined and sent
    ahead alike."""
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples.")
    decision = Decision(2, 2, 0.0, 1.5, True, 0.0123, "evidence")
    for mode in ("off", "send-ahead"):
        policy = parse_policy("fixed-2", PolicyOptions(pipeline=mode))
        policy.decide = lambda limit: replace(decision, k_ref=min(2, limit), k_max=min(2, limit))  # type: ignore[method-assign]
        session = TargetSession("s", target, SamplingParams(), prompt)
        session.prefill()
        drafter, limits = Drafter(drafter_model, SamplingParams()), Limits(12, target.context_limit, 32, ())
        if mode == "off":
            res = asyncio.run(speculative_generate(drafter, local_verifier(session), policy, prompt, limits))
        else:
            res = asyncio.run(pipelined_generate(drafter, local_link(session, 2, 0.0), policy, prompt, limits))
        log = res.stats.rounds_log
        assert log and all(t.explore == "evidence" and t.over_budget and t.j_per_token_model == 0.0123 for t in log)


def test_drafter_refuses_a_q_support_the_edge_would_refuse(drafter_model: LoadedModel) -> None:
    """More than the wire's q support (1024) failed only at the first sampled block, INVALID_ARGUMENT."""
    from gelato.wire import MAX_Q_SUPPORT

    Drafter(drafter_model, SamplingParams(1.0), top_m=MAX_Q_SUPPORT)
    for bad in (0, MAX_Q_SUPPORT + 1):
        with pytest.raises(ValueError, match=r"top_m must be in \[1, 1024\]"):
            Drafter(drafter_model, SamplingParams(1.0), top_m=bad)


def test_drafter_stop_rule_and_eos(drafter_model: LoadedModel) -> None:
    d = Drafter(drafter_model, SamplingParams())
    d.start([5, 6, 7])
    seen: list[tuple[int, float]] = []

    def stop(i: int, h: float, q: object) -> str | None:
        seen.append((i, h))
        return "mine" if i == 3 else None

    block = d.draft(8, 0, stop)
    assert block.k == 3 and block.stop_reason == "mine" and [i for i, _ in seen] == [1, 2, 3]
    assert [h for _, h in seen] == list(block.entropies)
    d.start([5, 6, 7])
    first = d.draft(1, 0).ids[0]
    d.start([5, 6, 7])
    block = d.draft(8, 0, None, eos=[first])
    assert block.ids == (first,) and block.stop_reason == "eos"
    # A gate hears the eos draft too: every draft's p̂ is in the trace (an eos draft once had none,
    # so `p_accept` was one short of `entropies` in every block that ended on eos).
    d.start([5, 6, 7])
    gate = Gate(EntropyCalibrator())
    block = d.draft(8, 0, gate, eos=[first])
    assert block.stop_reason == "eos" and len(gate.p_accept) == len(block.entropies) == 1


@pytest.mark.parametrize("name", ["heuristic", "entropy", "adaedl", "lyapunov", "gelato"])
def test_in_process_greedy_equals_fixed(target: LoadedModel, drafter_model: LoadedModel, name: str) -> None:
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")
    limits = Limits(40, target.context_limit, 32, target.eos_token_ids)

    def run(policy_name: str) -> tuple[list[int], int]:
        session = TargetSession("s", target, SamplingParams(), prompt)
        session.prefill()
        drafter = Drafter(drafter_model, SamplingParams())
        res = asyncio.run(
            speculative_generate(drafter, local_verifier(session), parse_policy(policy_name), prompt, limits)
        )
        assert sum(t.emitted for t in res.stats.rounds_log) == len(res.token_ids)  # delivered, not past eos
        return res.token_ids, sum(t.accepted for t in res.stats.rounds_log)

    tokens, accepted = run(name)
    assert tokens == run("fixed-0")[0] == target_greedy(target, prompt, len(tokens))
    assert accepted > 0  # it drafted, and drafts were taken: not the target's tokens by drafting none
    # At the run's own limit, not its length: a stop short of it shared by every policy would pass.
    assert tokens == target_greedy(target, prompt, limits.max_new_tokens)


def test_ar_device_is_the_drafters_own_greedy_output(drafter_model: LoadedModel) -> None:
    prompt = [5, 6, 7, 8]
    drafter = Drafter(drafter_model, SamplingParams())
    limits = Limits(30, drafter_model.context_limit, 30, ())
    policy = parse_policy("ar-device")
    res = asyncio.run(speculative_generate(drafter, self_verifier(drafter), policy, prompt, limits))
    ref = drafter_model.model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert res.token_ids == ref[0, len(prompt) :].tolist()
    # Nothing checked its drafts: no acceptance rate in its record (it read (k - 1) / k).
    record = result_record("p", res, drafter_model, policy)
    assert res.stats.drafted > 0 and record["acceptance_rate"] is None


def test_ar_device_is_charged_no_radio(drafter_model: LoadedModel) -> None:
    """`ar-device` sends and receives nothing, so its radio energy is 0: no tail either (it was
    charged one per generation, most of its J/token on lte)."""
    drafter = Drafter(drafter_model, SamplingParams())
    limits = Limits(10, drafter_model.context_limit, 10, ())
    acct = EnergyAccountant(open_meter("cpu-model", "phone"), radio_profile("lte"))
    res = asyncio.run(
        speculative_generate(drafter, self_verifier(drafter), parse_policy("ar-device"), [5, 6, 7], limits, acct, None)
    )
    assert (res.stats.bytes_up, res.stats.bytes_down, res.stats.radio_j) == (0, 0, 0.0)
    assert 0 < res.stats.energy_j < radio_profile("lte").tail_energy_j()


class _SecondTokenOn(Gate):
    # The random drafter's top-3 distributions are nearly uniform, so are the top 2 of them, and
    # the first draft's entropy is the same for every sample (same prefix): judging from the
    # second draft on, a threshold just under the entropy of a uniform q (ln 3, or ln 2 for q
    # truncated to 2 candidates) ends a good share of blocks early, depending on what was drafted.
    def __init__(self, calibrator: EntropyCalibrator, max_entropy: float) -> None:
        super().__init__(calibrator)
        self.max_entropy = max_entropy

    def stop(self, drafted: int, entropy: float) -> str | None:
        return "entropy" if drafted >= 2 and entropy > self.max_entropy else None


class SecondTokenOn(EntropyStop):
    max_entropy = 1.0982  # just under ln 3

    def gate(self, decision: Decision) -> Gate:
        return _SecondTokenOn(self.controller.calibrator, self.max_entropy)


def exact_distribution(target: LoadedModel, prompt: list[int], params: SamplingParams, n: int) -> dict:
    """P(first n tokens) of the target's own sampling, by enumerating its (top-k) support."""
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, p in dist.items():
            with torch.inference_mode():
                logits = target.model(torch.tensor([prompt + list(seq)])).logits[0, -1, : target.vocab_size]
            probs = process_logits(logits, params)
            for tok in torch.nonzero(probs).flatten().tolist():
                nxt[(*seq, tok)] = p * float(probs[tok])
        dist = nxt
    total = sum(dist.values())  # 1 up to float32 rounding of the probabilities
    return {seq: p / total for seq, p in dist.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pipeline", "top_m", "drafter_name", "accept_all"),
    [
        ("off", 8, "agree", False),
        ("local", 8, "agree", False),
        ("send-ahead", 8, "agree", False),
        ("off", 2, "agree", False),
        ("local", 2, "agree", False),
        ("send-ahead", 2, "agree", False),
        ("off", 8, "never", False),
        ("send-ahead", 2, "agree", True),  # the power check: a wrong acceptance is seen
    ],
)
def test_sampling_with_early_exit_follows_the_target(
    pair: dict[str, Path],
    target: LoadedModel,
    drafter_model: LoadedModel,
    pipeline: str,
    top_m: int,
    drafter_name: str,
    accept_all: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """4 tokens per generation (5 sending ahead), drafts cut by an entropy rule, with and without
    pre-drafting during the verdict: the joint distribution of the output equals the target's
    (chi-square), and the early exit (and, pipelined, pre-draft hits) really happened. Sending
    ahead, a first block cut early leaves room for one more with a draft: a chain goes on only
    where a drafted block fits (of 4 tokens, one after 2 drafts would leave none). With
    `top_m` 2 the drafter keeps 2 of top-k's 3 candidates: drafts and their q come from the
    truncated distribution, which the edge's acceptance must correct. The agreeing drafter's q is
    close to the target's p (a wrong acceptance rule would hardly show): with `drafter_never`
    (the target's rows rotated by one token) q's candidates are other tokens than p's, most
    drafts are rejected and every emitted token comes from the residual or the bonus. Pipelined
    with `top_m` 2, blocks are carried or sent ahead (hits) while q is not p: a pre-drafted or
    sent-ahead draft accepted without the test against p, or checked against the wrong q, would
    over-weight q's two candidates. `accept_all` is that wrong edge (every draft accepted without
    the test against p): the same samples must show it (p < 1e-6), or the test could not fail."""
    if accept_all:

        def accepts_every_draft(p: torch.Tensor, ids: tuple[int, ...], *args: Any, **kwargs: Any) -> tuple[int, int]:
            return len(ids), int(torch.multinomial(p[len(ids)].float().cpu(), 1))

        monkeypatch.setattr("gelato.edge.sessions.verify_sampling", accepts_every_draft)
    if drafter_name == "never":
        drafter_model = load_model(str(pair["drafter_never"]), "drafter", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, "Tom has 3 apples")
    n, samples = (5 if pipeline == "send-ahead" else 4), 3000
    base = SamplingParams(temperature=1.0, top_k=3)
    exact = exact_distribution(target, prompt, base, n)
    pool = KVPool(target.model, target.vocab_size, slots=1, context=64, max_context=target.context_limit)
    policy = SecondTokenOn(PolicyOptions(pipeline=pipeline))
    policy.max_entropy = {8: 1.0982, 2: 0.6927}[top_m]  # just under ln 3, ln 2: see `_SecondTokenOn`
    limits = Limits(n, target.context_limit, 32, ())
    counts: Counter[tuple[int, ...]] = Counter()
    reasons: Counter[str] = Counter()
    hits = rejected = 0
    for seed in range(samples):
        params = SamplingParams(temperature=1.0, top_k=3, seed=seed)
        session = TargetSession("s", target, params, prompt, pool=pool)
        session.prefill()
        verify_now = local_verifier(session)

        async def verify(block: DraftBlock, verify_now: Verify = verify_now) -> Exchange:
            await asyncio.sleep(0)  # "in flight": a pre-draft runs now
            return await verify_now(block)

        drafter = Drafter(drafter_model, params, top_m=top_m)
        if pipeline == "send-ahead":  # the edge's rule in process: blocks answered in order, later
            link = local_link(session, max_ahead=2, delay_s=0.0)
            res = asyncio.run(pipelined_generate(drafter, link, policy, prompt, limits))
        else:
            res = asyncio.run(speculative_generate(drafter, verify, policy, prompt, limits))
        session.close()
        counts[tuple(res.token_ids)] += 1
        reasons.update(t.stop_reason for t in res.stats.rounds_log if t.k > 0)
        hits += sum(t.predraft_hit for t in res.stats.rounds_log)
        rejected += sum(t.accepted < t.k for t in res.stats.rounds_log)
    assert reasons["entropy"] > samples / 10 and reasons["cap"] > samples / 10, reasons
    assert (hits > samples / 20) if pipeline != "off" else hits == 0
    if drafter_name == "never":  # the residual was really exercised
        assert rejected > samples, rejected
    cells = sorted(exact, key=lambda s: -exact[s])
    big = [c for c in cells if exact[c] * samples >= 5]
    observed = [counts[c] for c in big] + [samples - sum(counts[c] for c in big)]
    expected = [exact[c] * samples for c in big] + [samples * (1 - sum(exact[c] for c in big))]
    if expected[-1] < 5:  # fold a tiny remainder into the last big cell
        rest_o, rest_e = observed.pop(), expected.pop()
        observed[-1] += rest_o
        expected[-1] += rest_e
    assert sum(counts.values()) == samples and set(counts) <= set(exact)
    p = chisquare(observed, expected).pvalue
    if accept_all:
        assert p < 1e-6, (p, observed, [round(e, 1) for e in expected])
    else:
        assert p > 1e-3, (p, observed, [round(e, 1) for e in expected])


def test_pre_drafts_stay_within_the_drafters_window(target: LoadedModel) -> None:
    """With local pre-drafting (forced hits: the drafter is the target), neither a block's drafts
    nor a pre-draft reach the drafter's window (`Limits.draft_context`); past it the rounds draft
    nothing, and the output is the unlimited run's."""
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")
    window = len(prompt) + 11

    def run(draft_context: int) -> tuple[list[int], list[Telemetry]]:
        session = TargetSession("s", target, SamplingParams(), prompt)
        session.prefill()
        policy = parse_policy("fixed-4", PolicyOptions(pipeline="local", k_max=4))
        limits = Limits(40, target.context_limit, 32, target.eos_token_ids, draft_context)
        verify_now = local_verifier(session)

        async def verify(block: DraftBlock) -> Exchange:
            await asyncio.sleep(0)  # "in flight": the pre-draft task runs now
            return await verify_now(block)

        res = asyncio.run(speculative_generate(Drafter(target, SamplingParams()), verify, policy, prompt, limits))
        return res.token_ids, res.stats.rounds_log

    want, _ = run(0)
    got, log = run(window)
    assert got == want and len(got) == 40
    length = len(prompt)
    for t in log:  # drafts at length .. length + k - 1, the pre-draft from length + k on
        assert t.k == 0 or length + t.k <= window, (length, t.k)
        assert t.predrafted == 0 or length + t.k + t.predrafted <= window, (length, t.k, t.predrafted)
        length += t.emitted
    assert sum(t.predrafted for t in log) > 0 and log[-1].k == 0


@pytest.mark.parametrize("max_new", [5, 10, 11])
def test_pre_drafts_stop_where_the_generation_does(target: LoadedModel, max_new: int) -> None:
    """Local pre-drafting (forced hits) never drafts past `max_new_tokens`: a pre-draft ends where
    the next block's drafts must, and a round whose tokens end the generation pre-drafts
    nothing (it pre-drafted a whole block, drafter energy for nothing); the output is the
    unpipelined run's."""
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")

    def run(pipeline: str) -> tuple[list[int], list[Telemetry]]:
        session = TargetSession("s", target, SamplingParams(), prompt)
        session.prefill()
        policy = parse_policy("fixed-4", PolicyOptions(pipeline=pipeline, k_max=4))
        verify_now = local_verifier(session)

        async def verify(block: DraftBlock) -> Exchange:
            await asyncio.sleep(0)  # "in flight": the pre-draft task runs now
            return await verify_now(block)

        limits = Limits(max_new, target.context_limit, 32, ())
        res = asyncio.run(speculative_generate(Drafter(target, SamplingParams()), verify, policy, prompt, limits))
        return res.token_ids, res.stats.rounds_log

    want, _ = run("off")
    got, log = run("local")
    assert got == want and len(got) == max_new
    out = 0
    for t in log:  # the guess (the round's target token) + the next block's drafts, within max_new
        assert t.predrafted == 0 or out + t.k + t.predrafted < max_new, (out, t.k, t.predrafted)
        out += t.emitted
    assert log[-1].predrafted == 0
    assert sum(t.predrafted for t in log) > 0 or max_new <= 5


def test_a_prompt_that_fills_the_drafters_window_is_not_prefilled(target: LoadedModel) -> None:
    """A drafter whose window the prompt already fills can draft nothing: `Drafter.start` runs no
    forward for it (no KV, no time, no energy on the device), the generation runs at K = 0 and
    is the target's own; a prompt one token shorter is prefilled as before."""
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")
    small = replace(target, context_limit=len(prompt))  # the same weights, a window the prompt fills
    d = Drafter(small, SamplingParams())
    d.start(prompt)
    assert d.seq.cached == 0
    session = TargetSession("s", target, SamplingParams(), prompt)
    session.prefill()
    policy = parse_policy("fixed-4", PolicyOptions(k_max=4))
    limits = Limits(12, target.context_limit, 32, (), small.context_limit)
    res = asyncio.run(speculative_generate(d, local_verifier(session), policy, prompt, limits))
    assert all(t.k == 0 for t in res.stats.rounds_log) and d.seq.cached == 0
    ref = target.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert res.token_ids == ref[0, len(prompt) :].tolist()
    roomy = Drafter(replace(target, context_limit=len(prompt) + 1), SamplingParams())
    roomy.start(prompt)
    assert roomy.seq.cached == len(prompt) - 1


@pytest.mark.parametrize("name", ["fixed-4", "gelato"])
@pytest.mark.parametrize("drafter_key", ["target", "drafter_never", "drafter_agree"])
def test_pipelined_greedy_is_exact(pair: dict[str, Path], target: LoadedModel, name: str, drafter_key: str) -> None:
    """Pre-drafting while the verdict is in flight changes nothing in the output: forced hits
    (the drafter is the target itself), forced misses (a drafter that never agrees) and a mix.
    In process the verify waits before it answers, so the pre-draft runs to its full depth before
    the verdict (the worst case for its bookkeeping). For gelato the wait is 20 ms, a round trip
    long enough that pre-drafting pays even when a loaded machine slows the drafter (the decision
    is priced from measured times; with an instant verify it said no on a busy CI host)."""
    dm = target if drafter_key == "target" else load_model(str(pair[drafter_key]), "drafter", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")
    limits = Limits(60, target.context_limit, 32, target.eos_token_ids)

    def run(pipeline: str) -> tuple[list[int], list[Telemetry]]:
        session = TargetSession("s", target, SamplingParams(), prompt)
        session.prefill()
        policy = parse_policy(name, PolicyOptions(pipeline=pipeline, k_max=6))
        verify_now = local_verifier(session)

        async def verify(block: DraftBlock) -> Exchange:
            await asyncio.sleep(0.02 if name == "gelato" else 0)  # "in flight": the pre-draft task runs now
            return await verify_now(block)

        res = asyncio.run(speculative_generate(Drafter(dm, SamplingParams()), verify, policy, prompt, limits))
        return res.token_ids, res.stats.rounds_log

    plain, _ = run("off")
    piped, log = run("local")
    assert piped == plain
    assert plain == target_greedy(target, prompt, limits.max_new_tokens)  # the target's own, to the limit
    hits = sum(t.predraft_hit for t in log)
    if drafter_key == "target":
        assert hits >= len(log) // 2 and sum(t.carried for t in log) > 0
    if drafter_key == "drafter_never":
        assert hits == 0 and all(t.carried == 0 for t in log)
