"""The simulator's inputs and cost model (`gelato.benchmarks.simulate`): traces, measured costs, the
link, what one round costs, and which policy runs.

Contract: `load_traces(path)` -> (traces, `Costs`, the file's metadata) from a `gelato.benchmarks.traces`
JSON file (`Trace.run[t]`: agreements in a row from output position t, `agree_runs`); `Costs` are
the measured per-round costs, linear in the drafted tokens (`Costs.from_json`, `fit_line`);
`Channel` is the device and its link (round trip, jitter, radio, powers, edge load, block and
context limits); `RoundModel(costs, channel, guess_match)` prices a round (drafting and verify
time, wire bytes, one-way delays with one seeded jitter draw, energy) and builds its `Telemetry`;
`Spec` is one simulated policy (a `parse_policy` name or `oracle`, its options and pipelining
mode), `Spec.make()` the policy object (None for the oracle). No simulation state lives here.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gelato.device.policy import Policy, PolicyOptions, parse_policy
from gelato.device.policy_options import PIPELINE_MODES
from gelato.power import PROFILES, RadioProfile, radio_profile
from gelato.types import Telemetry

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

    def link_j(self, gaps_s: tuple[float, ...], up: int, down: int) -> float:
        """The radio's connected state over a round's gaps between transfers (each at the tail's
        power, up to its time), less the tail power over the transfers themselves, as
        `gelato.device.energy.EnergyAccountant` charges it."""
        radio = self.ch.radio
        return radio.link_energy_j(sum(radio.gap_energy_j(g) for g in gaps_s), up, down) if radio else 0.0

    def energy(
        self, t_round: float, t_busy: float, up: int, down: int, gaps_s: tuple[float, ...] | None = None
    ) -> tuple[float, float, float]:
        """(compute, radio, total) J of an interval of `t_round` s with `t_busy` s of drafting; the
        radio's includes its connected state over `gaps_s` (default: the whole interval, one gap)."""
        ch = self.ch
        e_compute = ch.p_draft_w * t_busy + ch.p_wait_w * (t_round - t_busy)
        e_radio = self.radio_j(up, down) + self.link_j(gaps_s if gaps_s is not None else (t_round,), up, down)
        return e_compute, e_radio, e_compute + e_radio

    def telemetry(self, r: int, k: int, accepted: int, rng: random.Random, **view: Any) -> Telemetry:
        """`view`: the controller's fields (k_ref, k_max, stop_reason, entropies, p_accept)."""
        t_draft, t_edge = self.draft_s(k), self.edge_s(k)
        up, down = self.wire(k)
        one_up, one_down = self.delays(up, down, rng)
        t_net = one_up + one_down
        t_round = t_draft + t_edge + t_net
        gaps_s = (t_draft, t_round - t_draft)  # the block is sent when drafted, the verdict ends the round
        e_compute, e_radio, e_j = self.energy(t_round, t_draft, up, down, gaps_s)
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
            e_radio_link_j=self.link_j(gaps_s, up, down),
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
