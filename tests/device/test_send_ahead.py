"""Send-ahead speculation in process: the chain loop (`gelato.device.pipeline`) against a real target
session answering in order with a delay, as the edge's stream does. The output must be exactly
the unpipelined one (greedy and sampled with the same seed: draws are keyed by token position),
with forced hits (drafter = target), forced misses (a drafter that never agrees) and a mix; the
edge's rule (`TargetSession.resolve_ahead`) refuses duplicate and too-deep blocks precisely."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from gelato.controller import Decision
from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant
from gelato.device.generate import GenerationResult, Limits, Offload, VerifyError, local_verifier, speculative_generate
from gelato.device.local_link import local_link
from gelato.device.pipeline import Link, _Chain, _CutRule, _Sent, pipelined_generate
from gelato.device.policy import FixedK, PolicyOptions, parse_policy
from gelato.device.run import pipeline_record
from gelato.edge.sessions import StatusError, TargetSession
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.power import NullMeter, radio_profile
from gelato.types import DraftBlock, SamplingParams, Verdict
from tests.conftest import target_greedy

GREEDY = SamplingParams()
PROMPT = "Ava has 12 apples and Ben gives her 3 more. How many?"


class Scripted(FixedK):
    """Block sizes from a fixed pattern keyed by the room left (a function of the state, as a
    policy's decision is): stretches of K = 0 (empty blocks sent ahead) next to drafted blocks, so
    a chain passes between the two kinds every way."""

    PATTERN = (0, 0, 3, 0, 2, 2, 0, 0, 0, 4, 1, 0, 0)

    def __init__(self, options: PolicyOptions) -> None:
        super().__init__(0, options)

    def decide(self, limit: int) -> Decision:
        k = min(self.PATTERN[limit % len(self.PATTERN)], limit)
        return Decision(k, k, self.controller.q_j)


def run(
    target: LoadedModel,
    drafter: LoadedModel,
    name: str,
    pipeline: str,
    params: SamplingParams = GREEDY,
    max_new: int = 60,
    ahead: int = 2,
) -> tuple[GenerationResult, TargetSession]:
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, params, prompt)
    session.prefill()
    limits = Limits(max_new, target.context_limit, 32, target.eos_token_ids)
    options = PolicyOptions(pipeline=pipeline, k_max=6, ahead_blocks=ahead)
    policy = Scripted(options) if name == "scripted" else parse_policy(name, options)
    d = Drafter(drafter, params, top_m=8)
    if pipeline == "send-ahead":
        # The verdict comes 20 ms after its block: long enough for the chain to be drafted ahead.
        coro = pipelined_generate(d, local_link(session, max_ahead=4, delay_s=0.02), policy, prompt, limits)
    else:
        coro = speculative_generate(d, local_verifier(session), policy, prompt, limits)
    return asyncio.run(coro), session


@pytest.mark.parametrize("name", ["fixed-4", "gelato", "fixed-0", "scripted"])
@pytest.mark.parametrize("drafter_key", ["target", "drafter_never", "drafter_agree"])
def test_send_ahead_greedy_is_exact(pair: dict[str, Path], target: LoadedModel, name: str, drafter_key: str) -> None:
    dm = target if drafter_key == "target" else load_model(str(pair[drafter_key]), "drafter", "float32", "cpu")
    plain, _ = run(target, dm, name, "off")
    piped, _ = run(target, dm, name, "send-ahead")
    reference = target_greedy(target, encode_prompt(target.tokenizer, PROMPT), len(plain.token_ids))
    assert piped.token_ids == plain.token_ids == reference
    assert piped.stats.stop_reason == plain.stats.stop_reason
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


def slow_drafter(dm: LoadedModel, token_s: float) -> tuple[Drafter, list[DraftBlock]]:
    """A drafter whose every token takes `token_s` more (so verdicts land mid-block) and the list
    of every block it drafts after another (`draft_after`), sent or not."""
    d = Drafter(dm, GREEDY, top_m=8)
    pick, draft_after, drafted = d._pick, d.draft_after, []

    def slow_pick(*args: Any) -> Any:
        time.sleep(token_s)
        return pick(*args)

    def recording(*args: Any) -> DraftBlock:
        drafted.append(draft_after(*args))
        return drafted[-1]

    d._pick = slow_pick  # type: ignore[method-assign]
    d.draft_after = recording  # type: ignore[method-assign]
    return d, drafted


def run_threaded(
    d: Drafter, link: Link, target: LoadedModel, k: int, ahead: int, on_round: Any = None
) -> GenerationResult:
    """`fixed-k` with send-ahead over `link`, drafting on its own thread as the device does."""
    prompt = encode_prompt(target.tokenizer, PROMPT)

    limits = Limits(60, target.context_limit, 32, target.eos_token_ids)
    policy = parse_policy(f"fixed-{k}", PolicyOptions(pipeline="send-ahead", k_max=k, ahead_blocks=ahead))
    return on_drafter_thread(
        lambda offload: pipelined_generate(d, link, policy, prompt, limits, on_round=on_round, offload=offload)
    )


def on_drafter_thread(run: Callable[[Offload], Awaitable[GenerationResult]]) -> GenerationResult:
    """`run(offload)` in an event loop, its drafter work on a thread of its own, as the device does."""

    async def main() -> GenerationResult:
        with ThreadPoolExecutor(1) as pool:
            loop = asyncio.get_running_loop()

            async def offload(fn: Any, *args: Any) -> Any:
                return await loop.run_in_executor(pool, fn, *args)

            return await run(offload)

    return asyncio.run(main())


def prefilled(target: LoadedModel) -> TargetSession:
    session = TargetSession("s", target, GREEDY, encode_prompt(target.tokenizer, PROMPT))
    session.prefill()
    return session


def test_blocks_cut_mid_draft_are_never_sent(pair: dict[str, Path], target: LoadedModel) -> None:
    """Drafting on its own thread (as the device does) while verdicts come back at once: blocks of
    a chain cut mid-draft stop early, none of them reaches the edge, and the output is the
    unpipelined one."""
    dm = load_model(str(pair["drafter_never"]), "drafter", "float32", "cpu")
    plain, _ = run(target, dm, "fixed-6", "off")
    d, drafted = slow_drafter(dm, 0.003)  # a drafter token slower than the verdict: it lands mid-block
    link = local_link(prefilled(target), max_ahead=4, delay_s=0.0)
    sent: list[DraftBlock] = []

    async def send(block: DraftBlock) -> int:
        sent.append(block)
        return await link.send(block)

    piped = run_threaded(d, replace(link, send=send), target, 6, 2)
    assert piped.token_ids == plain.token_ids
    cut = [b for b in drafted if b.stop_reason == "cut"]
    assert cut and all(b.k < 6 for b in cut), [(b.k, b.stop_reason) for b in drafted]
    assert not any(b.stop_reason == "cut" for b in sent)


def test_dropped_blocks_and_transport_time_are_reported_as_they_happened(
    pair: dict[str, Path], target: LoadedModel
) -> None:
    """Drafting slower than the verdicts (6 ms per drafter token, each verdict 2 ms after its
    block), one block ahead: (1) a block dropped unsent because its verdict came mid-draft is still
    that round's pre-draft, reported as a miss (the guess-match rate must see every guess, not
    only those sent), so every block drafted after another is reported exactly once; (2) a block's
    transport time ends when its verdict arrived, not when the loop, drafting meanwhile, got to it."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    plain, _ = run(target, dm, "fixed-4", "off")
    d, drafted = slow_drafter(dm, 0.006)
    rounds: list[Any] = []
    piped = run_threaded(d, local_link(prefilled(target), max_ahead=1, delay_s=0.002), target, 4, 1, rounds.append)
    assert piped.token_ids == plain.token_ids
    assert sum(t.predrafted for t in rounds) == sum(b.k + 1 for b in drafted)  # a guess + its drafts each
    assert any(t.predrafted and not t.predraft_hit for t in rounds)
    fresh = sorted(t.t_net_s for t in rounds if not t.sent_ahead)
    # 2 ms and a verify's scheduling; a block drafted meanwhile takes 5 × 6 ms.
    assert fresh and fresh[len(fresh) // 2] < 0.015, fresh


def test_a_chain_near_the_end_waits_instead_of_sending_an_empty_block(
    pair: dict[str, Path], target: LoadedModel
) -> None:
    """Near `max_new_tokens` the room left *if every block in flight is a hit* can be 0 while a
    miss would leave room for a drafted block: the chain then waits for the verdict, it does not
    send an empty block (K = 0) that `fixed-4` never chose. Such a block is verified even after a
    miss, a K = 0 round where rounds one at a time draft: sampled tokens differ for the same seed
    and the run takes more rounds. Here the limit lands mid-chain for many (seed, limit) pairs."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    for seed, max_new in [(0, 17), (0, 22), (1, 29), (4, 22), (5, 22), (2, 40)]:
        params = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=seed)
        plain, _ = run(target, dm, "fixed-4", "off", params, max_new=max_new)
        piped, _ = run(target, dm, "fixed-4", "send-ahead", params, max_new=max_new)
        log = piped.stats.rounds_log
        assert not any(t.follow for t in log), (seed, max_new, [(t.round, t.k, t.follow) for t in log])
        assert piped.token_ids == plain.token_ids, (seed, max_new)
        # The same rounds as one at a time: every verified block is the block that round drafts.
        assert [t.k for t in log] == [t.k for t in plain.stats.rounds_log], (seed, max_new)
        # And chains were sent ahead (a run that never sent ahead would pass the checks above on
        # its own): at this temperature their blocks come back stale, each miss restarting one.
        assert sum(t.stale_blocks for t in log) > 0, (seed, max_new, [(t.k, t.stale_blocks) for t in log])


def test_blocks_in_flight_at_the_end_count_in_the_totals(pair: dict[str, Path], target: LoadedModel) -> None:
    """A generation that stops (here at an eos) while later blocks are already sent: those blocks
    cost their bytes all the same, so `stats.bytes_up` is every byte sent (a round's bytes plus
    those in flight at the end), `bytes_down` every byte received, and the radio energy theirs.
    `fixed-0`'s empty blocks follow any verdict, so those sent after the one that ends the
    generation are in flight then; `fixed-2`'s chain ends before a block whose guess is the end
    token (not sent), and a miss cuts the rest (their bytes go to that round)."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    greedy, _ = run(target, dm, "fixed-0", "off", max_new=40)
    radio = radio_profile("wifi")
    left_in_flight = 0
    for name, pos in itertools.product(("fixed-0", "fixed-2"), (5, 9, 17, 30)):
        session = TargetSession("s", target, GREEDY, prompt)
        session.prefill()
        inner = local_link(session, max_ahead=4, delay_s=0.01)
        sent, received = [0], [0]

        async def send(block: DraftBlock, inner: Any = inner, sent: list[int] = sent) -> int:
            up: int = await inner.send(block)
            sent[0] += up
            return up

        async def receive(inner: Any = inner, received: list[int] = received) -> tuple[Verdict, int]:
            verdict, down = await inner.receive()
            received[0] += down
            return verdict, down

        link = Link(send, receive, 4, True)
        policy = parse_policy(name, PolicyOptions(pipeline="send-ahead", ahead_blocks=4))
        acct = EnergyAccountant(NullMeter(), radio)
        limits = Limits(60, target.context_limit, 32, (greedy.token_ids[pos],))
        t_start = time.perf_counter()
        acct.radio_busy()  # the open is sent, as the edge client marks it
        res = asyncio.run(pipelined_generate(Drafter(dm, GREEDY), link, policy, prompt, limits, acct))
        stats = res.stats
        assert stats.stop_reason == "eos", pos
        left_in_flight += sent[0] - sum(t.bytes_up for t in stats.rounds_log)
        assert (stats.bytes_up, stats.bytes_down) == (sent[0], received[0]), pos
        # The bytes, one whole tail at the end, and the connected state between the transfers
        # (each round's, and what lies outside the rounds: at most the tail's power over the run).
        rest_j = stats.radio_j - radio.round_energy_j(sent[0], received[0]) - radio.tail_energy_j()
        in_rounds_j = sum(t.e_radio_link_j for t in stats.rounds_log)
        assert 0 < in_rounds_j <= rest_j + 1e-12 <= radio.tail_mw / 1e3 * (time.perf_counter() - t_start), pos
    assert left_in_flight > 0  # some generation did stop with blocks in flight


class _Tampering:
    """A target session whose verdicts go wrong from the `at`-th on (`how`: what becomes of
    (block, a, next)), as a buggy edge or one serving another model would answer."""

    def __init__(self, session: TargetSession, at: int, how: Any) -> None:
        self.session, self.at, self.how, self.verdicts = session, at, how, 0

    def resolve_ahead(self, block: DraftBlock, max_ahead: int) -> DraftBlock | None:
        return self.session.resolve_ahead(block, max_ahead)

    def verify(self, block: DraftBlock) -> tuple[int, int]:
        a, nxt = self.session.verify(block)
        self.verdicts += 1
        return self.how(block, a, nxt) if self.verdicts >= self.at else (a, nxt)


@pytest.mark.parametrize("pipeline", ["off", "send-ahead"])
@pytest.mark.parametrize(
    ("how", "error"),
    [
        (lambda block, a, nxt: (a, 10**6), "token 1000000, outside the vocabulary"),
        (lambda block, a, nxt: (a, -1), "token -1, outside the vocabulary"),
        (lambda block, a, nxt: (block.k + 1, nxt), "drafts of a block of"),
    ],
    ids=["token-past-vocab", "token-negative", "more-accepted-than-drafted"],
)
def test_a_verdict_the_drafter_cannot_apply_ends_the_generation_as_an_error(
    pair: dict[str, Path], target: LoadedModel, pipeline: str, how: Any, error: str
) -> None:
    """A verdict naming a token outside the vocabulary, or accepting more drafts than the block
    had, is the edge's fault: the generation ends "error", naming it, with the tokens delivered
    before it (once the drafter failed on it: an index past its embedding, a cut past its tokens,
    an exception no caller expected, and no tokens at all in the device's record)."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    ref, _ = run(target, dm, "fixed-4", "off")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    bad = _Tampering(session, at=4, how=how)
    limits = Limits(60, target.context_limit, 32, target.eos_token_ids)
    policy = parse_policy("fixed-4", PolicyOptions(pipeline=pipeline, k_max=6, ahead_blocks=2))
    d = Drafter(dm, GREEDY, top_m=8)
    if pipeline == "send-ahead":
        coro = pipelined_generate(d, local_link(bad, max_ahead=4, delay_s=0.0), policy, prompt, limits)
    else:
        coro = speculative_generate(d, local_verifier(bad), policy, prompt, limits)
    res = asyncio.run(coro)
    assert res.stats.stop_reason == "error" and error in res.error, res.error
    assert res.token_ids and res.token_ids == ref.token_ids[: len(res.token_ids)]
    assert res.stats.rounds == 3  # the three good verdicts' rounds, then the bad one ends it


def test_a_verify_that_raises_in_the_local_link_ends_the_generation(pair: dict[str, Path], target: LoadedModel) -> None:
    """`local_link`'s edge failing (its session's verify raises) reaches the generation through
    the next read, as a failed read on the stream does: it ended the link's serving task and left
    the read waiting for ever."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()

    def fails(block: DraftBlock, a: int, nxt: int) -> tuple[int, int]:
        raise RuntimeError("simulated: the edge's verify failed")

    link = local_link(_Tampering(session, at=3, how=fails), max_ahead=4, delay_s=0.0)
    policy = parse_policy("fixed-4", PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    limits = Limits(60, target.context_limit, 32, target.eos_token_ids)
    coro = pipelined_generate(Drafter(dm, GREEDY, top_m=8), link, policy, prompt, limits)
    with pytest.raises(RuntimeError, match="simulated: the edge's verify failed"):
        asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("name", ["fixed-0", "scripted"])
def test_the_drafters_sequence_is_the_output_after_every_settle(
    pair: dict[str, Path], target: LoadedModel, name: str
) -> None:
    """Against an edge that takes no empty blocks ahead, K = 0 rounds send guess-only blocks. After
    each verdict the drafter's sequence must be the prompt and the tokens emitted so far (once a
    guess-only block settled with nothing drafted after it left its guess out: the next token
    took its place, and every later draft was one position off)."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    ref, _ = run(target, dm, name, "off")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    d = Drafter(dm, GREEDY, top_m=8)
    emitted_so_far: list[int] = []
    wrong: list[int] = []
    settle = d.settle

    def checked(block: DraftBlock, verdict: Verdict, next_block: DraftBlock | None) -> tuple[list[int], bool]:
        emitted, hit = settle(block, verdict, next_block)
        emitted_so_far.extend(emitted)
        want = prompt + ref.token_ids[: len(emitted_so_far)]
        got = d.tokens[: len(want)]
        # The newest token may still be pending (the guess of a guess-only block in flight, fed
        # when something is drafted after it): one short at most, never a token out of place.
        if got != want[: len(got)] or len(got) < len(want) - 1:
            wrong.append(block.round)
        return emitted, hit

    d.settle = checked  # type: ignore[method-assign]
    limits = Limits(60, target.context_limit, 32, target.eos_token_ids)
    policy = Scripted(PolicyOptions(pipeline="send-ahead", k_max=6, ahead_blocks=2)) if name == "scripted" else None
    policy = policy or parse_policy(name, PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    link = local_link(session, max_ahead=4, delay_s=0.0, empty_ahead=False)
    res = asyncio.run(pipelined_generate(d, link, policy, prompt, limits))
    assert res.token_ids == ref.token_ids
    assert any(t.sent_ahead and t.k == 0 for t in res.stats.rounds_log)  # guess-only blocks went ahead
    assert not wrong, wrong


def test_every_token_the_drafter_holds_is_an_output_or_its_own_greedy_draft(
    pair: dict[str, Path], target: LoadedModel
) -> None:
    """Greedy, a chain of blocks near each generation's end token: after every block drafted ahead,
    each token in the drafter's sequence past the prompt is the output's token at that place or the
    drafter's own greedy pick after the tokens before it. A token fed twice (the chain's newest
    token, fed again when the chain drafted after the same block twice) is neither. A block whose
    guess is the end token is drafted (the guess is a forward) but never sent: a hit up to it ends
    the generation at its parent's verdict, a miss makes it stale; the chain ends there instead."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    greedy, _ = run(target, dm, "fixed-0", "off", max_new=40)
    picks: dict[tuple[int, ...], int] = {}

    def pick(prefix: list[int]) -> int:
        if tuple(prefix) not in picks:
            with torch.inference_mode():
                logits = dm.model(torch.tensor([prefix])).logits[0, -1, : dm.vocab_size]
            picks[tuple(prefix)] = int(logits.argmax())
        return picks[tuple(prefix)]

    end_guesses = 0
    for pos in (6, 11, 19, 27, 33):
        eos = (greedy.token_ids[pos],)
        session = TargetSession("s", target, GREEDY, prompt)
        session.prefill()
        drafter = Drafter(dm, GREEDY)
        draft_after = drafter.draft_after
        held: list[list[int]] = []

        drafted: list[DraftBlock] = []

        def recording(*args: Any, draft_after: Any = draft_after, d: Any = drafter, log: Any = (held, drafted)) -> Any:
            block: DraftBlock = draft_after(*args)
            log[0].append(list(d.seq.tokens))
            log[1].append(block)
            return block

        drafter.draft_after = recording  # type: ignore[method-assign]
        policy = parse_policy("fixed-2", PolicyOptions(pipeline="send-ahead", ahead_blocks=4))
        inner = local_link(session, max_ahead=4, delay_s=0.01)
        sent: list[DraftBlock] = []

        async def send(block: DraftBlock, inner: Any = inner, sent: list[DraftBlock] = sent) -> int:
            sent.append(block)
            return int(await inner.send(block))

        link = Link(send, inner.receive, 4, True)
        res = asyncio.run(pipelined_generate(drafter, link, policy, prompt, Limits(60, 512, 32, eos)))
        out = prompt + res.token_ids
        assert res.token_ids == greedy.token_ids[: greedy.token_ids.index(eos[0]) + 1], pos
        assert held, pos  # blocks were drafted ahead
        assert not [b for b in sent if not b.ids and b.guess in eos], pos
        end_guesses += sum(1 for b in drafted if not b.ids and b.guess in eos)
        for tokens in held:
            for i in range(len(prompt), len(tokens)):
                assert tokens[i] == (out[i] if i < len(out) else None) or tokens[i] == pick(tokens[:i]), (pos, i)
    assert end_guesses > 0  # the case arose: the drafter guessed the end token ahead of its verdict


