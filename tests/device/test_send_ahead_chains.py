"""Send-ahead chains as they run against an in-process target session: drafting on a thread of its own
(blocks cut mid-draft never sent, dropped blocks and transport times reported as they happened), chains
near the generation's end and the bytes still in flight then, guess-only blocks (the drafter's sequence
after every settle, its window), and local pre-drafting's transport time."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant
from gelato.device.generate import GenerationResult, Limits, Offload, local_verifier, speculative_generate
from gelato.device.local_link import local_link
from gelato.device.pipeline import Link, pipelined_generate
from gelato.device.policy import PolicyOptions, parse_policy
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.power import NullMeter, radio_profile
from gelato.types import DraftBlock, SamplingParams, Verdict
from tests.conftest import target_greedy
from tests.device.send_ahead_helpers import GREEDY, PROMPT, Scripted, run


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


def test_a_block_sent_after_its_parents_verdict_is_not_counted_as_sent_ahead(target: LoadedModel) -> None:
    """Drafting slower than the verdicts (drafter = target: every chain hits): the next block is
    drafted ahead, but its parent's verdict is in before it is sent. It carries a guess
    (`guessed`: one drafter forward more) yet was not sent ahead: the edge answered it at once, so
    its transport time is a clean sample of the channel and it is no evidence of a verified
    send-ahead (it was sent only because its parent hit). Labelled sent ahead, it inflated the
    hit rate and kept the channel estimate from learning. A block reported as not sent ahead was
    indeed sent after its parent was answered."""
    session = prefilled(target)
    answered_at: dict[int, float] = {}
    verify, resolve = session.verify, session.resolve_ahead

    def timed_verify(block: DraftBlock) -> tuple[int, int]:
        out = verify(block)
        answered_at[block.round] = time.perf_counter()
        return out

    def timed_resolve(block: DraftBlock, max_ahead: int) -> Any:
        out = resolve(block, max_ahead)
        if out is None:  # stale: answered without a verify
            answered_at[block.round] = time.perf_counter()
        return out

    session.verify, session.resolve_ahead = timed_verify, timed_resolve  # type: ignore[method-assign]
    link = local_link(session, max_ahead=1, delay_s=0.002)
    sent_at: dict[int, float] = {}
    send = link.send

    async def timed_send(block: DraftBlock) -> int:
        sent_at[block.round] = time.perf_counter()
        return await send(block)

    d, _ = slow_drafter(target, 0.006)
    rounds: list[Any] = []
    piped = run_threaded(d, replace(link, send=timed_send), target, 4, 1, rounds.append)
    assert piped.token_ids == target_greedy(target, encode_prompt(target.tokenizer, PROMPT), len(piped.token_ids))
    late = [t for t in rounds if t.guessed and not t.sent_ahead]
    assert len(late) >= len(rounds) // 2, [(t.round, t.guessed, t.sent_ahead) for t in rounds]
    for t in rounds:
        if t.round > 0 and not t.sent_ahead:
            assert answered_at[t.round - 1] <= sent_at[t.round], t.round
    late_net = sorted(t.t_net_s for t in late)  # 2 ms and a verify; drafting a block takes 5 x 6 ms
    assert late_net[len(late_net) // 2] < 0.015, late_net
