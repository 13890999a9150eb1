"""The speculative round loop, independent of the transport.

Contract: `await speculative_generate(drafter, verify, policy, prompt_ids, limits, accountant)`
runs rounds until eos, `max_new_tokens` or the context limit and returns a `GenerationResult`.
`verify(block)` is any coroutine that answers a `DraftBlock` with an `Exchange` (the verdict and
the wire bytes it cost): the gRPC client, an in-process `TargetSession` (`local_verifier`), or the
drafter itself (`self_verifier`, the `ar-device` reference). The policy sees every round's full
`Telemetry` and decides the next; where a block stops depends only on the drafter's side, so the
output is the target's whatever the policy. Drafter model work goes through `offload` (the
client passes its drafter thread, so forwards never block the event loop): one offload per round
that drafts. An empty block (or one made only of carried pre-drafts) and a verdict's apply (a cut
of the token list and KV) run on the loop's thread: a thread hop costs more than they do. With
pipelining the policy may ask for pre-drafting: the drafter thread drafts ahead while the verdict
is in flight, and a hit starts the next block without a drafting wait (`Drafter.predraft`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from gelato.device.drafter import Drafter
from gelato.device.energy import EnergyAccountant, wire_bytes
from gelato.device.policy import Policy
from gelato.power import NullMeter, Reading
from gelato.types import DraftBlock, GenerationStats, Telemetry, Verdict
from gelato.wire import encode_block, encode_verdict

T = TypeVar("T")
log = logging.getLogger(__name__)


class VerifyError(RuntimeError):
    """A `verify` transport failed (e.g. the edge went away): the loop ends the generation with
    stop_reason "error" and keeps the tokens delivered so far. `bytes_up`, `bytes_down`: what the
    transport had written and read of the failed exchange (its block, the Generate request, an
    answer that was no verdict): spent all the same."""

    bytes_up = 0
    bytes_down = 0


@dataclass(frozen=True)
class Exchange:
    verdict: Verdict
    bytes_up: int = 0
    bytes_down: int = 0


Verify = Callable[[DraftBlock], Awaitable[Exchange]]
Offload = Callable[..., Awaitable[Any]]  # offload(fn, *args) -> fn(*args), maybe on another thread


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    context_limit: int  # the target's: the generation ends there
    max_draft_tokens: int
    eos: Collection[int] = ()
    draft_context: int = 0  # the drafter's window (0: the same): nothing is drafted at or past it

    def draft_room(self, length: int) -> int:
        """Drafts (or pre-drafts) that fit in the drafter's window after `length` tokens."""
        return max(0, (self.draft_context or self.context_limit) - length)


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    elapsed_s: float
    stats: GenerationStats = field(default_factory=GenerationStats)
    target_model: str = ""
    target_eos: tuple[int, ...] | None = None  # the target's end tokens as its edge said (None: not said)
    error: str = ""  # why the generation ended early (stop_reason "error")
    failure: Exception | None = None  # the exception behind `error`
    failovers: int = 0  # sessions re-opened after the edge went away

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def inline(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def block_end(block: DraftBlock, cap: int, wanted: int, gated: bool) -> str:
    """Why a block ended: the drafter's own reason, or which limit it reached."""
    if block.stop_reason:
        return block.stop_reason
    if cap < wanted:
        return "length"  # the edge's block limit, the context or max_new_tokens
    return "cap" if gated else "budget"


async def speculative_generate(
    drafter: Drafter,
    verify: Verify,
    policy: Policy,
    prompt_ids: list[int],
    limits: Limits,
    acct: EnergyAccountant | None = None,
    on_round: Callable[[Telemetry], None] | None = None,
    offload: Offload = inline,
    session_bytes: tuple[int, int] = (0, 0),
) -> GenerationResult:
    """`session_bytes`: (up, down) wire bytes outside any round (the open), for the totals."""
    acct = acct or EnergyAccountant(NullMeter(), None)
    stats = GenerationStats()
    gen_start, t0 = acct.begin(stats), time.perf_counter()
    await start_drafter(drafter, prompt_ids, policy.drafts, offload, policy.options.pipeline != "off")
    out: list[int] = []
    error, failure = "", None
    unsettled = (0, 0)  # bytes of an exchange that failed: sent and received all the same
    while not stats.stop_reason:
        room = limits.context_limit - len(drafter.tokens) - 1  # the round's own token needs one slot
        if room < 0:
            stats.stop_reason = "context_limit"
            break
        length = len(drafter.tokens)
        limit = max(
            0, min(limits.max_new_tokens - len(out) - 1, room, limits.max_draft_tokens, limits.draft_room(length))
        )
        decision = policy.decide(limit)
        gate = policy.gate(decision)
        wanted = decision.k_max if gate else decision.k_ref
        cap = max(0, min(wanted, limit))
        start = acct.round_start()
        if drafter.forwards_needed(cap):
            block = await offload(drafter.draft, cap, stats.rounds, gate, limits.eos)
        else:  # nothing for the model (fixed-0, or only tokens carried from a pre-draft): no thread hop
            block = drafter.draft(cap, stats.rounds, gate, limits.eos)
        drafted = acct.drafted()
        # A pre-draft starts at the round's target token, after the block; what the next block can
        # use of it ends where that block's drafts must (within both windows and max_new_tokens:
        # none on a round whose tokens end the generation).
        fits = min(room, limits.draft_room(length + 1), limits.max_new_tokens - len(out) - 1) - block.k
        depth = policy.predraft_depth(decision, block, fits)
        ex: Exchange | None = None
        try:
            ex, predrafted, net_s = await _verify_pipelined(drafter, block, verify, depth, offload, limits.eos)
            check_verdict(ex.verdict, block, drafter.loaded.vocab_size)
        except VerifyError as exc:
            stats.stop_reason, error, failure = "error", str(exc), exc
            unsettled = (exc.bytes_up, exc.bytes_down) if ex is None else (ex.bytes_up, ex.bytes_down)
            break
        pre = drafter.last_predraft
        hit = pre is not None and drafter.predraft_hit(block, ex.verdict, pre)
        # A cut of the drafter's token list and KV, no forward (the pre-draft, if any, has stopped):
        # here, not through another thread hop. The next block's offload is the round's only one.
        emitted = drafter.apply(block, ex.verdict)
        delivered = deliver(emitted, out, limits)
        out += delivered
        tele = acct.round_end(
            start,
            block,
            ex.verdict,
            len(delivered),
            ex.bytes_up,
            ex.bytes_down,
            drafted,
            k_ref=decision.k_ref,
            k_max=cap,
            over_budget=decision.over_budget,
            j_per_token_model=decision.j_per_token_model,
            explore=decision.explore,
            stop_reason=block_end(block, cap, wanted, gate is not None),
            entropies=block.entropies,
            p_accept=tuple(gate.p_accept) if gate else (),
            predrafted=predrafted,
            predraft_hit=hit,
            carried=block.carried,
            t_drafting_s=block.draft_s + (drafter.predraft_s if predrafted else 0.0),
            **({} if net_s is None else {"t_net_s": net_s}),
        )
        end_round(stats, policy, block, ex, tele, (emitted, delivered, out), limits, on_round)
    finish(stats, policy, acct, gen_start, (session_bytes[0] + unsettled[0], session_bytes[1] + unsettled[1]))
    return GenerationResult(list(prompt_ids), out, time.perf_counter() - t0, stats, error=error, failure=failure)


async def start_drafter(
    drafter: Drafter, prompt_ids: list[int], prefill: bool, offload: Offload, check_guesses: bool = False
) -> None:
    """`drafter.start`: on the drafter thread when it prefills the prompt, inline when it does not
    (a policy that never drafts needs no drafter KV: no model work, no thread hop). `check_guesses`:
    pipelining, whose controller prices it with the guess-match rate (`Drafter.start`)."""
    if prefill:
        await offload(drafter.start, prompt_ids, True, check_guesses)
    else:
        drafter.start(prompt_ids, prefill=False, check_guesses=check_guesses)


def check_verdict(verdict: Verdict, block: DraftBlock, vocab_size: int) -> None:
    """Raise VerifyError unless the drafter can apply `verdict` to `block`: at most the block's k
    drafts accepted, a next token in the vocabulary, edge timings that are finite and >= 0.
    Anything else is the edge's fault (a bug, or an edge serving another model): the generation
    ends "error" with the tokens delivered so far, instead of the drafter failing on it (an index
    past its embedding, a cut past its tokens) or the controller learning it (one NaN time stays
    in its decayed sums for good, and every K then scores NaN: it would never draft again)."""
    if not 0 <= verdict.n_accepted <= block.k:
        raise VerifyError(f"edge accepted {verdict.n_accepted} drafts of a block of {block.k}")
    if not 0 <= verdict.next_token < vocab_size:
        raise VerifyError(f"edge answered token {verdict.next_token}, outside the vocabulary (0..{vocab_size - 1})")
    for name in ("queue_ms", "compute_ms"):
        value = getattr(verdict, name)
        if not (math.isfinite(value) and value >= 0):
            raise VerifyError(f"edge answered {name} {value}, not a time (finite, >= 0)")


def end_round(
    stats: GenerationStats,
    policy: Policy,
    block: DraftBlock,
    ex: Exchange,
    tele: Telemetry,
    tokens: tuple[list[int], list[int], list[int]],
    limits: Limits,
    on_round: Callable[[Telemetry], None] | None,
) -> None:
    """A round's common tail (both loops): the policy observes it, it is counted and reported, and
    the generation stops at eos or max_new_tokens. `tokens`: (emitted, delivered, output so far)."""
    emitted, delivered, out = tokens
    q_j = policy.observe(tele)
    # No budget, no deficit queue: null in the trace, as in the generation's record (not 0 J).
    tele = replace(tele, q_deficit_j=q_j if policy.controller.queue is not None else None)
    count_round(stats, block, ex, tele)
    if on_round is not None:
        on_round(tele)
    if len(delivered) < len(emitted) or (delivered and delivered[-1] in limits.eos):
        stats.stop_reason = "eos" if delivered and delivered[-1] in limits.eos else "max_new_tokens"
    elif len(out) >= limits.max_new_tokens:
        stats.stop_reason = "max_new_tokens"


def finish(
    stats: GenerationStats, policy: Policy, acct: EnergyAccountant, gen_start: Reading, session_bytes: tuple[int, int]
) -> None:
    """A generation's totals (both loops)."""
    stats.bytes_up += session_bytes[0]
    stats.bytes_down += session_bytes[1]
    acct.end(stats, gen_start)
    # Energy outside any round (prefill of the prompt, the open message, the radio's tail) is
    # the device's too: the deficit queue is charged for it, so the long-run J/token it keeps
    # within the budget is the whole generation's. A round the meter could not measure (NaN)
    # was left out of the queue, its tokens too: its energy is in the generation's measured
    # total, so it is charged here with its tokens (else one bad read lost the whole remainder).
    measured = [t for t in stats.rounds_log if math.isfinite(t.e_j)]
    if math.isfinite(stats.energy_j):
        unmeasured_tokens = sum(t.emitted for t in stats.rounds_log if not math.isfinite(t.e_j))
        policy.charge(stats.energy_j - sum(t.e_j for t in measured), unmeasured_tokens)
    else:  # the meter's total is unknown (a failed read, a RAPL reset): the radio's joules outside
        # the rounds are not (modelled), and are charged; the meter's cannot be. An unmeasured
        # round stays out whole, as the queue leaves it: charged its radio joules without its
        # tokens, a meter that stayed unreadable grew Q by every round's radio, never drained.
        policy.charge(stats.radio_j - sum(t.e_radio_j for t in stats.rounds_log if math.isfinite(t.e_radio_j)))


def charge_bytes(stats: GenerationStats, policy: Policy, acct: EnergyAccountant | None, up: int, down: int = 0) -> None:
    """Messages outside the generation's totals when they were made (the session's close and the
    verdicts read after it, opens that failed before it): their bytes and radio energy join the
    totals and the deficit queue."""
    e_j = acct.radio_j(up, down) if acct is not None else 0.0
    stats.bytes_up += up
    stats.bytes_down += down
    stats.radio_j += e_j
    stats.energy_j += e_j
    policy.charge(e_j)


def charge_after_end(stats: GenerationStats, policy: Policy, acct: EnergyAccountant) -> None:
    """The meter's joules after the totals were made (`EnergyAccountant.after_end_j`: the close)
    into the totals and the deficit queue, so that `energy_j` spans what `elapsed_s` does. NaN
    (an unreadable meter) makes the total unknown, as any unread part of it does, and is charged
    to the queue as nothing."""
    e_j = acct.after_end_j()
    stats.energy_j += e_j
    policy.charge(e_j)


def merge_results(first: GenerationResult, then: GenerationResult) -> GenerationResult:
    """One generation from two sessions (a failover): the second continued the first's tokens."""
    a, b = first.stats, then.stats
    stats = GenerationStats(
        rounds=a.rounds + b.rounds,
        drafted=a.drafted + b.drafted,
        accepted=a.accepted + b.accepted,
        draft_s=a.draft_s + b.draft_s,
        edge_compute_ms=a.edge_compute_ms + b.edge_compute_ms,
        edge_share_ms=a.edge_share_ms + b.edge_share_ms,
        edge_queue_ms=a.edge_queue_ms + b.edge_queue_ms,
        block_sizes=a.block_sizes + b.block_sizes,
        energy_j=a.energy_j + b.energy_j,
        radio_j=a.radio_j + b.radio_j,
        bytes_up=a.bytes_up + b.bytes_up,
        bytes_down=a.bytes_down + b.bytes_down,
        energy_source=b.energy_source,
        energy_kind=b.energy_kind,
        radio_model=b.radio_model or a.radio_model,
        rounds_log=a.rounds_log + b.rounds_log,
        stop_reason=b.stop_reason,
    )
    return GenerationResult(
        prompt_ids=first.prompt_ids,
        token_ids=first.token_ids + then.token_ids,
        elapsed_s=first.elapsed_s + then.elapsed_s,
        stats=stats,
        target_model=then.target_model or first.target_model,
        target_eos=first.target_eos,  # a re-open reaches the same target or fails (`EdgeClient`)
        error=then.error,
        failure=then.failure,
        failovers=first.failovers + 1,
    )


async def _verify_pipelined(
    drafter: Drafter, block: DraftBlock, verify: Verify, depth: int, offload: Offload, eos: Collection[int]
) -> tuple[Exchange, int, float | None]:
    """Verify `block`; with `depth` > 0 the drafter thread pre-drafts after it meanwhile, until the
    verdict arrives. Returns the exchange, how many tokens were pre-drafted and, when it did, the
    transport's time (the exchange's, less the edge's): the round's time outside drafting and the
    edge would also count the wait for the pre-draft's last forward, which is the drafter's."""
    if depth <= 0:
        return await verify(block), 0, None
    halt = threading.Event()
    pre = asyncio.ensure_future(offload(drafter.predraft, block, depth, halt, eos))
    sent = time.perf_counter()
    try:
        ex = await verify(block)
        arrived = time.perf_counter()
    except BaseException:
        halt.set()  # the transport failed: its error is the round's (a VerifyError keeps the tokens
        try:  # so far), not one the pre-draft raised meanwhile, which is only logged
            await pre
        except Exception as exc:
            log.warning("pre-drafting failed while the verdict's transport failed too: %s: %s", type(exc).__name__, exc)
        raise
    halt.set()  # the verdict is here: stop after the current token
    predrafted = await pre
    edge_s = (ex.verdict.queue_ms + ex.verdict.compute_ms) / 1e3
    return ex, predrafted, max(0.0, arrived - sent - edge_s)


def deliver(emitted: list[int], out: list[int], limits: Limits) -> list[int]:
    """What the round adds to the output: up to the first eos (included) and max_new_tokens."""
    room = limits.max_new_tokens - len(out)
    for i, tok in enumerate(emitted[:room]):
        if tok in limits.eos:
            return emitted[: i + 1]
    return emitted[:room]


def count_round(stats: GenerationStats, block: DraftBlock, ex: Exchange, tele: Telemetry) -> None:
    stats.rounds_log.append(tele)
    stats.rounds += 1
    stats.drafted += block.k
    stats.accepted += ex.verdict.n_accepted
    stats.draft_s += block.draft_s
    stats.edge_compute_ms += ex.verdict.compute_ms
    stats.edge_share_ms += ex.verdict.compute_ms / max(1, ex.verdict.batch_rows)
    stats.edge_queue_ms += ex.verdict.queue_ms
    stats.block_sizes.append(block.k)
    stats.bytes_up += tele.bytes_up
    stats.bytes_down += tele.bytes_down


def local_verifier(session: Any) -> Verify:
    """Verify in process with an `gelato.edge.verifier.TargetSession`-like object (`verify(block) -> (a,
    next)`), counting the bytes the same exchange would cost on the wire. For benchmarks and tests:
    `device` never imports `edge`, the caller passes the session in. It marks no radio transfers
    (`EnergyAccountant.radio_busy`, which the gRPC client's open does): with a radio profile the
    accountant charges each generation a whole tail and no connected-state gaps, so in-process
    energy comparisons use no radio (every benchmark that calls it does)."""

    async def verify(block: DraftBlock) -> Exchange:
        t0 = time.perf_counter()
        a, nxt = session.verify(block)
        verdict = Verdict(round=block.round, n_accepted=a, next_token=nxt, compute_ms=(time.perf_counter() - t0) * 1e3)
        up, down = encode_block(block).ByteSize(), encode_verdict(verdict).ByteSize()
        return Exchange(verdict, wire_bytes(up), wire_bytes(down))

    return verify


def self_verifier(drafter: Drafter, offload: Offload = inline) -> Verify:
    """`ar-device`: the drafter's own tokens are the output. A block of k drafts emits them all
    (k − 1 "accepted" plus the last as the round's token); an empty block drafts one token
    (through `offload`, as every other drafter forward)."""

    async def verify(block: DraftBlock) -> Exchange:
        if block.k == 0:
            one = await offload(drafter.draft, 1, block.round)
            return Exchange(Verdict(round=block.round, n_accepted=0, next_token=one.ids[0]))
        return Exchange(Verdict(round=block.round, n_accepted=block.k - 1, next_token=block.ids[-1]))

    return verify
