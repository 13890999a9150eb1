"""The guess check: after a fully accepted block that nothing was drafted past, the next block's
first forward reads the drafter's own guess of that block's target token off the row it computes
anyway (`Drafter._forward_checking_guess`), so the controller's guess-match rate, which prices
pre-drafting and send-ahead chains, is measured also while the controller does not pipeline:
learnt only from the blocks it pipelined, a low rate kept it from pipelining and was never
corrected."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest

from gelato.device.drafter import Drafter
from gelato.device.generate import Limits, local_verifier, speculative_generate
from gelato.device.local_link import local_link
from gelato.device.pipeline import pipelined_generate
from gelato.device.policy import FixedK, PolicyOptions, parse_policy
from gelato.edge.sessions import TargetSession
from gelato.kv import KVSequence
from gelato.models import LoadedModel, encode_prompt
from gelato.types import DraftBlock, SamplingParams, Telemetry, Verdict
from tests.conftest import target_greedy
from tests.device.test_policy import _synthetic_round

SAMPLED = SamplingParams(temperature=1.0, seed=11)


def _prompt(model: LoadedModel) -> list[int]:
    return encode_prompt(model.tokenizer, "Ava has 12 apples and Ben gives her 3 more. How many?")


def _own_greedy(model: LoadedModel, tokens: list[int]) -> int:
    """The drafter's greedy pick after `tokens`, from a fresh forward over all of them."""
    return int(KVSequence(model.model, model.vocab_size, tokens).forward()[-1].argmax())


def _other(token: int, model: LoadedModel) -> int:
    return (token + 1) % model.vocab_size


def _next_block(d: Drafter, block: DraftBlock, verdict: Verdict, settle: bool = False) -> DraftBlock:
    if settle:
        d.settle(block, verdict, None)
    else:
        d.apply(block, verdict)
    return d.draft(3, block.round + 1)


def test_a_fully_accepted_blocks_guess_is_checked_in_the_next_forward(drafter_model: LoadedModel) -> None:
    """Greedy: the check is the drafter's own argmax at the target's token; a wrong target token
    reads as a miss; a partial accept, an empty block or a drafter told not to check report
    nothing; the next block's drafts are those of a drafter that does not check."""
    prompt = _prompt(drafter_model)
    for settle in (False, True):
        d = Drafter(drafter_model, SamplingParams())
        d.start(prompt, check_guesses=True)
        block = d.draft(3, 0)
        assert block.bonus_guess_hit is None  # nothing before the first block
        own = _own_greedy(drafter_model, prompt + list(block.ids))
        nxt = _next_block(d, block, Verdict(0, 3, own), settle)
        assert nxt.bonus_guess_hit is True
        plain = Drafter(drafter_model, SamplingParams())
        plain.start(prompt)
        first = plain.draft(3, 0)
        unchecked = _next_block(plain, first, Verdict(0, 3, own), settle)
        assert unchecked.bonus_guess_hit is None
        assert (unchecked.ids, unchecked.entropies) == (nxt.ids, nxt.entropies)
        wrong = _other(_own_greedy(drafter_model, prompt + list(block.ids) + [own] + list(nxt.ids)), drafter_model)
        assert _next_block(d, nxt, Verdict(1, 3, wrong), settle).bonus_guess_hit is False
    d = Drafter(drafter_model, SamplingParams())
    d.start(prompt, check_guesses=True)
    block = d.draft(3, 0)
    block = _next_block(d, block, Verdict(0, 2, 5))
    assert block.bonus_guess_hit is None  # not fully accepted
    # A block of K = 0 next drafts nothing and checks nothing; the check is not left for later.
    d.apply(block, Verdict(1, 3, 7))
    empty = d.draft(0, 2)
    assert empty.bonus_guess_hit is None
    d.apply(empty, Verdict(2, 0, 9))
    assert d.draft(3, 3).bonus_guess_hit is None


def test_a_sampled_guess_check_draws_what_a_pre_draft_draws(drafter_model: LoadedModel) -> None:
    """Sampling: the check's guess is the keyed draw a pre-draft makes at that position, so the
    target token a pre-draft would have guessed is a hit and any other a miss."""
    prompt = _prompt(drafter_model)
    for seed in range(4):
        params = replace(SAMPLED, seed=seed)
        twin = Drafter(drafter_model, params)
        twin.start(prompt)
        tb = twin.draft(3, 0)
        twin.predraft(tb, 1, threading.Event())
        pre = twin.last_predraft
        assert pre is not None and len(pre.ids) == 1
        for target_token, want in ((pre.ids[0], True), (_other(pre.ids[0], drafter_model), False)):
            d = Drafter(drafter_model, params)
            d.start(prompt, check_guesses=True)
            block = d.draft(3, 0)
            assert block.ids == tb.ids
            nxt = _next_block(d, block, Verdict(0, 3, target_token))
            assert nxt.bonus_guess_hit is want
            plain = Drafter(drafter_model, params)  # the same block without the check: the same draws
            plain.start(prompt)
            same = _next_block(plain, plain.draft(3, 0), Verdict(0, 3, target_token))
            assert (same.ids, same.q, same.entropies) == (nxt.ids, nxt.q, nxt.entropies)


