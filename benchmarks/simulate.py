"""Trace-driven fleet simulator: every draft-length policy over long horizons and many devices,
without models (SPEC §6 "Fleet scale").

Contract: `python -m benchmarks.simulate --traces FILE --out DIR [--rtt-ms 20] [--devices 1]
[--tokens-per-device 20000] [--budgets J,...] [--vs V,...] [--seed 0]` replays traces recorded by
`benchmarks.traces` and writes `DIR/simulate.json`, `DIR/table.md` and PNG plots (the sweeps and
outputs are `benchmarks.simulate_sweep`); it prints the markdown table. As a library:
`load_traces(path)`, `Channel`, `RoundModel`, `Spec`, `run_spec(spec, traces, model, devices,
tokens, seed)` -> one policy's summary dict. `--pipelining [--rtts-ms 0,10,20,50,100]
[--ahead-blocks 2] [--guess-match P] [--k-max 0]` runs the pipelining sweep instead (issue 16:
`simulate_sweep.pipelining_sweep`): send-ahead and local pre-drafting against the same policies
without pipelining, per round trip; `DIR/simulate.json`, `DIR/table.md`, `DIR/pipelining.png`.

The round loop is `device.generate.speculative_generate`'s, with the models replaced by the trace:
`decide(limit)` -> cap = min(k_max if gated else k_ref, limit) -> drafts one by one, the gate seeing
each draft's recorded entropy (a draft whose drafter argmax is eos ends the block first, unseen by
the gate, as in `Drafter.draft`) -> accepted = leading agreements from the block's start, capped at
the block -> a `Telemetry` with every field the real loop fills -> `observe`, whose Q goes back
into the telemetry. One policy object lives through all of a device's generations, as in the CLI.

Pipelining (`Spec.pipeline`, as `gelato-device --pipeline`):
- `local` (`device.generate._verify_pipelined`): while a block's verdict is in flight the device
  drafts after it, one token at a time, up to `Policy.predraft_depth` tokens, its own eos, or the
  token in progress when the verdict arrives (drafting past the verdict delays the next round).
  A hit — every draft accepted and the first pre-drafted token the target's — starts the next
  block with the rest (no forward for those; the stop rule still sees them); else they are wasted.
- `send-ahead` (`device.pipeline.pipelined_generate`) on a simulated clock: the device drafts one
  thing at a time; while the oldest verdict is out it drafts the next block of the chain (the guess
  of the previous block's target token + the drafts: one forward more than the drafts) when
  `Policy.send_ahead(decision, Π p_hit of the blocks in flight)` says so, up to `ahead_blocks` past
  the awaited one, and sends it; a block drafted while its chain's miss came back is dropped
  unsent. Each block travels half the round trip (+ its transfer) up, the edge verifies one
  block at a time in stream order (a stale block — one after a miss — is answered at once,
  without compute) and the verdict travels half the round trip down, in order. A hit (parent fully
  accepted, guess right) continues the chain; a miss makes the blocks in flight after it stale.
  Each verdict is one round of telemetry, as the real loop records it: t_round = time since the
  previous verdict, t_draft = the block's own drafting, t_net = its own transport (sent to
  answered, less the edge's compute: waiting behind its parent on the edge included), energy =
  P_draft·(all drafting in the interval) + P_wait·(the rest) + radio of its bytes and of the
  blocks it made stale (their verdicts' bytes charged to the next round), no drafting-meter
  reading (e_draft_j NaN), wasted tokens and the real loop's estimate of their J.
- Whether a guess is right: by default the trace's teacher-forced agreement at that position (the
  guess follows a fully accepted block, i.e. the true prefix: exact for greedy traces, like the
  acceptance itself); `RoundModel(guess_match=p)` draws it with probability p instead (a what-if).
  The simulated waste (`wasted_j_per_token`) is the drafting time of every dropped token × P_draft.

Approximations (documented, not hidden):
- After a block's first disagreement the real drafter continues on its own (rejected) token; the
  trace has the teacher-forced entropy there instead. It only changes where such a block stops,
  among drafts that are rejected whatever happens (their cost is charged all the same).
- A generation ends when the trace's n tokens are emitted; a round may draft at most up to
  position n − 2 (as `max_new_tokens` = n would allow). For a trace that ended in eos the real
  loop could also draft at and past the eos position (rejected drafts, or the drafter's own eos
  ending the block): one last round's drafts at most.
- Round time: t = t_draft(k) + t_edge(k)·edge_load + rtt + jitter + transfer(bytes); device energy
  = P_draft·t_draft + P_wait·(t − t_draft) + radio(bytes). No edge contention between devices.
- Energy is the rounds' (what the real loop's telemetry and the deficit queue see); the radio's
  per-generation tail and the session open/close messages are not charged.
- Powers: P_draft defaults to the cpu-model `phone` profile's active + idle W (2.0 + 0.5 = 2.5 W:
  that meter charges idle power over the drafting time too), P_wait to its idle 0.5 W.
- Controller CPU time (decide, gate, observe) is measured and reported per round, but not added to
  the simulated time, so a run is deterministic given its seed.
- Pipelining: a chain never projects past the trace's n tokens (the real loop's limit is
  `max_new_tokens`, so past a target eos it may send one more block, stale or wasted); pre-drafts
  stop at position n − 1; drafting a token costs the same whether it is a draft, a guess or a
  pre-draft (the fitted per-token time; the intercept once per block).
The `oracle` bound drafts exactly the run of tokens the target will accept (capped at the edge's
block limit), so it never wastes a draft and never ends a round early; same cost model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from device.policy import PIPELINE_MODES, Gate, Policy, PolicyOptions, parse_policy
from gelato.controller import Decision
from gelato.power import PROFILES, RadioProfile, radio_profile
from gelato.types import DraftBlock, Telemetry

DEFAULT_MAX_DRAFT = 32  # the edge's --max-draft-tokens


@dataclass(frozen=True)
class Trace:
    entropy: tuple[float, ...]
    run: tuple[int, ...]  # run[t]: agreements in a row from output position t
    eos_at: frozenset[int]  # positions where the drafter's argmax is eos
    n: int
    prompt_len: int


def agree_runs(agree: list[int]) -> tuple[int, ...]:
    """run[t] = number of consecutive agreements starting at t (the accepted drafts of an
    unbounded block starting there)."""
    run = [0] * (len(agree) + 1)
    for t in range(len(agree) - 1, -1, -1):
        run[t] = run[t + 1] + 1 if agree[t] else 0
    return tuple(run[:-1])


def fit_line(points: dict[str, float]) -> tuple[float, float]:
    xs, ys = [float(k) for k in points], list(points.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    return my - b * mx, b


@dataclass(frozen=True)
class Costs:
    """Measured per-round costs (from the traces file): linear in the drafted tokens k."""

    draft_intercept_s: float
    draft_per_token_s: float
    edge0_s: float
    edge_per_token_s: float
    up_base_bytes: float
    up_per_token_bytes: float
    down_bytes: float

    @classmethod
    def from_json(cls, c: dict[str, Any]) -> Costs:
        # A least-squares line over the verify table (minimum over reps): smooth in k, free of the
        # shared machine's interference spikes; the raw table stays in the traces file.
        e0, e1 = fit_line(c["verify_s"]["min"])
        d, b = c["draft_s"], c["bytes"]
        return cls(
            max(d["intercept"], 0.0),
            d["per_token"],
            max(e0, 0.0),
            max(e1, 0.0),
            b["up_base"],
            b["up_per_token"],
            b["down"],
        )


def load_traces(path: Path) -> tuple[list[Trace], Costs, dict[str, Any]]:
    """The traces, the cost profile and the file's metadata (everything but the prompts)."""
    data = json.loads(Path(path).read_text())
    traces = [
        Trace(tuple(p["entropy"]), agree_runs(p["agree"]), frozenset(p.get("drafter_eos", ())), p["n"], p["prompt_len"])
        for p in data["prompts"]
        if p["n"] > 0
    ]
    if not traces:
        raise ValueError(f"{path}: no non-empty trace")
    meta = {k: v for k, v in data.items() if k != "prompts"}
    return traces, Costs.from_json(data["costs"]), meta


