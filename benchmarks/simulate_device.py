"""The simulator's device loop and fleet runs (`gelato.benchmarks.simulate`).

Contract: `Device(policy, model, seed, q_every_s).generate(trace)` replays one generation with the
real round loop's rules (`gelato.device.generate.speculative_generate`): decide -> draft on the trace
(the gate sees each draft's recorded entropy) -> accepted = leading agreements -> `Telemetry` ->
`observe`; the oracle (policy None) drafts exactly the run the target accepts; `--pipeline local`
pre-drafts while a verdict is in flight (`_local_round`) and send-ahead is `SendAhead`'s chain.
`run_device(spec, traces, model, tokens, seed)` runs generations back to back until `tokens` are
emitted; `run_spec(spec, traces, model, devices, tokens, seed)` sums independent devices into one
summary dict (`summarize`, with `pipeline_stats`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace
from typing import Any

from gelato.benchmarks.simulate_chain import SendAhead
from gelato.benchmarks.simulate_model import RoundModel, Spec, Trace
from gelato.benchmarks.simulate_rounds import Totals, _block_end, _draft
from gelato.controller import tokens_per_s
from gelato.types import DraftBlock, Telemetry


class Device(SendAhead):
    """One simulated device: a persistent policy (None: the oracle) over back-to-back generations."""

    def generate(self, trace: Trace) -> None:
        self.totals.generations += 1
        if self.pipeline == "send-ahead":
            try:
                self._generate_chain(trace)
            finally:
                if self.policy is not None:
                    self.policy.end_chains()  # as `pipelined_generate` ends every generation
            return
        pos, r = 0, 0
        self._carry, self._guess_due = 0, None
        while pos < trace.n:
            limit = self._limit(trace, pos)
            if limit < 0:
                return  # context_limit: the real loop stops here too
            tele = self._round(trace, pos, r, limit)
            pos += tele.emitted
            r += 1

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
            # What the next block can use, as the real loop's `fits`: none past the generation's
            # last round (its round token is position n - 1); traces have no context window.
            fits = trace.n - pos - 1 - k
            block = DraftBlock(r, (0,) * k, entropies=trace.entropy[pos : pos + k])
            depth = policy.predraft_depth(decision, block, fits)
            ctrl += time.perf_counter() - t0
            tele = self._local_round(trace, pos, r, k, accepted, depth, view)
        else:
            tele = self.model.telemetry(r, k, accepted, self.jitter_rng, **view)
            self.totals.busy_s += tele.t_draft_s
        t0 = time.perf_counter()
        q = policy.observe(tele)
        self.totals.controller_s += ctrl + gate_s + time.perf_counter() - t0
        tele = replace(tele, q_deficit_j=q)  # the queue's Q (0 J with no budget; live: null)
        self._record(tele, q)
        return tele

    def _local_round(
        self, trace: Trace, pos: int, r: int, k: int, accepted: int, depth: int, view: dict[str, Any]
    ) -> Telemetry:
        """`--pipeline local` (`gelato.device.generate._verify_pipelined`): the block's first `carried`
        drafts come from the previous round's pre-draft (no forward); while the verdict is in
        flight the device drafts after the block, one token at a time, until the verdict arrives
        (the token in progress is finished), `depth` tokens or its own eos. A hit (every draft
        accepted, the first pre-drafted token the target's) carries the rest into the next block."""
        m, c = self.model, self.model.costs
        carried, self._carry = min(k, self._carry), 0
        due, self._guess_due = self._guess_due, None
        guess_hit = self._guess_ok(trace, due) if due is not None and k > carried else None
        t_draft = m.draft_s(k - carried)
        t_edge = m.edge_s(k)
        up, down = m.wire(k)
        one_up, one_down = m.delays(up, down, self.jitter_rng)
        wait = t_edge + one_up + one_down
        pre = 0
        if depth > 0 and k > 0 and pos + k - 1 not in trace.eos_at and c.draft_per_token_s > 0:
            # Tokens started before the verdict arrives, within `fits` (the caller's cap on depth).
            pre = min(depth, math.ceil(wait / c.draft_per_token_s))
            eos = next((j for j in range(pre) if pos + k + j in trace.eos_at), None)
            pre = pre if eos is None else eos + 1  # the pre-draft stops after the drafter's eos
        pre_s = pre * c.draft_per_token_s
        t_round = t_draft + max(wait, pre_s)
        hit = pre > 0 and accepted == k and self._guess_ok(trace, pos + k)
        if hit:
            self._carry = pre - 1
        else:
            self._waste(pre, pre_s)
        if pre == 0 and 0 < k == accepted:
            self._guess_due = pos + k
        gaps_s = (t_draft, t_round - t_draft)  # the block is sent when drafted, the verdict ends the round
        e_compute, e_radio, e_j = m.energy(t_round, t_draft + pre_s, up, down, gaps_s)
        self.totals.busy_s += t_draft + pre_s
        return Telemetry(
            round=r,
            k=k,
            accepted=accepted,
            emitted=accepted + 1,
            t_round_s=t_round,
            t_draft_s=t_draft,
            t_drafting_s=t_draft + pre_s,  # the pre-draft too, as the real loop records it
            # The transport alone, as the live loop measures it (to the verdict's arrival): the wait
            # for the pre-draft's last forward past it is the drafter's, not the channel's.
            t_net_s=one_up + one_down,
            t_edge_queue_s=0.0,
            t_edge_compute_s=t_edge,
            e_compute_j=e_compute,
            e_draft_j=m.ch.p_draft_w * t_draft,
            e_radio_j=e_radio,
            e_radio_link_j=m.link_j(gaps_s, up, down),
            e_j=e_j,
            bytes_up=up,
            bytes_down=down,
            energy_source="simulated",
            energy_kind="estimated",
            predrafted=pre,
            predraft_hit=hit,
            carried=carried,
            bonus_guess_hit=guess_hit,
            **view,
        )


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
    # A model with every time at 0 (fitted intercepts clamped to 0, no round trip) simulates no
    # time: rates count it as 1 ns (`tokens_per_s`), as the controller does, not a division by 0.
    t = max(sum(d.time_s for d in per_device), 1e-9)
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
        "fleet_tokens_per_s": sum(tokens_per_s(d.tokens, d.time_s) for d in per_device),
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
    """Send-ahead and pre-drafting figures: empty blocks sent ahead (`sent_empty`, K = 0: verified or
    stale, a miss before them cuts them too), hit rate of the other blocks sent ahead (verified ÷
    (verified + stale); `unsent`: blocks drafted ahead but dropped before sending, the verdict
    having come meanwhile with a miss), pre-draft hit rate (of the rounds with a pre-draft or a
    successor in flight, those it started: full accept and the guess right), the guess-match rate
    (of the fully accepted rounds whose guess was seen: pipelined, or checked by the next block as
    the controller's rate counts them), drafted tokens and drafting energy thrown away per
    output token, and the share of time the device spent drafting."""
    ahead, stale = sum(d.sent_ahead for d in per_device), sum(d.stale for d in per_device)
    pre, hits = sum(d.predrafted_rounds for d in per_device), sum(d.predraft_hits for d in per_device)
    full = sum(d.predraft_full + d.guess_checks for d in per_device)
    hits_seen = hits + sum(d.guess_check_hits for d in per_device)
    tok = sum(d.tokens for d in per_device)
    return {
        "sent_ahead": ahead,
        "sent_empty": sum(d.sent_empty for d in per_device),
        "stale": stale,
        "unsent": sum(d.unsent for d in per_device),
        "ahead_hit_rate": ahead / (ahead + stale) if ahead + stale else None,
        "predraft_hit_rate": hits / pre if pre else None,
        "guess_match_rate": hits_seen / full if full else None,
        "wasted_tokens_per_token": sum(d.wasted_tokens for d in per_device) / tok,
        "wasted_j_per_token": sum(d.wasted_j for d in per_device) / tok,
        "drafting_share": sum(d.busy_s for d in per_device) / max(sum(d.time_s for d in per_device), 1e-9),
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
