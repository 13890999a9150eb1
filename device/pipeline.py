"""Send-ahead speculation (`--pipeline send-ahead`): draft blocks form a chain in flight.

Contract: `await pipelined_generate(drafter, link, policy, prompt_ids, limits, ...)` returns what
`gelato.device.generate.speculative_generate` returns for the same arguments — the same tokens, greedy or
sampled with the same seed (draws are keyed by token position) — over a `Link` that sends a block
without waiting for its verdict. While the oldest block's verdict is in flight, the drafter drafts
the next block of the chain (its first token the guess of the previous block's target token,
`Drafter.draft_after`) and sends it at once, up to `link.max_ahead` blocks past the awaited one,
while the policy says it pays (`Policy.send_ahead`). When the policy drafts nothing (K = 0) and
the edge takes them (`Link.empty_ahead`), the block sent ahead is empty (`DraftBlock.follow`): it
asks for the target's next token whatever the blocks before it give, costs no drafting, and is
verified whenever its parent is, so rounds of K = 0 go on without a round trip each; nothing is
drafted after one until its verdict is in. The room for a block sent ahead is what is left if every
block in flight is a hit; where that is none but a miss would leave some (near `max_new_tokens` or
the context limit), the chain waits for the verdict: no block the policy did not choose (an empty
one in place of drafts) is ever sent. For the generation the policy holds the link's
`max_ahead` (`Policy.ahead_blocks`): the controller prices the chains this link runs. Verdicts come
back in order. A hit (every draft accepted, the target's token the guess) lets the chain go on with
neither a drafting wait nor a round trip; a miss cuts it: the blocks after it come back stale and
are skipped, and the next block is drafted after the target's token. A block being drafted when its
chain is cut stops at its next token, or right after its guess when the cut is known by then
(`_CutRule`), and is dropped unsent: no drafting for a block that cannot be used.

Each verdict is one round of telemetry: its time and energy are those since the previous verdict
(rounds overlap, so they add up to the generation's), `t_net_s` is the block's own transport time
(sent to answered, less the edge's time; for a block sent ahead that includes its wait behind the
blocks before it, so the cost estimates learn the channel from the others), `sent_ahead` marks a
block sent before its parent's verdict (`follow` an empty one), and a miss's round carries the
blocks it cut (`stale_blocks` with drafts or a guess, `stale_empty` empty ones), the `wasted_tokens`
drafted for nothing and their estimated drafting energy `wasted_j` (the cost model's per-token
drafting time × drafting power). `predrafted` is what was drafted after the block before its
verdict: the next block, sent or dropped unsent once the verdict showed it missed (so the
guess-match rate learns from every guess, `predraft_hit` False; but for a guess of an end token,
never sent and not counted: it ends the chain), and `t_net_s` is measured to when the verdict
arrived, not to when the loop next looked at it (it may be drafting then). Blocks still in flight
when the generation stops (sent past its eos or last token) and stale verdicts not yet charged to a
round belong to no round: their bytes count in the generation's totals (`stats.bytes_up`,
`bytes_down`, the radio energy), as the session's open does; the verdicts of blocks still in flight
are not read here (the edge client reads them after its close and charges them then).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gelato.controller import Decision
from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant
from gelato.device.generate import (
    Exchange,
    GenerationResult,
    Limits,
    Offload,
    VerifyError,
    block_end,
    check_verdict,
    deliver,
    end_round,
    finish,
    inline,
    start_drafter,
)
from gelato.device.policy import Gate, Policy
from gelato.power import NullMeter, Reading
from gelato.types import DraftBlock, GenerationStats, SparseDist, Telemetry, Verdict


@dataclass(frozen=True)
class Link:
    """A transport that sends blocks and reads verdicts separately (one ordered stream)."""

    send: Callable[[DraftBlock], Awaitable[int]]  # -> wire bytes up
    receive: Callable[[], Awaitable[tuple[Verdict, int]]]  # the next verdict, wire bytes down
    max_ahead: int  # blocks that may be in flight past the awaited one
    empty_ahead: bool = False  # the edge verifies empty send-ahead blocks (`DraftBlock.follow`)


@dataclass
class _Sent:
    block: DraftBlock
    decision: Decision
    gate: Gate | None
    cap: int
    wanted: int
    bytes_up: int
    sent_at: float
    # Sent while the verdict of the block before it was still out. A block drafted while its
    # parent was in flight whose parent's verdict (a hit) came in before it was sent is not: the
    # edge answers it at once, so its transport time measures the channel.
    ahead: bool = False


@dataclass
class _Chain:
    """Blocks in flight, oldest first, and the verdicts still to skip (stale blocks of a cut chain)."""

    sent: deque[_Sent] = field(default_factory=deque)
    stale: set[int] = field(default_factory=set)
    next_round: int = 0
    stale_down: int = 0  # bytes of skipped stale verdicts, charged to the next round
    failed_up: int = 0  # bytes a failed exchange had written (`VerifyError.bytes_up`): in the totals
    unsent: int = 0  # tokens drafted never sent (a miss known by then, an end-token guess): wasted
    # Tokens of the block drafted after the awaited one (alone in flight) and dropped unsent when
    # its verdict came mid-draft: that round's pre-draft, a miss, reported as such so that the
    # guess-match rate learns from every guess drafted, not only from the guesses sent.
    dropped: int = 0
    drafting_s: float = 0.0  # drafting time since the last verdict (every block drafted)
    # The round of the block after which the chain ends, the block drafted after it guessing an end
    # token (not sent); None once that block's verdict came or a miss cut the chain (rounds are
    # numbered again after a miss).
    ends_after: int | None = None

    def p_chain(self, policy: Policy) -> float:
        p = 1.0
        for s in self.sent:
            p *= policy.p_hit(s.block)
        return p

    def projected(self) -> int:
        """Tokens the blocks in flight add if every one is a hit."""
        return sum(s.block.k + 1 for s in self.sent)

    def exact(self) -> bool:
        """Whether `projected` is what the blocks in flight add whatever their verdicts: none has
        drafts or a guess (each is verified and adds one token, unless an eos ends the generation)."""
        return all(s.block.k == 0 and s.block.guess is None for s in self.sent)


def _drafted(block: DraftBlock) -> int:
    """Tokens the drafter made for a block: its drafts, and its guess when sent ahead with one."""
    return block.k + (block.guess is not None)


async def _receive(link: Link, chain: _Chain, vocab_size: int) -> tuple[Verdict, int, float]:
    """The oldest block's verdict, its bytes and when it arrived (read here, on the event loop, not
    once the block being drafted meanwhile is done: the channel's time must not include drafting),
    skipping the stale answers of a cut chain; VerifyError for any other answer (`check_verdict`)."""
    while True:
        verdict, down = await link.receive()
        if verdict.stale and verdict.round in chain.stale:
            chain.stale.discard(verdict.round)
            chain.stale_down += down
            continue
        want = chain.sent[0].block
        try:
            if verdict.stale or verdict.round != want.round:
                what = f"round {verdict.round}" + (" stale" if verdict.stale else "")
                raise VerifyError(f"edge answered {what}, expected round {want.round}")
            check_verdict(verdict, want, vocab_size)
        except VerifyError:
            chain.stale_down += down  # refused, but received all the same: in the totals
            raise
        return verdict, down, time.perf_counter()


def _limit(limits: Limits, confirmed: int, out: int) -> int:
    """Drafts allowed in a block starting after `confirmed` tokens with `out` generated; -1: none."""
    room = limits.context_limit - confirmed - 1
    if room < 0 or out >= limits.max_new_tokens:
        return -1
    return max(0, min(limits.max_new_tokens - out - 1, room, limits.max_draft_tokens, limits.draft_room(confirmed)))


async def _send(
    link: Link,
    chain: _Chain,
    block: DraftBlock,
    decision: Decision,
    gate: Gate | None,
    cap: int,
    wanted: int,
    ahead: bool = False,
) -> None:
    up = await link.send(block)
    chain.sent.append(_Sent(block, decision, gate, cap, wanted, up, time.perf_counter(), ahead))
    chain.next_round = block.round + 1


async def _first(
    drafter: Drafter, link: Link, policy: Policy, chain: _Chain, limit: int, offload: Offload, limits: Limits
) -> None:
    """An ordinary block: the chain is empty (start, or after a miss)."""
    decision = policy.decide(limit)
    gate = policy.gate(decision)
    wanted = decision.k_max if gate else decision.k_ref
    cap = max(0, min(wanted, limit))
    if drafter.forwards_needed(cap):
        block = await offload(drafter.draft, cap, chain.next_round, gate, limits.eos)
    else:  # nothing for the model: no thread hop
        block = drafter.draft(cap, chain.next_round, gate, limits.eos)
    chain.drafting_s += block.draft_s
    await _send(link, chain, block, decision, gate, cap, wanted)


def _hit(verdict: Verdict, block: DraftBlock, successor: DraftBlock) -> bool:
    return successor.follow or (verdict.n_accepted == block.k and successor.guess == verdict.next_token)


class _CutRule:
    """The stop rule of a block drafted while the oldest verdict is in flight: the policy's gate,
    and "cut" as soon as that verdict is known to cut the chain (fewer drafts accepted than sent,
    or the next block's guess missed — the one in flight, or the one this block is drafted after,
    which `guessed` hands over from the drafter thread). The verdict arrives on the event loop
    while the drafter thread drafts; the rest of a block that will never be sent is not drafted.
    What is drafted never depends on it: a cut block is dropped, never sent."""

    def __init__(self, gate: Gate | None, recv: asyncio.Future[tuple[Verdict, int, float]], chain: _Chain) -> None:
        self.gate = gate
        self.cut = threading.Event()
        # Whichever of the two lands second compares them (each writes its own, then reads the
        # other's: under the GIL one of them sees both).
        self.guess: int | None = None  # this block's guess (drafter thread)
        self.target_token: int | None = None  # the awaited block's target token, all its drafts accepted
        oldest = chain.sent[0].block
        successor = chain.sent[1].block if len(chain.sent) > 1 else None
        recv.add_done_callback(lambda f: self._on_verdict(f, oldest, successor))

    def guessed(self, guess: int) -> bool:
        """This block's guess of the awaited block's target token (drafter thread); whether the
        block is lost already (then `Drafter.draft_after` drafts nothing after the guess)."""
        self.guess = guess
        if self.target_token is not None and guess != self.target_token:
            self.cut.set()
        return self.cut.is_set()

    def _on_verdict(
        self, f: asyncio.Future[tuple[Verdict, int, float]], oldest: DraftBlock, successor: DraftBlock | None
    ) -> None:
        if f.cancelled() or f.exception() is not None:
            # An error ends the generation: the rest of this block would never be sent, and drafting
            # it only delays the failover (a cut block is dropped, never sent: lossless).
            self.cut.set()
            return
        verdict = f.result()[0]
        if verdict.n_accepted < oldest.k or (successor is not None and not _hit(verdict, oldest, successor)):
            self.cut.set()
        elif successor is None:  # this block follows the awaited one: its own guess decides
            self.target_token = verdict.next_token
            if self.guess is not None and self.guess != verdict.next_token:
                self.cut.set()

    def __call__(self, drafted: int, entropy: float, q: SparseDist | None) -> str | None:
        if self.cut.is_set():
            return "cut"
        return self.gate(drafted, entropy, q) if self.gate is not None else None


async def _extend(
    drafter: Drafter,
    link: Link,
    policy: Policy,
    chain: _Chain,
    recv: asyncio.Future[tuple[Verdict, int, float]],
    base: tuple[int, int],
    offload: Offload,
    limits: Limits,
) -> None:
    """While the oldest verdict is in flight: draft and send the next blocks of the chain."""
    confirmed, out = base
    while not recv.done() and len(chain.sent) <= link.max_ahead:
        prev = chain.sent[-1].block
        limit = _limit(limits, confirmed + chain.projected(), out + chain.projected())
        if prev.stop_reason == "eos" or prev.round == chain.ends_after or limit < 0:
            return  # the chain ends at an eos or at the generation's limits
        if limit == 0 and not chain.exact():
            # No room if every block in flight is a hit, but a miss leaves room the policy may
            # draft into: wait for the verdict rather than send a block of K = 0 it never chose.
            return
        decision = policy.decide(limit)
        gate = policy.gate(decision)
        wanted = decision.k_max if gate else decision.k_ref
        cap = max(0, min(wanted, limit))
        if cap == 0 and link.empty_ahead:  # the policy drafts nothing: the next target token, whatever comes
            empty = DraftBlock(round=chain.next_round, ids=(), follow=True)
            await _send(link, chain, empty, decision, gate, 0, wanted, ahead=True)  # the loop saw no verdict
            continue
        if limits.draft_room(confirmed + chain.projected()) == 0:
            # An edge that takes no empty blocks gets a guess-only one, but the guess is a drafter
            # forward and the drafter's window is full: wait for the verdict, as a round would.
            return
        # A chain's start: the awaited block alone in flight, itself sent fresh (no guess).
        first = len(chain.sent) == 1 and chain.sent[0].block.guess is None
        if prev.follow or not policy.send_ahead(decision, chain.p_chain(policy), first):
            return
        stop = _CutRule(gate, recv, chain)
        block = await offload(drafter.draft_after, prev, cap, chain.next_round, stop, limits.eos, stop.guessed)
        chain.drafting_s += block.draft_s
        if recv.done() and recv.exception() is not None:
            # The read failed while drafting (the edge went away): nothing more goes onto that
            # stream, and the caller's `await recv` ends the generation with the read's own error.
            chain.unsent += _drafted(block)
            return
        if recv.done():  # the verdict came while drafting: still worth sending?
            verdict = recv.result()[0]
            successor = chain.sent[1].block if len(chain.sent) > 1 else block
            if not _hit(verdict, chain.sent[0].block, successor):
                chain.unsent += _drafted(block)  # `settle` drops it with the rest
                if successor is block:
                    chain.dropped = _drafted(block)
                return
        if not block.ids and block.guess in limits.eos:
            # Its guess is an end token: if the chain hits up to it, the generation ends at its
            # parent's verdict; if not, it comes back stale. Not sent, and the chain ends here as
            # at an eos draft: `draft_after` fed `prev`'s last token already, so nothing more is
            # drafted after `prev` until its verdict resets the drafter's sequence.
            chain.unsent += _drafted(block)
            chain.ends_after = prev.round
            return
        # Past the awaited block, its parent's verdict is still out; the awaited one's may be in (a hit).
        await _send(link, chain, block, decision, gate, cap, wanted, ahead=len(chain.sent) > 1 or not recv.done())


async def pipelined_generate(
    drafter: Drafter,
    link: Link,
    policy: Policy,
    prompt_ids: list[int],
    limits: Limits,
    acct: EnergyAccountant | None = None,
    on_round: Callable[[Telemetry], None] | None = None,
    offload: Offload = inline,
    session_bytes: tuple[int, int] = (0, 0),
) -> GenerationResult:
    # For this generation the policy prices the chains this link runs (up to `max_ahead` blocks in
    # flight past the awaited one), not the ones `--ahead-blocks` asked for.
    policy.ahead_blocks = link.max_ahead
    try:
        return await _chain_loop(drafter, link, policy, prompt_ids, limits, acct, on_round, offload, session_bytes)
    finally:
        policy.end_chains()


async def _chain_loop(
    drafter: Drafter,
    link: Link,
    policy: Policy,
    prompt_ids: list[int],
    limits: Limits,
    acct: EnergyAccountant | None,
    on_round: Callable[[Telemetry], None] | None,
    offload: Offload,
    session_bytes: tuple[int, int],
) -> GenerationResult:
    acct = acct or EnergyAccountant(NullMeter(), None)
    stats = GenerationStats()
    gen_start, t0 = acct.begin(stats), time.perf_counter()
    # A policy that never drafts needs the drafter only for guesses, which an edge taking empty
    # blocks ahead never asks for (it sends those instead).
    await start_drafter(drafter, prompt_ids, policy.drafts or not link.empty_ahead, offload, True)
    out: list[int] = []
    chain = _Chain()
    error, failure = "", None
    start = acct.round_start()
    while not stats.stop_reason:
        confirmed = len(prompt_ids) + len(out)
        if not chain.sent:
            limit = _limit(limits, confirmed, len(out))
            if limit < 0:
                stats.stop_reason = "context_limit"
                break
        recv: asyncio.Future[tuple[Verdict, int, float]] | None = None
        try:
            if not chain.sent:
                await _first(drafter, link, policy, chain, limit, offload, limits)
            recv = asyncio.ensure_future(_receive(link, chain, drafter.loaded.vocab_size))
            await _extend(drafter, link, policy, chain, recv, (confirmed, len(out)), offload, limits)
            verdict, down, arrived = await recv
        except VerifyError as failed:
            exc = _read_error_first(failed, recv)
            chain.stale_down += exc.bytes_down  # an answer read and refused (no verdict): received all the same
            # What a failed exchange had sent (a link that knows: the gRPC client's writes are all
            # or nothing), the write's even when the read's error is the one reported.
            chain.failed_up += failed.bytes_up + (exc.bytes_up if exc is not failed else 0)
            if recv is not None and recv.done() and not recv.cancelled() and recv.exception() is None:
                # The awaited verdict came in while a block ahead was being written, and then that
                # write failed: the verdict stands (its tokens, its bytes), as if it had come first.
                # Nothing is drafting (`_extend` awaited its block before the write).
                got = recv.result()
                start = await _settle(drafter, policy, chain, got, start, stats, out, limits, acct, on_round, offload)
            if not stats.stop_reason:  # that verdict may have ended the generation: then it is whole
                stats.stop_reason, error, failure = "error", str(exc), exc
            break
        finally:
            if recv is not None and not recv.done():
                recv.cancel()
        got = (verdict, down, arrived)
        start = await _settle(drafter, policy, chain, got, start, stats, out, limits, acct, on_round, offload)
    # Blocks still in flight when the generation stops (sent ahead past its eos or its last token,
    # or behind a failed read) and stale verdicts skipped since the last round cost their bytes
    # too, charged to no round: in the totals (and so the radio energy), as the open is.
    finish(stats, policy, acct, gen_start, _with_unsettled(session_bytes, chain))
    return GenerationResult(list(prompt_ids), out, time.perf_counter() - t0, stats, error=error, failure=failure)


def _read_error_first(exc: VerifyError, recv: asyncio.Future[Any] | None) -> VerifyError:
    """The generation's error when a write failed: the awaited read's, if it had failed too (the
    stream ending under both: the read carries the edge's status and the bytes it read), else
    the write's."""
    if recv is not None and recv.done() and not recv.cancelled():
        read_exc = recv.exception()
        if isinstance(read_exc, VerifyError):
            return read_exc
    return exc


def _with_unsettled(session_bytes: tuple[int, int], chain: _Chain) -> tuple[int, int]:
    """(up, down) bytes outside any round: the session's, the blocks in flight, the stale verdicts
    not yet charged to a round."""
    up, down = session_bytes
    return up + sum(s.bytes_up for s in chain.sent) + chain.failed_up, down + chain.stale_down


async def _settle(
    drafter: Drafter,
    policy: Policy,
    chain: _Chain,
    got: tuple[Verdict, int, float],
    start: Reading,
    stats: GenerationStats,
    out: list[int],
    limits: Limits,
    acct: EnergyAccountant,
    on_round: Callable[[Telemetry], None] | None,
    offload: Offload,
) -> Reading:
    """Apply the oldest block's verdict (`got`: it, its bytes, when it arrived): emit, cut the chain
    on a miss, one round of telemetry."""
    verdict, down, arrived = got
    sent = chain.sent.popleft()
    block = sent.block
    successor = chain.sent[0].block if chain.sent else None
    # A cut of the drafter's token list and KV, no forward, and nothing is drafting now (`_extend`
    # awaited its last block): here, not through a thread hop.
    emitted, hit = drafter.settle(block, verdict, successor)
    if not hit or block.round == chain.ends_after:
        chain.ends_after = None
    cut = [] if hit else list(chain.sent)
    if cut:
        chain.sent.clear()
        chain.stale.update(s.block.round for s in cut)
    if not hit:
        chain.next_round = block.round + 1
    wasted = sum(_drafted(s.block) for s in cut) + chain.unsent
    drafting_s, chain.unsent, chain.drafting_s = chain.drafting_s, 0, 0.0
    predrafted, chain.dropped = _drafted(successor) if successor is not None else chain.dropped, 0
    delivered = deliver(emitted, out, limits)
    out += delivered
    up = sent.bytes_up + sum(s.bytes_up for s in cut)
    stale_down, chain.stale_down = chain.stale_down, 0
    down += stale_down
    edge_s = (verdict.queue_ms + verdict.compute_ms) / 1e3
    cost = policy.controller.cost.model()
    gate = sent.gate
    tele = acct.round_end(
        start,
        block,
        verdict,
        len(delivered),
        up,
        down,
        t_net_s=max(0.0, arrived - sent.sent_at - edge_s),
        k_ref=sent.decision.k_ref,
        k_max=sent.cap,
        over_budget=sent.decision.over_budget,
        j_per_token_model=sent.decision.j_per_token_model,
        explore=sent.decision.explore,
        stop_reason=block_end(block, sent.cap, sent.wanted, gate is not None),
        entropies=block.entropies,
        p_accept=tuple(gate.p_accept) if gate else (),
        predrafted=predrafted,
        predraft_hit=hit and predrafted > 0,  # an empty successor was drafted by nobody
        t_drafting_s=drafting_s,
        sent_ahead=sent.ahead,
        guessed=block.guess is not None,
        follow=block.follow,
        stale_blocks=sum(not s.block.follow for s in cut),
        stale_empty=sum(s.block.follow for s in cut),
        stale_bytes_down=stale_down,
        wasted_tokens=wasted,
        wasted_j=wasted * cost.t_draft_s * cost.p_draft_w,
    )
    end_round(stats, policy, block, Exchange(verdict, up, down), tele, (emitted, delivered, out), limits, on_round)
    return acct.round_start()