def test_local_predrafting_reports_the_transports_time_without_the_drafters(
    pair: dict[str, Path], target: LoadedModel
) -> None:
    """`--pipeline local`: the drafter pre-drafts while the verdict is in flight (10 ms here), and
    the loop waits for its current token (60 ms) before the round ends. That wait is the
    drafter's: a round's transport time is the exchange's less the edge's, not the round's rest
    (once ~60 ms, which inflated the controller's estimate of the round trip)."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    d, _ = slow_drafter(dm, 0.06)
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = prefilled(target)
    verify = local_verifier(session)

    async def slow_verify(block: DraftBlock) -> Any:
        await asyncio.sleep(0.01)
        return await verify(block)

    limits = Limits(12, target.context_limit, 32, target.eos_token_ids)
    policy = parse_policy("fixed-2", PolicyOptions(pipeline="local"))
    res = on_drafter_thread(lambda run: speculative_generate(d, slow_verify, policy, prompt, limits, offload=run))
    pre = sorted(t.t_net_s for t in res.stats.rounds_log if t.predrafted)
    assert pre and pre[len(pre) // 2] < 0.035, pre


@pytest.mark.parametrize(("field", "value"), [("compute_ms", math.nan), ("queue_ms", math.inf), ("compute_ms", -1.0)])
def test_a_verdict_with_edge_times_that_are_no_times_ends_the_generation_as_an_error(
    pair: dict[str, Path], target: LoadedModel, field: str, value: float
) -> None:
    """An edge time that is NaN, infinite or negative (float32 on the wire: any of them decodes)
    is the edge's fault too: the generation ends "error" with the tokens before it, and the
    controller never learns it (one NaN in its decayed sums and `gelato` would never draft again)."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    ref, _ = run(target, dm, "fixed-4", "off")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    verify, calls = local_verifier(session), [0]

    async def tampering(block: DraftBlock) -> Any:
        ex = await verify(block)
        calls[0] += 1
        return replace(ex, verdict=replace(ex.verdict, **{field: value})) if calls[0] == 3 else ex

    limits = Limits(60, target.context_limit, 32, target.eos_token_ids)
    policy = parse_policy("gelato", PolicyOptions(k_max=6))
    res = asyncio.run(speculative_generate(Drafter(dm, GREEDY, top_m=8), tampering, policy, prompt, limits))
    assert res.stats.stop_reason == "error" and f"edge answered {field} {value}" in res.error, res.error
    assert res.token_ids and res.token_ids == ref.token_ids[: len(res.token_ids)]
    assert res.stats.rounds == 2
    assert all(math.isfinite(t.t_edge_compute_s + t.t_edge_queue_s) for t in res.stats.rounds_log)


