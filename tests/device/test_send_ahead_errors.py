"""Send-ahead and unpipelined generations when the edge or the stream fails: verdicts the drafter cannot
apply or with edge times that are no times end the generation as an error with the tokens before it; a
verify that raises, reads and writes failing while the next block is drafted or written (whose error
and bytes are reported, which block is still drafted)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gelato.device.drafter import Drafter
from gelato.device.generate import Limits, VerifyError, local_verifier, speculative_generate
from gelato.device.local_link import local_link
from gelato.device.pipeline import Link, pipelined_generate
from gelato.device.policy import PolicyOptions, parse_policy
from gelato.edge.sessions import TargetSession
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.types import DraftBlock, Verdict
from tests.device.send_ahead_helpers import GREEDY, PROMPT, run


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


def test_the_bytes_a_failed_write_had_sent_are_in_the_totals(pair: dict[str, Path], target: LoadedModel) -> None:
    """A write that fails after sending part of its message (`VerifyError.bytes_up`, as its
    contract says: spent all the same) had those bytes dropped by the send-ahead loop, which read
    only `bytes_down`. The same generation, its failed write reporting 0 or 40 bytes sent."""
    dm = load_model(str(pair["drafter_agree"]), "drafter", "float32", "cpu")
    prompt = encode_prompt(target.tokenizer, PROMPT)

    def generate(sent_before_failing: int) -> Any:
        session = TargetSession("s", target, GREEDY, prompt)
        session.prefill()
        base = local_link(session, max_ahead=4, delay_s=0.0)

        async def send(block: DraftBlock) -> int:
            if block.round >= 3:
                exc = VerifyError("the stream to the edge ended while a message was being sent")
                exc.bytes_up = sent_before_failing
                raise exc
            return await base.send(block)

        policy = parse_policy("fixed-4", PolicyOptions(pipeline="send-ahead", ahead_blocks=2))
        limits = Limits(60, target.context_limit, 32, target.eos_token_ids)
        link = Link(send, base.receive, base.max_ahead, base.empty_ahead)
        return asyncio.run(pipelined_generate(Drafter(dm, GREEDY), link, policy, prompt, limits))

    none, some = generate(0), generate(40)
    assert none.stats.stop_reason == some.stats.stop_reason == "error"
    assert none.token_ids == some.token_ids
    assert some.stats.bytes_up - none.stats.bytes_up == 40
