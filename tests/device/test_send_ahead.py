"""Send-ahead speculation in process: the chain loop (`gelato.device.pipeline`) against a real target
session answering in order with a delay, as the edge's stream does. The output must be exactly
the unpipelined one (greedy and sampled with the same seed: draws are keyed by token position),
with forced hits (drafter = target), forced misses (a drafter that never agrees) and a mix; the
edge's rule (`TargetSession.resolve_ahead`) refuses duplicate and too-deep blocks precisely. Chains as
they run (drafting on a thread, near the end, guess-only blocks) are in test_send_ahead_chains.py, edge
and stream failures in test_send_ahead_errors.py; the shared helpers in send_ahead_helpers.py."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from gelato.controller import Decision
from gelato.device.drafter import Drafter
from gelato.device.generate import Limits
from gelato.device.local_link import local_link
from gelato.device.pipeline import _Chain, _CutRule, _Sent, pipelined_generate
from gelato.device.policy import PolicyOptions, parse_policy
from gelato.device.run import pipeline_record
from gelato.edge.sessions import StatusError, TargetSession
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.types import DraftBlock, SamplingParams, Verdict
from tests.conftest import target_greedy
from tests.device.send_ahead_helpers import GREEDY, PROMPT, Scripted, run


@pytest.mark.parametrize("name", ["fixed-4", "gelato", "fixed-0", "scripted"])
@pytest.mark.parametrize("drafter_key", ["target", "drafter_never", "drafter_agree"])
def test_send_ahead_greedy_is_exact(pair: dict[str, Path], target: LoadedModel, name: str, drafter_key: str) -> None:
    dm = target if drafter_key == "target" else load_model(str(pair[drafter_key]), "drafter", "float32", "cpu")
    plain, _ = run(target, dm, name, "off")
    piped, _ = run(target, dm, name, "send-ahead")
    reference = target_greedy(target, encode_prompt(target.tokenizer, PROMPT), len(plain.token_ids))
    assert piped.token_ids == plain.token_ids == reference
    assert piped.stats.stop_reason == plain.stats.stop_reason
    # The reference at the run's own limit (60), not at the run's length: a stop short of it
    # shared by both loops would otherwise pass.
    assert reference == target_greedy(target, encode_prompt(target.tokenizer, PROMPT), 60)
    log = piped.stats.rounds_log
    ahead = [t for t in log if t.sent_ahead]
    if drafter_key == "drafter_agree" and name in ("fixed-4", "gelato"):  # a mix: some chains hit
        assert any(t.k > 0 for t in ahead) and sum(t.stale_blocks for t in log) > 0
    assert sum(t.emitted for t in log) == len(piped.token_ids)
    # The objective's view reaches the trace of rounds sent ahead too (controller policies only).
    assert all(math.isfinite(t.j_per_token_model) == (name == "gelato") for t in log)
    if drafter_key == "target":  # forced hits: the chain goes on, most rounds were sent ahead
        assert len(ahead) >= len(log) // 2, [(t.k, t.sent_ahead) for t in log]
        assert sum(t.stale_blocks for t in log) == 0
    if drafter_key == "drafter_never" and name == "fixed-4":  # forced misses: every guessed block is cut
        # Nothing went ahead: not even an empty block near the end (`fixed-4` never drafts 0).
        assert not ahead, [(t.k, t.sent_ahead) for t in log]
        assert sum(t.stale_blocks for t in log) > 0
        assert sum(t.wasted_tokens for t in log) >= 2 * sum(t.stale_blocks for t in log)  # guess + drafts
        assert all((t.wasted_j > 0) == (t.wasted_tokens > 0) for t in log)  # priced whenever drafts were wasted
        # The cut blocks' stale verdicts come back later: their bytes ride on a later round, named
        # there (so the radio fit can leave that round out), on top of its own verdict's bytes.
        assert sum(t.stale_bytes_down for t in log) > 0
        assert all(t.bytes_down > t.stale_bytes_down for t in log)
    if name == "fixed-0":  # empty blocks: every one after the first goes ahead and is verified
        assert len(ahead) == len(log) - 1 and sum(t.stale_blocks for t in log) == 0
        assert all(t.predrafted == 0 == t.wasted_tokens for t in log)
    if name == "scripted":  # both kinds went ahead (guessed ones only where the guesses can hit)
        kinds = {t.k > 0 for t in ahead} | ({True} if drafter_key == "drafter_never" else set())
        assert kinds == {False, True} and any(t.k > 0 for t in log), [(t.k, t.sent_ahead) for t in log]


def test_stale_blocks_are_counted_by_kind_and_hits_only_where_drafted(
    target: LoadedModel, drafter_model: LoadedModel
) -> None:
    """A miss cuts the blocks in flight behind it, empty ones among them (the scripted policy turns
    to K = 0 after drafted blocks): each kind is counted as what it is, by the edge's own answers
    (an empty block cut stale was counted as a block with drafts, and never in `sent_empty`); and a
    round whose successor was an empty block is no pre-draft hit (nothing was pre-drafted)."""
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    link = local_link(session, max_ahead=4, delay_s=0.02)
    sent: list[DraftBlock] = []
    stale: list[bool] = []
    send, receive = link.send, link.receive

    async def send_logged(block: DraftBlock) -> int:
        sent.append(block)
        return await send(block)

    async def receive_logged() -> tuple[Verdict, int]:
        verdict, down = await receive()
        stale.append(verdict.stale)
        return verdict, down

    link = replace(link, send=send_logged, receive=receive_logged)
    policy = Scripted(PolicyOptions(pipeline="send-ahead", k_max=6, ahead_blocks=3))
    limits = Limits(80, target.context_limit, 32, target.eos_token_ids)
    res = asyncio.run(pipelined_generate(Drafter(drafter_model, GREEDY, top_m=8), link, policy, prompt, limits))
    answered = list(zip(sent, stale, strict=False))  # one ordered stream: the i-th answer is the i-th block's
    cut_empty = sum(b.follow for b, s in answered if s)
    cut_drafted = sum(not b.follow for b, s in answered if s)
    assert cut_empty > 0 and cut_drafted > 0, (cut_empty, cut_drafted)  # both kinds were cut here
    log = res.stats.rounds_log
    counted_empty, counted_drafted = sum(t.stale_empty for t in log), sum(t.stale_blocks for t in log)
    # Cut blocks whose answers had not come when the generation ended are counted but not answered.
    unanswered = len(sent) - len(stale)
    assert cut_empty <= counted_empty and cut_drafted <= counted_drafted
    assert counted_empty + counted_drafted - cut_empty - cut_drafted <= unanswered
    record = pipeline_record(res.stats)
    assert record["predraft_hits"] <= record["predrafted_rounds"]
    assert all(t.predrafted > 0 for t in log if t.predraft_hit)
    assert record["sent_empty"] >= cut_empty + sum(t.follow and t.sent_ahead for t in log)


def test_the_policy_prices_the_links_depth_for_the_generation(target: LoadedModel) -> None:
    """While `pipelined_generate` runs, the policy's `ahead_blocks` is the link's `max_ahead`
    (what the edge granted, not what the option asked for); after it, None again."""
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    policy = parse_policy("gelato", PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    seen: list[int | None] = []
    limits = Limits(12, target.context_limit, 32, target.eos_token_ids)
    link = local_link(session, max_ahead=3, delay_s=0.0)
    coro = pipelined_generate(
        Drafter(target, GREEDY), link, policy, prompt, limits, on_round=lambda t: seen.append(policy.ahead_blocks)
    )
    asyncio.run(coro)
    assert seen and set(seen) == {3} and policy.ahead_blocks is None


@pytest.mark.parametrize("max_ahead", [1, 3])
def test_only_a_chains_start_counts_as_one(target: LoadedModel, max_ahead: int) -> None:
    """The per-block check is told `first` only where a chain could start: the awaited block sent
    fresh and alone in flight, not a block sent ahead that is alone again (always so with one block
    ahead). With the target as its own drafter every guess hits and the chain never breaks, so
    nearly every check continues a chain. What was learned is folded in or dropped by the end."""
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    policy = parse_policy("gelato", PolicyOptions(pipeline="send-ahead", ahead_blocks=max_ahead))
    calls: list[bool] = []
    check = policy.send_ahead

    def spy(decision: Decision, p_chain: float, first: bool = False) -> bool:
        calls.append(first)
        check(decision, p_chain, first)
        return True  # chains always go on: the flags are what is tested

    policy.send_ahead = spy  # type: ignore[method-assign]
    log: list[Any] = []
    limits = Limits(40, target.context_limit, 32, target.eos_token_ids)
    link = local_link(session, max_ahead=max_ahead, delay_s=0.02)
    asyncio.run(pipelined_generate(Drafter(target, GREEDY), link, policy, prompt, limits, on_round=log.append))
    fresh = sum(not t.sent_ahead for t in log)
    assert any(t.sent_ahead for t in log) and calls.count(False) > calls.count(True)
    assert 1 <= calls.count(True) <= fresh
    assert policy._follow_seen is None and policy.ahead_blocks is None  # nothing carried past the generation


@pytest.mark.parametrize("drafter_key", ["target", "drafter_agree"])
def test_send_ahead_sampling_draws_what_rounds_one_at_a_time_draw(
    pair: dict[str, Path], target: LoadedModel, drafter_key: str
) -> None:
    """Same seed, same tokens: the drafter's and the target's draws are keyed by position, so the
    chain drafts (and the edge accepts) exactly what unpipelined rounds would."""
    dm = target if drafter_key == "target" else load_model(str(pair[drafter_key]), "drafter", "float32", "cpu")
    hits = 0
    for seed in range(6):
        params = SamplingParams(temperature=1.0, top_k=5, seed=seed)
        plain, _ = run(target, dm, "fixed-3", "off", params, max_new=30)
        piped, _ = run(target, dm, "fixed-3", "send-ahead", params, max_new=30)
        assert piped.token_ids == plain.token_ids, seed
        hits += sum(t.sent_ahead for t in piped.stats.rounds_log)
    assert hits > 0


def test_a_position_drafted_again_after_a_cut_gets_a_fresh_draw(target: LoadedModel) -> None:
    """The drafter keys each draw by position AND the prefix it follows: a draft that was cut
    (here: rejected at the block's first token) still set where its block stopped, so the
    position's redraft must not reuse its uniform (`gelato.sampling`); the redraft follows the
    token that replaced the cut one, so its key differs."""
    from gelato.sampling import KeyedRng

    calls: list[tuple[int, tuple[int, ...]]] = []

    class Recording(KeyedRng):
        def uniform(self, position: int, purpose: str = "", prefix: Any = ()) -> float:
            calls.append((position, tuple(prefix)))
            return super().uniform(position, purpose, prefix)

    params = SamplingParams(temperature=1.0, seed=4)
    drafter = Drafter(target, params)
    drafter.rng = Recording(params.seed, "drafter")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    drafter.start(list(prompt))
    first = drafter.draft(3, 0)
    replaced = (first.ids[0] + 1) % target.vocab_size  # the edge's token in place of the first draft
    drafter.apply(first, Verdict(round=0, n_accepted=0, next_token=replaced))
    drafter.draft(3, 1)
    n = len(prompt)
    assert [c[0] for c in calls] == [n, n + 1, n + 2, n + 1, n + 2, n + 3]
    assert all(len(prefix) == pos and prefix[:n] == tuple(prompt) for pos, prefix in calls)  # every token before it
    assert calls[1][1] == (*prompt, first.ids[0]) and calls[3][1] == (*prompt, replaced)  # position n + 1 twice
    assert drafter.rng.uniform(n + 1, prefix=calls[1][1]) != drafter.rng.uniform(n + 1, prefix=calls[3][1])


def test_empty_blocks_ahead_sample_what_rounds_one_at_a_time_sample(target: LoadedModel) -> None:
    """K = 0 sent ahead: the edge draws each token with its position's key, as unpipelined."""
    for seed in range(3):
        params = SamplingParams(temperature=1.0, top_k=20, seed=seed)
        plain, _ = run(target, target, "fixed-0", "off", params, max_new=20)
        piped, _ = run(target, target, "fixed-0", "send-ahead", params, max_new=20)
        assert piped.token_ids == plain.token_ids, seed
        assert sum(t.sent_ahead for t in piped.stats.rounds_log) == len(piped.stats.rounds_log) - 1


def test_resolve_ahead_rules(target: LoadedModel) -> None:
    prompt = encode_prompt(target.tokenizer, PROMPT)
    s = TargetSession("s", target, SamplingParams(), prompt)
    s.prefill()
    first = DraftBlock(round=0, ids=())
    a, nxt = s.verify(first)  # an empty block is fully accepted: its token is the bonus
    assert (a, s.rounds, s.last_bonus) == (0, 1, nxt)
    hit = s.resolve_ahead(DraftBlock(round=1, ids=(5, 6), guess=nxt), 4)
    assert hit == DraftBlock(round=1, ids=(5, 6))
    assert s.resolve_ahead(DraftBlock(round=1, ids=(5,), guess=(nxt + 1) % target.vocab_size), 4) is None
    assert s.resolve_ahead(DraftBlock(round=3, ids=(5,), guess=nxt), 4) is None  # its parent was never verified
    with pytest.raises(StatusError) as dup:
        s.resolve_ahead(DraftBlock(round=0, ids=(5,), guess=nxt), 4)
    assert dup.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(StatusError) as deep:
        s.resolve_ahead(DraftBlock(round=5, ids=(5,), guess=nxt), 4)
    assert deep.value.code == grpc.StatusCode.OUT_OF_RANGE
    # The session is at round 1: rounds 1..4 are the four blocks past its last verdict, 5 the fifth.
    assert deep.value.details.startswith(
        "send-ahead block for round 5 is block 5 past the last verdict (the session is at round 1); this edge allows 4"
    ), deep.value.details
    length = s.length
    s.verify(DraftBlock(round=1, ids=(target.eos_token_ids[0] + 1 if target.eos_token_ids else 3,)))
    assert s.length > length
    # An empty block ahead follows whatever its parent gave (round 1 above rejected or accepted).
    assert s.resolve_ahead(DraftBlock(round=2, ids=(), follow=True), 4) == DraftBlock(round=2, ids=())
    assert s.resolve_ahead(DraftBlock(round=3, ids=(), follow=True), 4) is None  # its parent was never verified
    # Verified unresolved, a block's guess would be ignored (a wrong verdict): refused instead.
    from gelato.edge.verifier import verify_batch

    for unresolved in (DraftBlock(round=s.rounds, ids=(5,), guess=7), DraftBlock(round=s.rounds, ids=(), follow=True)):
        (outcome,) = verify_batch([(s, unresolved)])
        assert isinstance(outcome, StatusError) and outcome.code == grpc.StatusCode.FAILED_PRECONDITION, outcome
        assert "resolved against its parent" in outcome.details
    s.close()


def test_drafter_settles_around_empty_blocks(target: LoadedModel) -> None:
    """The drafter's sequence after a block whose successor is an empty block sent ahead: cut to
    what the verdict emitted (whatever it was), the chain kept; and nothing is drafted after one."""
    prompt = encode_prompt(target.tokenizer, PROMPT)
    d = Drafter(target, GREEDY)
    d.start(prompt)
    block = d.draft(3, 0)
    follow = DraftBlock(round=1, ids=(), follow=True)
    with pytest.raises(ValueError, match="empty send-ahead"):
        d.draft_after(follow, 2, 2)
    emitted, hit = d.settle(block, Verdict(round=0, n_accepted=1, next_token=7), follow)
    assert hit and emitted == [block.ids[0], 7]
    assert d.tokens == [*prompt, block.ids[0], 7]
    emitted, hit = d.settle(follow, Verdict(round=1, n_accepted=0, next_token=9), None)
    assert emitted == [9] and d.tokens == [*prompt, block.ids[0], 7, 9]


def test_cut_rule_stops_a_block_once_its_chain_is_cut() -> None:
    """`_CutRule`: the policy's gate until the awaited verdict shows a miss (fewer drafts accepted
    than sent, or the next block's guess wrong), then "cut"; a hit never cuts, a failed read does
    (the block could never be sent: drafting it on only delays the failover)."""

    def chain_of(*blocks: DraftBlock) -> _Chain:
        chain = _Chain()
        for b in blocks:
            chain.sent.append(_Sent(b, Decision(2, 2, 0.0), None, 2, 2, 0, 0.0))
        return chain

    oldest, successor = DraftBlock(round=0, ids=(4, 5)), DraftBlock(round=1, ids=(6,), guess=9)

    async def outcome(chain: _Chain, verdict: Verdict | None) -> tuple[str | None, str | None]:
        recv: asyncio.Future[tuple[Verdict, int]] = asyncio.get_running_loop().create_future()
        rule = _CutRule(lambda n, h, q: "gate" if n >= 3 else None, recv, chain)
        before = rule(1, 0.5, None)
        if verdict is None:
            recv.set_exception(RuntimeError("stream broke"))
        else:
            recv.set_result((verdict, 0))
        await asyncio.sleep(0)  # the done callbacks run on the loop
        return before, rule(1, 0.5, None)

    def check(chain: _Chain, verdict: Verdict | None) -> tuple[str | None, str | None]:
        return asyncio.run(outcome(chain, verdict))

    partial = Verdict(round=0, n_accepted=1, next_token=9)
    full_hit, full_wrong = Verdict(round=0, n_accepted=2, next_token=9), Verdict(round=0, n_accepted=2, next_token=8)
    assert check(chain_of(oldest), partial) == (None, "cut")
    assert check(chain_of(oldest), full_hit) == (None, None)  # the block being drafted may still hit
    assert check(chain_of(oldest, successor), full_hit) == (None, None)
    assert check(chain_of(oldest, successor), full_wrong) == (None, "cut")
    assert check(chain_of(oldest), None) == (None, "cut")
    rule = _CutRule(None, asyncio.new_event_loop().create_future(), chain_of(oldest))
    assert rule(5, 9.0, None) is None  # no gate (fixed K), no verdict: never stops

    # The block being drafted follows the awaited one: its own guess, handed over by the drafter
    # thread before or after the verdict lands, decides (a full accept with another target token
    # dooms it: drafting it on would be waste).
    # `guessed` answers whether the block is lost already (the drafter then drafts nothing more).
    async def own_guess(guess: int, verdict: Verdict, guess_first: bool) -> tuple[bool, str | None]:
        recv: asyncio.Future[tuple[Verdict, int]] = asyncio.get_running_loop().create_future()
        rule = _CutRule(None, recv, chain_of(oldest))
        lost = rule.guessed(guess) if guess_first else False
        recv.set_result((verdict, 0))
        await asyncio.sleep(0)
        if not guess_first:
            lost = rule.guessed(guess)
        return lost, rule(1, 0.5, None)

    for verdict, cut in ((full_wrong, True), (full_hit, False), (partial, True)):
        assert asyncio.run(own_guess(9, verdict, True)) == (False, "cut" if cut else None), verdict
        assert asyncio.run(own_guess(9, verdict, False)) == (cut, "cut" if cut else None), verdict


def test_a_block_lost_at_its_guess_gets_no_drafts(target: LoadedModel) -> None:
    """`draft_after` asks `on_guess` once the guess is drawn: a block already lost gets no drafts
    (one forward, the guess's; stop reason "cut"), and the drafter settles around it as around
    any dropped block; a block not lost is drafted in full."""
    prompt = encode_prompt(target.tokenizer, PROMPT)
    d = Drafter(target, GREEDY)
    d.start(prompt)
    block = d.draft(3, 0)
    pick, picks = d._pick, []

    def counting(*args: Any) -> Any:
        picks.append(1)
        return pick(*args)

    d._pick = counting  # type: ignore[method-assign]
    heard: list[int] = []
    lost = d.draft_after(block, 4, 1, on_guess=lambda g: heard.append(g) or True)
    assert (lost.k, lost.stop_reason, lost.guess, len(picks)) == (0, "cut", heard[0], 1)
    # The verdict that cut it: one draft accepted of 3, then the target's own token.
    emitted, hit = d.settle(block, Verdict(round=0, n_accepted=1, next_token=7), lost)
    assert not hit and emitted == [block.ids[0], 7] and d.tokens == [*prompt, block.ids[0], 7]
    again = d.draft(3, 1)
    d.settle(again, Verdict(round=1, n_accepted=3, next_token=5), None)
    kept = d.draft_after(d.draft(2, 2), 4, 3, on_guess=lambda g: False)
    assert kept.k == 4 and kept.stop_reason == ""