def test_a_read_that_fails_while_the_next_block_is_drafted_ends_the_generation_with_its_own_error(
    pair: dict[str, Path], target: LoadedModel
) -> None:
    """The awaited verdict's read fails (the edge went away) while the next block is being
    drafted: that block is not sent onto the dying stream, and the generation ends with the read's
    error and its bytes (once the block was written anyway, and when that write failed too, the
    write's error replaced the read's, whose bytes were lost)."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    base = local_link(session, max_ahead=4, delay_s=0.0)
    state = {"reads": 0, "failed": False, "sent_after": 0, "down": 0}

    async def receive() -> tuple[Verdict, int]:
        state["reads"] += 1
        if state["reads"] == 3:
            state["failed"] = True
            exc = VerifyError("edge gone (UNAVAILABLE)")
            exc.bytes_down = 50  # an answer read and refused
            raise exc
        verdict, down = await base.receive()
        state["down"] += down
        return verdict, down

    async def send(block: DraftBlock) -> int:
        if state["failed"]:
            state["sent_after"] += 1
            raise VerifyError("write to a stream that ended")
        return await base.send(block)

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)  # the read completes while the drafter works

    policy = parse_policy("fixed-4", PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    limits = Limits(60, target.context_limit, 32, target.eos_token_ids)
    link = Link(send, receive, base.max_ahead, base.empty_ahead)
    res = asyncio.run(pipelined_generate(Drafter(dm, GREEDY), link, policy, prompt, limits, offload=in_thread))
    assert res.stats.stop_reason == "error" and res.error == "edge gone (UNAVAILABLE)", res.error
    assert state["sent_after"] == 0
    assert res.stats.bytes_down == state["down"] + 50


def test_a_write_failing_after_the_read_failed_reports_the_read(pair: dict[str, Path], target: LoadedModel) -> None:
    """The next block's write is held (flow control) while the awaited read fails, and then the
    write fails too (the stream has ended): the generation ends with the read's error (the edge's
    status) and bytes, not the write's (which, mapped to UNAVAILABLE, would have failed over)."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    base = local_link(session, max_ahead=4, delay_s=0.0)
    state = {"reads": 0, "failed": False, "down": 0}

    async def receive() -> tuple[Verdict, int]:
        state["reads"] += 1
        if state["reads"] == 3:
            state["failed"] = True
            exc = VerifyError("edge: OUT_OF_RANGE past the reservation")
            exc.bytes_down = 50
            raise exc
        verdict, down = await base.receive()
        state["down"] += down
        return verdict, down

    async def send(block: DraftBlock) -> int:
        if state["reads"] >= 3 or (state["reads"] == 2 and block.round >= 3):
            while not state["failed"]:  # held until the read has failed, then the stream is gone
                await asyncio.sleep(0.001)
            raise VerifyError("the stream to the edge ended while a message was being sent")
        return await base.send(block)

    policy = parse_policy("fixed-4", PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    limits = Limits(60, target.context_limit, 32, target.eos_token_ids)
    link = Link(send, receive, base.max_ahead, base.empty_ahead)
    res = asyncio.run(pipelined_generate(Drafter(dm, GREEDY), link, policy, prompt, limits))
    assert res.stats.stop_reason == "error" and res.error == "edge: OUT_OF_RANGE past the reservation", res.error
    assert res.stats.bytes_down == state["down"] + 50


@pytest.mark.parametrize("name", ["fixed-3", "heuristic"])
@pytest.mark.parametrize("shorter", [3, 0, -5], ids=["window inside the prompt", "window = prompt", "window past it"])
def test_guess_only_blocks_stay_within_the_drafters_window(
    target: LoadedModel, name: str, shorter: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Send-ahead to an edge that takes no empty blocks sends guess-only blocks, each a drafter
    forward: none reaches past the drafter's window (`Limits.draft_context`; its KV grew 28
    tokens past a window of 31, and a prompt filling the window was forwarded whole for the first
    guess, which a drafter with absolute positions cannot do), and the output is the target's."""
    from gelato.kv import KVSequence

    prompt = encode_prompt(target.tokenizer, PROMPT)
    window = len(prompt) - shorter
    small = replace(target, context_limit=window)  # the same weights, a shorter window
    d = Drafter(small, GREEDY)
    cached: list[int] = []
    forward_last = KVSequence.forward_last

    def watched(seq: KVSequence, *args: Any, **kwargs: Any) -> Any:
        out = forward_last(seq, *args, **kwargs)
        if seq is d.seq:
            cached.append(seq.cached)
        return out

    monkeypatch.setattr(KVSequence, "forward_last", watched)
    limits = Limits(30, target.context_limit, 32, (), small.context_limit)
    policy = parse_policy(name, PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
    link = local_link(prefilled(target), max_ahead=2, delay_s=0.002, empty_ahead=False)
    res = asyncio.run(pipelined_generate(d, link, policy, prompt, limits))
    alone = parse_policy("fixed-0", PolicyOptions())  # the target's own decoding, over its vocabulary
    ref = asyncio.run(
        speculative_generate(Drafter(target, GREEDY), local_verifier(prefilled(target)), alone, prompt, limits)
    )
    assert res.token_ids == ref.token_ids and len(ref.token_ids) == 30
    assert max(cached, default=0) <= window, (max(cached), window)


def test_a_verdict_that_arrives_while_a_write_fails_still_counts(pair: dict[str, Path], target: LoadedModel) -> None:
    """The awaited verdict comes in while the next block is being written, and then that write
    fails: the verdict's tokens and bytes stand (they were dropped: the generation kept one round
    fewer than the edge had answered, and its bytes went into no total). Lossless all the same."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    base = local_link(session, max_ahead=4, delay_s=0.01)
    state = {"sends": 0, "verdicts": 0, "down": 0}

    async def send(block: DraftBlock) -> int:
        state["sends"] += 1
        if state["sends"] == 4:
            await asyncio.sleep(0.1)  # the awaited verdict (10 ms) arrives meanwhile
            raise VerifyError("the stream to the edge ended while a message was being sent")
        return await base.send(block)

    async def receive() -> tuple[Verdict, int]:
        verdict, down = await base.receive()
        state["down"] += down
        state["verdicts"] += not verdict.stale
        return verdict, down

    policy = parse_policy("fixed-2", PolicyOptions(pipeline="send-ahead", k_max=6, ahead_blocks=2))
    limits = Limits(40, target.context_limit, 32, target.eos_token_ids)
    link = Link(send, receive, base.max_ahead, base.empty_ahead)
    res = asyncio.run(pipelined_generate(Drafter(dm, GREEDY), link, policy, prompt, limits))
    assert res.stats.stop_reason == "error" and "while a message was being sent" in res.error
    assert state["verdicts"] >= 1 and res.stats.rounds == state["verdicts"]
    assert res.stats.bytes_down == state["down"]
    alone = run(target, dm, "fixed-0", "off", max_new=len(res.token_ids))[0]
    assert res.token_ids and res.token_ids == alone.token_ids


def test_a_failed_read_cuts_the_block_being_drafted(pair: dict[str, Path], target: LoadedModel) -> None:
    """The awaited read fails while the next block is drafted: the rest of that block, which can
    never be sent, is not drafted (it ran to its cap, delaying the failover by its forwards)."""
    prompt = encode_prompt(target.tokenizer, PROMPT)
    session = TargetSession("s", target, GREEDY, prompt)
    session.prefill()
    base = local_link(session, max_ahead=4, delay_s=0.0)
    blocks: list[DraftBlock] = []

    async def receive() -> tuple[Verdict, int]:
        await asyncio.sleep(0.05)
        raise VerifyError("edge gone (UNAVAILABLE)")

    class Slow(Drafter):
        def draft_after(self, prev: DraftBlock, k: int, round_no: int, stop: Any = None, *args: Any) -> DraftBlock:
            def slow(n: int, h: float, q: Any) -> str | None:
                time.sleep(0.05)  # each draft 50 ms: the read fails during the block's first ones
                return stop(n, h, q) if stop is not None else None

            block = super().draft_after(prev, k, round_no, slow, *args)
            blocks.append(block)
            return block

    executor = ThreadPoolExecutor(1)

    async def offload(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    policy = parse_policy("fixed-8", PolicyOptions(pipeline="send-ahead", k_max=8, ahead_blocks=2))
    limits = Limits(40, target.context_limit, 32, target.eos_token_ids)
    link = Link(base.send, receive, base.max_ahead, base.empty_ahead)
    try:
        res = asyncio.run(pipelined_generate(Slow(target, GREEDY), link, policy, prompt, limits, offload=offload))
    finally:
        executor.shutdown()
    assert res.stats.stop_reason == "error" and res.error == "edge gone (UNAVAILABLE)"
    assert len(blocks) == 1 and blocks[0].stop_reason == "cut" and blocks[0].k < 8, blocks