def test_a_block_drafted_past_is_not_checked_again(drafter_model: LoadedModel) -> None:
    """A pre-draft or a block sent ahead guessed the target's token already (and is counted as
    such): the block after it reports no check, so no guess is counted twice."""
    prompt = _prompt(drafter_model)
    d = Drafter(drafter_model, SamplingParams())
    d.start(prompt, check_guesses=True)
    block = d.draft(3, 0)
    d.predraft(block, 1, threading.Event())
    guess = d.last_predraft.ids[0] if d.last_predraft else -1
    assert _next_block(d, block, Verdict(0, 3, _other(guess, drafter_model))).bonus_guess_hit is None
    d.start(prompt, check_guesses=True)  # a hit that carries pre-drafted tokens into the next block
    block = d.draft(3, 0)
    d.predraft(block, 3, threading.Event())
    pre = d.last_predraft
    assert pre is not None and len(pre.ids) == 3
    d.apply(block, Verdict(0, 3, pre.ids[0]))
    carried = d.draft(4, 1)
    assert carried.carried == 2 and carried.bonus_guess_hit is None
    d.start(prompt, check_guesses=True)
    block = d.draft(3, 0)
    ahead = d.draft_after(block, 2, 1)
    assert ahead.guess is not None
    d.settle(block, Verdict(0, 3, _other(ahead.guess, drafter_model)), None)  # dropped unsent
    assert d.draft(3, 2).bonus_guess_hit is None


class _NoPredraft(FixedK):
    """Pipelining on, but nothing is ever drafted past a block: every full accept is checked."""

    def predraft_depth(self, decision, block, fits=None):  # type: ignore[no-untyped-def]
        return 0

    def send_ahead(self, decision, p_chain, first=False):  # type: ignore[no-untyped-def]
        return False


@pytest.mark.parametrize("pipeline", ["off", "local", "send-ahead"])
def test_the_round_loop_reports_the_check_and_the_controller_learns_from_it(target: LoadedModel, pipeline: str) -> None:
    """Through the round loops (`speculative_generate`; `pipelined_generate` for send-ahead), the
    drafter being the target (every block fully accepted, every guess right): with pipelining
    each round after a drafted one carries a hit, and the controller's guess-match rate climbs
    from its prior; without pipelining nothing is checked and the rate stays where it was. The
    output is the target's own either way."""
    prompt = _prompt(target)
    session = TargetSession("s", target, SamplingParams(), prompt)
    session.prefill()
    policy = _NoPredraft(4, PolicyOptions(pipeline=pipeline, k_max=4))
    prior = policy.controller.bonus_match.value
    limits = Limits(30, target.context_limit, 32, ())
    drafter = Drafter(target, SamplingParams())
    if pipeline == "send-ahead":
        coro = pipelined_generate(drafter, local_link(session, max_ahead=2), policy, prompt, limits)
    else:
        coro = speculative_generate(drafter, local_verifier(session), policy, prompt, limits)
    res = asyncio.run(coro)
    assert res.token_ids == target_greedy(target, prompt, 30)
    log = res.stats.rounds_log
    assert all(t.accepted == t.k for t in log) and sum(t.predrafted for t in log) == 0
    checks = [t.bonus_guess_hit for t in log]
    if pipeline == "off":
        assert checks == [None] * len(log) and policy.controller.bonus_match.value == prior
    else:
        assert checks[0] is None and all(c is True for c, t in zip(checks[1:], log[1:], strict=True) if t.k)
        assert sum(c is True for c in checks) >= len(log) - 2
        assert policy.controller.bonus_match.value > 0.8 > prior


def _round(k: int, accepted: int, **fields: object) -> Telemetry:
    return replace(_synthetic_round(k, accepted), entropies=(0.3,) * k, **fields)  # type: ignore[arg-type]


def test_pre_drafting_priced_out_by_unlucky_guesses_comes_back() -> None:
    """With a budget, ten wrong guesses in a row make pre-drafting look like energy for nothing;
    the controller stops pre-drafting, and from then on only the guess check observes guesses.
    Rounds whose checks hit bring pre-drafting back; the same rounds unchecked (what the
    controller saw before the check existed) leave it off for good."""

    def run(checked: bool) -> tuple[int, int, float]:
        p = parse_policy("lyapunov", PolicyOptions(pipeline="local", budget_j_per_token=0.006, k_max=8))
        block = DraftBlock(0, (1,) * 8, entropies=(0.3,) * 8)  # a next block of 8 keeps 8 pre-drafts
        for _ in range(40):
            p.decide(8)
            p.observe(_round(4, 4))
        for _ in range(10):
            p.decide(8)
            p.observe(_round(4, 4, predrafted=5, predraft_hit=False))
        off = p.predraft_depth(p.decide(8), block)
        for _ in range(30):
            p.decide(8)
            p.observe(_round(4, 4, bonus_guess_hit=True if checked else None))
        return off, p.predraft_depth(p.decide(8), block), p.controller.bonus_match.value

    off, back, rate = run(True)
    assert off == 0 and back > 0 and rate > 0.8, (off, back, rate)
    off, stays, rate = run(False)
    assert off == 0 and stays == 0 and rate < 0.2, (off, stays, rate)