@dataclass(frozen=True)
class Channel:
    """The device and its link. Powers default to the cpu-model `phone` profile: drafting keeps a
    core busy (active + idle W), waiting draws idle W."""

    rtt_s: float = 0.020
    jitter_s: float = 0.0  # uniform ± this, per round
    radio: RadioProfile | None = field(default_factory=lambda: radio_profile("wifi"))
    p_draft_w: float = PROFILES["phone"].active_w_per_core + PROFILES["phone"].idle_w
    p_wait_w: float = PROFILES["phone"].idle_w
    edge_load: float = 1.0  # multiplies the edge's verify time (a loaded edge)
    max_draft: int = DEFAULT_MAX_DRAFT
    context_limit: int = 1024


class RoundModel:
    """What one round of k drafts costs: (telemetry fields) given a jitter draw. `guess_match`:
    send-ahead and pre-drafting only — None (default): whether the drafter's guess of the
    target's token after a fully accepted block is right comes from the trace (its teacher-forced
    agreement at that position: exact for greedy traces); a number p: right with probability p,
    drawn per guess (seeded), whatever the trace says there (a what-if knob)."""

    def __init__(self, costs: Costs, channel: Channel, guess_match: float | None = None) -> None:
        self.costs, self.ch, self.guess_match = costs, channel, guess_match

    def draft_s(self, forwards: int) -> float:
        """Drafting time of `forwards` drafter forwards (one per draft; a send-ahead block's guess
        is one more)."""
        c = self.costs
        return c.draft_intercept_s + c.draft_per_token_s * forwards if forwards > 0 else 0.0

    def edge_s(self, k: int) -> float:
        return (self.costs.edge0_s + self.costs.edge_per_token_s * k) * self.ch.edge_load

    def wire(self, ids: int) -> tuple[int, int]:
        """Wire bytes (up, down) of a block carrying `ids` token ids, and of its verdict."""
        c = self.costs
        return round(c.up_base_bytes + c.up_per_token_bytes * ids), round(c.down_bytes)

    def delays(self, up: int, down: int, rng: random.Random) -> tuple[float, float]:
        """One-way transport (up, down) of a block and its verdict: half the round trip (with one
        jitter draw) each way, plus the transfer times."""
        ch = self.ch
        t_up, t_down = ch.radio.transfer_s(up, down) if ch.radio else (0.0, 0.0)
        jitter = rng.uniform(-ch.jitter_s, ch.jitter_s) if ch.jitter_s else 0.0
        rtt = max(ch.rtt_s + jitter, 0.0)
        return rtt / 2 + t_up, rtt / 2 + t_down

    def radio_j(self, up: int, down: int) -> float:
        return self.ch.radio.round_energy_j(up, down) if self.ch.radio else 0.0

    def energy(self, t_round: float, t_busy: float, up: int, down: int) -> tuple[float, float, float]:
        """(compute, radio, total) J of an interval of `t_round` s with `t_busy` s of drafting."""
        ch = self.ch
        e_compute = ch.p_draft_w * t_busy + ch.p_wait_w * (t_round - t_busy)
        e_radio = self.radio_j(up, down)
        return e_compute, e_radio, e_compute + e_radio

    def telemetry(self, r: int, k: int, accepted: int, rng: random.Random, **view: Any) -> Telemetry:
        """`view`: the controller's fields (k_ref, k_max, stop_reason, entropies, p_accept)."""
        t_draft, t_edge = self.draft_s(k), self.edge_s(k)
        up, down = self.wire(k)
        one_up, one_down = self.delays(up, down, rng)
        t_net = one_up + one_down
        t_round = t_draft + t_edge + t_net
        e_compute, e_radio, e_j = self.energy(t_round, t_draft, up, down)
        return Telemetry(
            round=r,
            k=k,
            accepted=accepted,
            emitted=accepted + 1,
            t_round_s=t_round,
            t_draft_s=t_draft,
            t_net_s=t_net,
            t_edge_queue_s=0.0,
            t_edge_compute_s=t_edge,
            e_compute_j=e_compute,
            e_draft_j=self.ch.p_draft_w * t_draft,  # the real loop reads the meter when drafting ends
            e_radio_j=e_radio,
            e_j=e_j,
            bytes_up=up,
            bytes_down=down,
            energy_source="simulated",
            energy_kind="estimated",
            **view,
        )


