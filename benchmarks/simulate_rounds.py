"""A simulated device's state and the per-round rules shared by the simulator's loops
(`gelato.benchmarks.simulate`).

Contract: `Totals` sums one device's rounds (`add(telemetry, q)`; pipelining counters are added by
the loops). `_block_end(reason, cap, wanted, gated)` is `gelato.device.generate.block_end`;
`_draft(trace, pos, cap, gate)` is `Drafter.draft` on a trace -> (drafts, stop reason, gate
seconds). `DeviceCore(policy, model, seed, q_every_s)` holds a device's policy, round model,
seeded jitter and guess draws and `totals`, and gives the loops `_limit` (drafts allowed from a
position, -1: none), `_guess_ok`, `_waste` and `_record` (Q(t) sampled every `q_every_s`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from gelato.benchmarks.simulate_model import RoundModel, Trace
from gelato.device.policy import Gate, Policy
from gelato.types import Telemetry


@dataclass
class Totals:
    """One device's sums over its rounds."""

    tokens: int = 0
    time_s: float = 0.0
    energy_j: float = 0.0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    q_sum: float = 0.0  # Σ Q after each round (for the round-average)
    q_final: float = 0.0
    q_max: float = 0.0
    controller_s: float = 0.0
    generations: int = 0
    q_trace: list[tuple[float, float]] = field(default_factory=list)  # (time, Q) samples
    # Pipelining: verified blocks that were sent ahead, blocks answered stale, rounds that
    # pre-drafted (local) or had a successor in flight (send-ahead) and how many of those hit,
    # drafted tokens thrown away (guesses included) and their drafting energy (simulated).
    sent_ahead: int = 0  # with drafts or a guess; empty ones (K = 0) are `sent_empty`
    sent_empty: int = 0
    stale: int = 0
    unsent: int = 0  # send-ahead blocks drafted, then dropped unsent (the verdict came meanwhile: a miss)
    predrafted_rounds: int = 0
    predraft_full: int = 0  # of those, rounds whose block was fully accepted (the guess decides)
    predraft_hits: int = 0
    guess_checks: int = 0  # `Telemetry.bonus_guess_hit` set: a full accept's guess checked after all
    guess_check_hits: int = 0
    wasted_tokens: int = 0
    wasted_j: float = 0.0
    busy_s: float = 0.0  # the device's drafting time

    def add(self, tele: Telemetry, q: float) -> None:
        self.tokens += tele.emitted
        self.time_s += tele.t_round_s
        self.energy_j += tele.e_j
        self.rounds += 1
        self.drafted += tele.k
        self.accepted += tele.accepted
        self.q_sum += q
        self.q_final = q
        self.q_max = max(self.q_max, q)
        self.sent_ahead += tele.sent_ahead and not tele.follow
        self.sent_empty += tele.follow + tele.stale_empty
        self.stale += tele.stale_blocks
        if tele.predrafted:
            self.predrafted_rounds += 1
            self.predraft_full += tele.accepted == tele.k
            self.predraft_hits += tele.predraft_hit
        if tele.bonus_guess_hit is not None:
            self.guess_checks += 1
            self.guess_check_hits += tele.bonus_guess_hit


def _block_end(reason: str, cap: int, wanted: int, gated: bool) -> str:
    """`gelato.device.generate.block_end`, the same rule."""
    if reason:
        return reason
    if cap < wanted:
        return "length"
    return "cap" if gated else "budget"


def _draft(trace: Trace, pos: int, cap: int, gate: Gate | None) -> tuple[int, str, float]:
    """`Drafter.draft` on the trace: (drafts, stop reason, seconds spent in the gate)."""
    k, reason, gate_s = 0, "", 0.0
    while k < cap and not reason:
        h = trace.entropy[pos + k]
        k += 1
        if gate is not None:  # asked of every draft, the drafter's own eos too (its p̂ is traced)
            t0 = time.perf_counter()
            reason = gate(k, h, None) or ""
            gate_s += time.perf_counter() - t0
        if pos + k - 1 in trace.eos_at:
            reason = "eos"  # the drafter stops after its own eos, whatever the gate said
    return k, reason, gate_s


class DeviceCore:
    """A simulated device's state — its persistent policy (None: the oracle), round model, seeded
    jitter and guess draws, `Totals` — and the rules every round loop shares: block limits,
    guess outcomes, waste and recording a round."""

    def __init__(self, policy: Policy | None, model: RoundModel, seed: int, q_every_s: float = 0.0) -> None:
        self.policy, self.model = policy, model
        self.jitter_rng = random.Random(seed * 7919 + 1)
        self.guess_rng = random.Random(seed * 7919 + 2)
        self.totals = Totals()
        self.q_every_s, self._next_q_sample = q_every_s, 0.0
        self.pipeline = policy.options.pipeline if policy is not None else "off"
        self._carry = 0  # local: pre-drafted tokens that start the next block (after a hit)
        # Pipelining: the position of a fully accepted block's target token that nothing guessed
        # (no pre-draft, no block after it): the next block's first forward checks the drafter's
        # guess of it (`gelato.device.drafter.Drafter._forward_checking_guess`); None: none due.
        self._guess_due: int | None = None

    def _limit(self, trace: Trace, pos: int) -> int:
        """Drafts allowed in a block whose first draft is at `pos` (`gelato.device.pipeline._limit`);
        -1: no block (the context is full, or the generation's n tokens are emitted)."""
        room = self.model.ch.context_limit - (trace.prompt_len + pos) - 1
        if room < 0 or pos >= trace.n:
            return -1
        return max(0, min(trace.n - pos - 1, room, self.model.ch.max_draft))

    def _guess_ok(self, trace: Trace, pos: int) -> bool:
        """Is the drafter's guess of the target's token at `pos` (after a fully accepted block) right?"""
        p = self.model.guess_match
        if p is None:
            return trace.run[pos] > 0  # teacher-forced: the drafter's argmax there is the target's token
        return self.guess_rng.random() < p

    def _waste(self, tokens: int, drafting_s: float) -> None:
        self.totals.wasted_tokens += tokens
        self.totals.wasted_j += drafting_s * self.model.ch.p_draft_w

    def _record(self, tele: Telemetry, q: float) -> None:
        self.totals.add(tele, q)
        if self.q_every_s and self.totals.time_s >= self._next_q_sample:
            self.totals.q_trace.append((round(self.totals.time_s, 3), round(q, 5)))
            self._next_q_sample += self.q_every_s