@dataclass(frozen=True)
class Spec:
    """One simulated policy: a `parse_policy` name (or `oracle`) and its options. `pipeline`:
    off, local (pre-drafting while a verdict is in flight) or send-ahead (a chain of blocks in
    flight, at most `ahead_blocks` past the awaited one), as `gelato-device --pipeline`."""

    policy: str
    budget: float | None = None  # ē, J/token
    v: float = PolicyOptions.v
    tau: float = PolicyOptions.entropy_threshold
    lam: float = PolicyOptions.adaedl_lambda
    k_max: int = 0
    pipeline: str = "off"
    ahead_blocks: int = PolicyOptions.ahead_blocks

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINE_MODES:
            raise ValueError(f"pipeline must be one of {', '.join(PIPELINE_MODES)}, not {self.pipeline!r}")
        if self.policy == "oracle" and self.pipeline != "off":
            raise ValueError("the oracle is not pipelined")

    @property
    def label(self) -> str:
        extra = {"entropy": f" τ={self.tau:g}", "adaedl": f" λ={self.lam:g}"}.get(self.policy, "")
        if self.budget is not None:
            extra += f" ē={self.budget * 1e3:.2f}mJ V={self.v:g}"
        if self.pipeline != "off":
            extra += f" +{self.pipeline}"
        if self.pipeline == "send-ahead" and self.ahead_blocks != PolicyOptions.ahead_blocks:
            extra += f" ahead={self.ahead_blocks}"
        return self.policy + extra

    def make(self) -> Policy | None:
        if self.policy == "oracle":
            return None
        opts = PolicyOptions(
            k_max=self.k_max,
            budget_j_per_token=self.budget,
            v=self.v,
            entropy_threshold=self.tau,
            adaedl_lambda=self.lam,
            pipeline=self.pipeline,
            ahead_blocks=self.ahead_blocks,
        )
        return parse_policy(self.policy, opts)


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
    sent_ahead: int = 0
    stale: int = 0
    unsent: int = 0  # send-ahead blocks drafted, then dropped unsent (the verdict came meanwhile: a miss)
    predrafted_rounds: int = 0
    predraft_full: int = 0  # of those, rounds whose block was fully accepted (the guess decides)
    predraft_hits: int = 0
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
        self.sent_ahead += tele.sent_ahead
        self.stale += tele.stale_blocks
        if tele.predrafted:
            self.predrafted_rounds += 1
            self.predraft_full += tele.accepted == tele.k
            self.predraft_hits += tele.predraft_hit


def _block_end(reason: str, cap: int, wanted: int, gated: bool) -> str:
    """`device.generate.block_end`, the same rule."""
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
        if pos + k - 1 in trace.eos_at:
            reason = "eos"  # the drafter stops after its own eos, before asking the gate
        elif gate is not None:
            t0 = time.perf_counter()
            reason = gate(k, h, None) or ""
            gate_s += time.perf_counter() - t0
    return k, reason, gate_s


@dataclass
class _Block:
    """A block of the send-ahead chain: drafts at output positions pos..pos+k-1 (an ahead block's
    guess sits at pos − 1), and its timeline."""

    pos: int
    k: int
    reason: str
    decision: Decision
    gate: Gate | None
    cap: int
    wanted: int
    draft_s: float
    ahead: bool  # sent before its parent's verdict, with a guess
    guess_ok: bool  # its guess is the target's token (always True for a block that is not ahead)
    verified: bool  # the edge verifies it (every block before it in the chain a hit); else stale
    view: DraftBlock  # what `Policy.p_hit` sees (the drafts' entropies)
    sent_at: float = 0.0
    edge_s: float = 0.0
    verdict_at: float = 0.0
    up: int = 0
    down: int = 0


@dataclass
class _Wire:
    """One session's ordered stream: the edge verifies its blocks one after another."""

    up_last: float = 0.0  # when the last block reached the edge
    edge_free: float = 0.0  # when the edge finished the last block
    verdict_last: float = 0.0  # when the last verdict reached the device


def _chain_hit(trace: Trace, block: _Block, successor: _Block) -> bool:
    """`device.pipeline._hit`: `block` fully accepted and the guess of `successor` right."""
    return min(trace.run[block.pos], block.k) == block.k and successor.guess_ok


class Device:
    """One simulated device: a persistent policy (None: the oracle) over back-to-back generations."""

    def __init__(self, policy: Policy | None, model: RoundModel, seed: int, q_every_s: float = 0.0) -> None:
        self.policy, self.model = policy, model
        self.jitter_rng = random.Random(seed * 7919 + 1)
        self.guess_rng = random.Random(seed * 7919 + 2)
        self.totals = Totals()
        self.q_every_s, self._next_q_sample = q_every_s, 0.0
        self.pipeline = policy.options.pipeline if policy is not None else "off"
        self._carry = 0  # local: pre-drafted tokens that start the next block (after a hit)

    def generate(self, trace: Trace) -> None:
        self.totals.generations += 1
        if self.pipeline == "send-ahead":
            self._generate_chain(trace)
            return
        pos, r = 0, 0
        self._carry = 0
        while pos < trace.n:
            limit = self._limit(trace, pos)
            if limit < 0:
                return  # context_limit: the real loop stops here too
            tele = self._round(trace, pos, r, limit)
            pos += tele.emitted
            r += 1

    def _limit(self, trace: Trace, pos: int) -> int:
        """Drafts allowed in a block whose first draft is at `pos` (`device.pipeline._limit`);
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

    def _round(self, trace: Trace, pos: int, r: int, limit: int) -> Telemetry:
        if self.policy is None:  # the oracle: exactly the run the target will accept
            k = min(trace.run[pos], limit)
            tele = self.model.telemetry(r, k, k, self.jitter_rng)
            self._record(tele, 0.0)
            return tele
        policy = self.policy
        t0 = time.perf_counter()
        decision = policy.decide(limit)
        gate = policy.gate(decision)
        ctrl = time.perf_counter() - t0
        wanted = decision.k_max if gate else decision.k_ref
        cap = max(0, min(wanted, limit))
        k, reason, gate_s = _draft(trace, pos, cap, gate)
        view = {
            "k_ref": decision.k_ref,
            "k_max": cap,
            "stop_reason": _block_end(reason, cap, wanted, gate is not None),
            "entropies": trace.entropy[pos : pos + k],
            "p_accept": tuple(gate.p_accept) if gate else (),
        }
        accepted = min(trace.run[pos], k)
        if self.pipeline == "local":
            t0 = time.perf_counter()
            depth = policy.predraft_depth(decision, DraftBlock(r, (0,) * k, entropies=trace.entropy[pos : pos + k]))
            ctrl += time.perf_counter() - t0
            tele = self._local_round(trace, pos, r, k, accepted, depth, view)
        else:
            tele = self.model.telemetry(r, k, accepted, self.jitter_rng, **view)
            self.totals.busy_s += tele.t_draft_s
        t0 = time.perf_counter()
        q = policy.observe(tele)
        self.totals.controller_s += ctrl + gate_s + time.perf_counter() - t0
        tele = replace(tele, q_deficit_j=q)  # as the real loop records it
        self._record(tele, q)
        return tele

    def _local_round(
        self, trace: Trace, pos: int, r: int, k: int, accepted: int, depth: int, view: dict[str, Any]
    ) -> Telemetry:
        """`--pipeline local` (`device.generate._verify_pipelined`): the block's first `carried`
        drafts come from the previous round's pre-draft (no forward); while the verdict is in
        flight the device drafts after the block, one token at a time, until the verdict arrives
        (the token in progress is finished), `depth` tokens or its own eos. A hit (every draft
        accepted, the first pre-drafted token the target's) carries the rest into the next block."""
        m, c = self.model, self.model.costs
        carried, self._carry = min(k, self._carry), 0
        t_draft = m.draft_s(k - carried)
        t_edge = m.edge_s(k)
        up, down = m.wire(k)
        one_up, one_down = m.delays(up, down, self.jitter_rng)
        wait = t_edge + one_up + one_down
        pre = 0
        if depth > 0 and k > 0 and pos + k - 1 not in trace.eos_at and c.draft_per_token_s > 0:
            # Tokens started before the verdict arrives, within the trace (positions < n).
            pre = min(depth, math.ceil(wait / c.draft_per_token_s), trace.n - pos - k)
            eos = next((j for j in range(pre) if pos + k + j in trace.eos_at), None)
            pre = pre if eos is None else eos + 1  # the pre-draft stops after the drafter's eos
        pre_s = pre * c.draft_per_token_s
        t_round = t_draft + max(wait, pre_s)
        hit = pre > 0 and accepted == k and self._guess_ok(trace, pos + k)
        if hit:
            self._carry = pre - 1
        else:
            self._waste(pre, pre_s)
        e_compute, e_radio, e_j = m.energy(t_round, t_draft + pre_s, up, down)
        self.totals.busy_s += t_draft + pre_s
        return Telemetry(
            round=r,
            k=k,
            accepted=accepted,
            emitted=accepted + 1,
            t_round_s=t_round,
            t_draft_s=t_draft,
            t_net_s=t_round - t_draft - t_edge,
            t_edge_queue_s=0.0,
            t_edge_compute_s=t_edge,
            e_compute_j=e_compute,
            e_draft_j=m.ch.p_draft_w * t_draft,
            e_radio_j=e_radio,
            e_j=e_j,
            bytes_up=up,
            bytes_down=down,
            energy_source="simulated",
            energy_kind="estimated",
            predrafted=pre,
            predraft_hit=hit,
            carried=carried,
            **view,
        )

    def _waste(self, tokens: int, drafting_s: float) -> None:
        self.totals.wasted_tokens += tokens
        self.totals.wasted_j += drafting_s * self.model.ch.p_draft_w

    # ---------------------------------------------------------------- send-ahead

    def _generate_chain(self, trace: Trace) -> None:
        """`device.pipeline.pipelined_generate` on the trace, on a simulated clock: a chain of
        blocks in flight over one ordered stream. The device drafts one thing at a time; the edge
        verifies one block at a time in stream order (a stale block is answered at once, without
        compute); each block and verdict takes half the round trip (plus its transfer) one way."""
        assert self.policy is not None
        policy, m = self.policy, self.model
        max_ahead = policy.options.ahead_blocks
        wire = _Wire()
        chain: deque[_Block] = deque()
        now = last = 0.0  # the device's clock; the previous verdict's time
        busy = 0.0  # drafting seconds since the previous verdict
        pos, r = 0, 0
        unsent, unsent_s, stale_down = 0, 0.0, 0
        while pos < trace.n:
            if not chain:
                limit = self._limit(trace, pos)
                if limit < 0:
                    return
                block, cost_s = self._chain_block(trace, pos, limit, r, None)
                now, busy = now + block.draft_s, busy + block.draft_s
                self.totals.controller_s += cost_s
                self._send(block, now, wire)
                chain.append(block)
            while chain[0].verdict_at > now and len(chain) <= max_ahead:
                prev = chain[-1]
                nxt = prev.pos + prev.k + 1
                limit = self._limit(trace, nxt)
                if prev.reason == "eos" or limit < 0:
                    break  # the chain ends at an eos or at the generation's limits
                t0 = time.perf_counter()
                decision = policy.decide(limit)
                p_chain = math.prod(policy.p_hit(b.view) for b in chain)
                go = policy.send_ahead(decision, p_chain)
                self.totals.controller_s += time.perf_counter() - t0
                if not go:
                    break
                block, cost_s = self._chain_block(trace, nxt, limit, r + len(chain), (prev, decision))
                now, busy = now + block.draft_s, busy + block.draft_s
                self.totals.controller_s += cost_s
                if chain[0].verdict_at <= now:  # the verdict came while drafting: still worth sending?
                    after = chain[1] if len(chain) > 1 else block
                    if not _chain_hit(trace, chain[0], after):
                        unsent, unsent_s = unsent + block.k + 1, unsent_s + block.draft_s
                        self.totals.unsent += 1
                        break
                self._send(block, now, wire)
                chain.append(block)
            now = max(now, chain[0].verdict_at)
            sent = chain.popleft()
            successor = chain[0] if chain else None
            hit = successor is not None and _chain_hit(trace, sent, successor)
            cut = [] if hit else list(chain)
            if cut:
                chain.clear()
            wasted = sum(b.k + 1 for b in cut) + unsent
            self._waste(wasted, sum(b.draft_s for b in cut) + unsent_s)
            unsent, unsent_s = 0, 0.0
            accepted = min(trace.run[sent.pos], sent.k)
            emitted = min(accepted + 1, trace.n - pos)
            up = sent.up + sum(b.up for b in cut)
            down, stale_down = sent.down + stale_down, sum(b.down for b in cut)
            t_round = now - last
            e_compute, e_radio, e_j = m.energy(t_round, busy, up, down)
            self.totals.busy_s += busy
            cost = policy.controller.cost.model()
            d, gate = sent.decision, sent.gate
            tele = Telemetry(
                round=r,
                k=sent.k,
                accepted=accepted,
                emitted=emitted,
                t_round_s=t_round,
                t_draft_s=sent.draft_s,
                t_net_s=max(0.0, sent.verdict_at - sent.sent_at - sent.edge_s),
                t_edge_queue_s=0.0,
                t_edge_compute_s=sent.edge_s,
                e_compute_j=e_compute,
                e_radio_j=e_radio,
                e_j=e_j,
                bytes_up=up,
                bytes_down=down,
                energy_source="simulated",
                energy_kind="estimated",
                k_ref=d.k_ref,
                k_max=sent.cap,
                stop_reason=_block_end(sent.reason, sent.cap, sent.wanted, gate is not None),
                entropies=sent.view.entropies,
                p_accept=tuple(gate.p_accept) if gate else (),
                predrafted=successor.k + 1 if successor is not None else 0,
                predraft_hit=hit,
                sent_ahead=sent.ahead,
                stale_blocks=len(cut),
                wasted_tokens=wasted,
                wasted_j=wasted * cost.t_draft_s * cost.p_draft_w,  # the real loop's estimate
            )
            t0 = time.perf_counter()
            q = policy.observe(tele)
            self.totals.controller_s += time.perf_counter() - t0
            tele = replace(tele, q_deficit_j=q)
            self._record(tele, q)
            pos, r, last, busy = pos + emitted, r + 1, now, 0.0

    def _chain_block(
        self, trace: Trace, pos: int, limit: int, r: int, ahead: tuple[_Block, Decision] | None
    ) -> tuple[_Block, float]:
        """Draft a block whose first draft is at `pos`: an ordinary one (`ahead` None: decided
        here) or one sent ahead after `ahead`'s block with its decision (`Drafter.draft_after`:
        the guess of the parent's target token at pos − 1, one forward more, then the drafts; a
        guess that is the drafter's eos gets none). Returns it and the controller's seconds."""
        policy = self.policy
        assert policy is not None
        t0 = time.perf_counter()
        decision = policy.decide(limit) if ahead is None else ahead[1]
        gate = policy.gate(decision)
        ctrl = time.perf_counter() - t0
        wanted = decision.k_max if gate else decision.k_ref
        cap = max(0, min(wanted, limit))
        if ahead is not None and pos - 1 in trace.eos_at:
            k, reason, gate_s = 0, "eos", 0.0
        else:
            k, reason, gate_s = _draft(trace, pos, cap, gate)
        view = DraftBlock(r, (0,) * k, entropies=trace.entropy[pos : pos + k])
        if ahead is None:
            guess_ok = verified = True
            draft_s = self.model.draft_s(k)
        else:
            parent = ahead[0]
            guess_ok = self._guess_ok(trace, pos - 1)
            verified = parent.verified and min(trace.run[parent.pos], parent.k) == parent.k and guess_ok
            draft_s = self.model.draft_s(k + 1)  # the guess is one forward more
        block = _Block(
            pos, k, reason, decision, gate, cap, wanted, draft_s, ahead is not None, guess_ok, verified, view
        )
        return block, ctrl + gate_s

    def _send(self, block: _Block, now: float, wire: _Wire) -> None:
        """Put `block` on the stream at `now`: when the edge has it, verifies it (or answers stale:
        its parent missed) and when its verdict is back, in stream order."""
        m = self.model
        block.sent_at = now
        block.up, block.down = m.wire(block.k + block.ahead)  # an ahead block carries its guess
        one_up, one_down = m.delays(block.up, block.down, self.jitter_rng)
        wire.up_last = max(wire.up_last, now + one_up)
        start = max(wire.up_last, wire.edge_free)
        block.edge_s = m.edge_s(block.k) if block.verified else 0.0
        wire.edge_free = start + block.edge_s
        wire.verdict_last = block.verdict_at = max(wire.verdict_last, wire.edge_free + one_down)

    def _record(self, tele: Telemetry, q: float) -> None:
        self.totals.add(tele, q)
        if self.q_every_s and self.totals.time_s >= self._next_q_sample:
            self.totals.q_trace.append((round(self.totals.time_s, 3), round(q, 5)))
            self._next_q_sample += self.q_every_s


def run_device(
    spec: Spec, traces: list[Trace], model: RoundModel, tokens: int, seed: int, q_every_s: float = 0.0
) -> Totals:
    """Generations back to back until `tokens` are emitted (the last one finishes). The prompt
    order depends on the seed only, so every policy on a device replays the same generations."""
    order = random.Random(seed)
    device = Device(spec.make(), model, seed, q_every_s)
    while device.totals.tokens < tokens:
        device.generate(traces[order.randrange(len(traces))])
    return device.totals


def summarize(spec: Spec, per_device: list[Totals]) -> dict[str, Any]:
    tok = sum(d.tokens for d in per_device)
    t = sum(d.time_s for d in per_device)
    e = sum(d.energy_j for d in per_device)
    rounds = sum(d.rounds for d in per_device)
    drafted = sum(d.drafted for d in per_device)
    return {
        "label": spec.label,
        "policy": spec.policy,
        "budget_j_per_token": spec.budget,
        "v": spec.v if spec.budget is not None else None,
        "tau": spec.tau if spec.policy == "entropy" else None,
        "lambda": spec.lam if spec.policy == "adaedl" else None,
        "devices": len(per_device),
        "tokens": tok,
        "tokens_per_s": tok / t,  # ratio of sums
        "fleet_tokens_per_s": sum(d.tokens / d.time_s for d in per_device),
        "j_per_token": e / tok,
        "mean_q_j": sum(d.q_sum for d in per_device) / rounds,
        "final_q_j": sum(d.q_final for d in per_device) / len(per_device),
        "max_q_j": max(d.q_max for d in per_device),
        "mean_draft_len": drafted / rounds,
        "acceptance": sum(d.accepted for d in per_device) / drafted if drafted else None,  # JSON has no NaN
        "rounds": rounds,
        "generations": sum(d.generations for d in per_device),
        "controller_us_per_round": sum(d.controller_s for d in per_device) / rounds * 1e6,
        "controller_share": sum(d.controller_s for d in per_device) / t,
        "pipeline": spec.pipeline,
        **pipeline_stats(per_device),
        "q_trace": per_device[0].q_trace,
    }


def pipeline_stats(per_device: list[Totals]) -> dict[str, Any]:
    """Send-ahead and pre-drafting figures: hit rate of the blocks sent ahead (verified ÷
    (verified + stale); `unsent`: blocks drafted ahead but dropped before sending, the verdict
    having come meanwhile with a miss), pre-draft hit rate (of the rounds with a pre-draft or a
    successor in flight, those it started: full accept and the guess right), the guess-match rate
    (the same, of the rounds fully accepted), drafted tokens and drafting energy thrown away per
    output token, and the share of time the device spent drafting."""
    ahead, stale = sum(d.sent_ahead for d in per_device), sum(d.stale for d in per_device)
    pre, hits = sum(d.predrafted_rounds for d in per_device), sum(d.predraft_hits for d in per_device)
    full = sum(d.predraft_full for d in per_device)
    tok = sum(d.tokens for d in per_device)
    return {
        "sent_ahead": ahead,
        "stale": stale,
        "unsent": sum(d.unsent for d in per_device),
        "ahead_hit_rate": ahead / (ahead + stale) if ahead + stale else None,
        "predraft_hit_rate": hits / pre if pre else None,
        "guess_match_rate": hits / full if full else None,
        "wasted_tokens_per_token": sum(d.wasted_tokens for d in per_device) / tok,
        "wasted_j_per_token": sum(d.wasted_j for d in per_device) / tok,
        "drafting_share": sum(d.busy_s for d in per_device) / sum(d.time_s for d in per_device),
    }


def run_spec(
    spec: Spec,
    traces: list[Trace],
    model: RoundModel,
    devices: int = 1,
    tokens: int = 20000,
    seed: int = 0,
    q_every_s: float = 0.0,
) -> dict[str, Any]:
    """`devices` independent devices (device i seeded `seed·1000 + i`), summed."""
    per_device = [run_device(spec, traces, model, tokens, seed * 1000 + i, q_every_s) for i in range(devices)]
    return summarize(spec, per_device)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", type=Path, required=True, help="a benchmarks.traces JSON file")
    p.add_argument("--out", type=Path, required=True, help="folder for simulate.json, table.md and plots")
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform ± per round (seeded)")
    p.add_argument("--radio", default="wifi", help="gelato.power radio profile: wifi, lte, 5g or none")
    p.add_argument("--p-draft-w", type=float, default=Channel.p_draft_w, help="device power while drafting")
    p.add_argument("--p-wait-w", type=float, default=Channel.p_wait_w, help="device power while waiting")
    p.add_argument("--edge-load", type=float, default=1.0, help="multiplier on the edge's verify time")
    p.add_argument("--max-draft", type=int, default=DEFAULT_MAX_DRAFT, help="the edge's block limit")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--tokens-per-device", type=int, default=20000)
    p.add_argument("--budgets", type=_floats, default=(), help="ē values, J/token (default: a grid)")
    p.add_argument("--v", type=float, default=20.0, help="V of the budget sweep")
    p.add_argument("--vs", type=_floats, default=None, help="V values of the V sweep")
    p.add_argument("--v-budget", type=float, default=None, help="ē of the V sweep, J/token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    pipe = p.add_argument_group("pipelining (issue 16): --pipelining runs its sweep instead of the budget/V sweeps")
    pipe.add_argument(
        "--pipelining",
        action="store_true",
        help="per round trip in --rtts-ms: fixed-K, the fastest fixed-K pipelined, gelato off/local/send-ahead "
        "(without a budget and at the fastest fixed-K's J/token), the oracle",
    )
    pipe.add_argument("--rtts-ms", type=_floats, default=(0.0, 10.0, 20.0, 50.0, 100.0), help="round trips (ms)")
    pipe.add_argument(
        "--ahead-blocks",
        type=int,
        default=PolicyOptions.ahead_blocks,
        help=f"send-ahead: blocks in flight past the awaited one (default {PolicyOptions.ahead_blocks})",
    )
    pipe.add_argument(
        "--guess-match",
        type=float,
        default=None,
        help="P(the drafter's guess of the target's token after a full accept is right); default: from the "
        "traces (their teacher-forced agreement at that position, exact for greedy traces)",
    )
    pipe.add_argument("--k-max", type=int, default=0, help="gelato's cap in the pipelining sweep (0: --max-draft)")
    args = p.parse_args(argv)
    bad = [
        ("--rtt-ms and --jitter-ms must be >= 0", args.rtt_ms >= 0 and args.jitter_ms >= 0),
        ("--devices and --tokens-per-device must be >= 1", args.devices >= 1 and args.tokens_per_device >= 1),
        ("--edge-load must be > 0", args.edge_load > 0),
        ("--max-draft must be >= 0", args.max_draft >= 0),
        ("budgets must be > 0", all(b > 0 for b in args.budgets) and (args.v_budget or 1) > 0),
        ("--rtts-ms must be >= 0", all(r >= 0 for r in args.rtts_ms) and args.rtts_ms),
        ("--ahead-blocks must be >= 1", args.ahead_blocks >= 1),
        ("--guess-match must be in [0, 1]", args.guess_match is None or 0 <= args.guess_match <= 1),
        ("--k-max must be >= 0", args.k_max >= 0),
    ]
    for message, ok in bad:
        if not ok:
            p.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks import simulate_sweep as sw  # sweeps and plots import this module's engine

    args = parse_args(argv)
    args.command_argv = argv
    traces, costs, meta = load_traces(args.traces)
    channel = Channel(
        rtt_s=args.rtt_ms / 1e3,
        jitter_s=args.jitter_ms / 1e3,
        radio=radio_profile(args.radio),
        p_draft_w=args.p_draft_w,
        p_wait_w=args.p_wait_w,
        edge_load=args.edge_load,
        max_draft=args.max_draft,
        context_limit=meta["pair"]["context_limit"],
    )
    t0 = time.perf_counter()
    if args.pipelining:
        return pipelining_main(args, traces, costs, meta, channel, t0)
    defaults = sw.SweepConfig()
    cfg = sw.SweepConfig(
        devices=args.devices,
        tokens_per_device=args.tokens_per_device,
        seed=args.seed,
        budgets=args.budgets,
        v=args.v,
        vs=args.vs or defaults.vs,
        v_budget=args.v_budget,
    )
    result = sw.sweep(traces, RoundModel(costs, channel), cfg)
    result["channel"] = {**asdict(channel), "radio": args.radio}
    result["costs"] = asdict(costs)
    result["traces"] = {"file": args.traces.name, "prompts": len(traces), "pair": meta["pair"], "check": meta["check"]}
    result["simulated_s"] = round(time.perf_counter() - t0, 1)
    written = sw.write_outputs(result, args.out, plots=not args.no_plots)
    print(sw.markdown(result))
    print(f"simulated in {result['simulated_s']} s; wrote " + ", ".join(str(p) for p in written))
    return 0


def trace_agreement(traces: list[Trace]) -> float:
    """The traces' per-position agreement rate: P(the drafter's argmax is the target's token) over
    every position (the guess-match rate send-ahead sees is this, at the positions after a fully
    accepted block)."""
    return sum(r > 0 for t in traces for r in t.run) / sum(len(t.run) for t in traces)


def code_state() -> dict[str, Any]:
    """The commit, whether the tree had changes, and a hash of the policy/controller sources the
    simulation ran (`device/`, `gelato/`): the controller may change after the results were made."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--short", "device", "gelato"], capture_output=True, text=True).stdout
    files = sorted(p for d in ("device", "gelato") for p in (root / d).rglob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]
    return {"commit": commit, "device_gelato_changed": bool(changed.strip()), "sources_sha256_12": digest}


def pipelining_main(
    args: argparse.Namespace, traces: list[Trace], costs: Costs, meta: dict[str, Any], channel: Channel, t0: float
) -> int:
    import shlex
    import sys

    from benchmarks import simulate_sweep as sw

    cfg = sw.PipelineConfig(
        rtts_ms=args.rtts_ms,
        devices=args.devices,
        tokens_per_device=args.tokens_per_device,
        seed=args.seed,
        ahead_blocks=args.ahead_blocks,
        v=args.v,
        k_max=args.k_max,
        guess_match=args.guess_match,
    )
    result = sw.pipelining_sweep(traces, costs, channel, cfg)
    argv = sys.argv[1:] if args.command_argv is None else args.command_argv
    result["command"] = shlex.join([".venv/bin/python", "-m", "benchmarks.simulate", *argv])
    result["channel"] = {**asdict(channel), "radio": args.radio, "rtt_s": "per row"}
    result["costs"] = asdict(costs)
    result["traces"] = {
        "file": args.traces.name,
        "prompts": len(traces),
        "pair": meta["pair"],
        "check": meta["check"],
        "agreement_rate": trace_agreement(traces),
        "guess_match": "from the traces" if args.guess_match is None else args.guess_match,
    }
    result["code"] = code_state()
    result["simulated_s"] = round(time.perf_counter() - t0, 1)
    written = sw.write_pipelining_outputs(result, args.out, plots=not args.no_plots)
    print(sw.pipelining_markdown(result))
    print(f"simulated in {result['simulated_s']} s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
