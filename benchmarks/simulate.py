"""Trace-driven fleet simulator: every draft-length policy over long horizons and many devices,
without models (SPEC §6 "Fleet scale").

Contract: `python -m benchmarks.simulate --traces FILE --out DIR [--rtt-ms 20] [--devices 1]
[--tokens-per-device 20000] [--budgets J,...] [--vs V,...] [--seed 0]` replays traces recorded by
`benchmarks.traces` and writes `DIR/simulate.json`, `DIR/table.md` and PNG plots (the sweeps and
outputs are `benchmarks.simulate_sweep`); it prints the markdown table. As a library:
`load_traces(path)`, `Channel`, `RoundModel`, `Spec`, `run_spec(spec, traces, model, devices,
tokens, seed)` -> one policy's summary dict.

The round loop is `device.generate.speculative_generate`'s, with the models replaced by the trace:
`decide(limit)` -> cap = min(k_max if gated else k_ref, limit) -> drafts one by one, the gate seeing
each draft's recorded entropy (a draft whose drafter argmax is eos ends the block first, unseen by
the gate, as in `Drafter.draft`) -> accepted = leading agreements from the block's start, capped at
the block -> a `Telemetry` with every field the real loop fills -> `observe`, whose Q goes back
into the telemetry. One policy object lives through all of a device's generations, as in the CLI.

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
The `oracle` bound drafts exactly the run of tokens the target will accept (capped at the edge's
block limit), so it never wastes a draft and never ends a round early; same cost model.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from device.policy import Gate, Policy, PolicyOptions, parse_policy
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
    """What one round of k drafts costs: (telemetry fields) given a jitter draw."""

    def __init__(self, costs: Costs, channel: Channel) -> None:
        self.costs, self.ch = costs, channel

    def telemetry(self, r: int, k: int, accepted: int, rng: random.Random, **view: Any) -> Telemetry:
        """`view`: the controller's fields (k_ref, k_max, stop_reason, entropies, p_accept)."""
        c, ch = self.costs, self.ch
        t_draft = (c.draft_intercept_s + c.draft_per_token_s * k) if k else 0.0
        t_edge = (c.edge0_s + c.edge_per_token_s * k) * ch.edge_load
        up, down = round(c.up_base_bytes + c.up_per_token_bytes * k), round(c.down_bytes)
        t_up, t_down = ch.radio.transfer_s(up, down) if ch.radio else (0.0, 0.0)
        jitter = rng.uniform(-ch.jitter_s, ch.jitter_s) if ch.jitter_s else 0.0
        t_net = max(ch.rtt_s + jitter, 0.0) + t_up + t_down
        t_round = t_draft + t_edge + t_net
        e_compute = ch.p_draft_w * t_draft + ch.p_wait_w * (t_round - t_draft)
        e_radio = ch.radio.round_energy_j(up, down) if ch.radio else 0.0
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
            e_draft_j=ch.p_draft_w * t_draft,  # the real loop reads the meter when drafting ends
            e_radio_j=e_radio,
            e_j=e_compute + e_radio,
            bytes_up=up,
            bytes_down=down,
            energy_source="simulated",
            energy_kind="estimated",
            **view,
        )


@dataclass(frozen=True)
class Spec:
    """One simulated policy: a `parse_policy` name (or `oracle`) and its options."""

    policy: str
    budget: float | None = None  # ē, J/token
    v: float = PolicyOptions.v
    tau: float = PolicyOptions.entropy_threshold
    lam: float = PolicyOptions.adaedl_lambda
    k_max: int = 0

    @property
    def label(self) -> str:
        extra = {"entropy": f" τ={self.tau:g}", "adaedl": f" λ={self.lam:g}"}.get(self.policy, "")
        if self.budget is not None:
            extra += f" ē={self.budget * 1e3:.2f}mJ V={self.v:g}"
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


def _block_end(reason: str, cap: int, wanted: int, gated: bool) -> str:
    """`device.generate._block_end`, the same rule."""
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


class Device:
    """One simulated device: a persistent policy (None: the oracle) over back-to-back generations."""

    def __init__(self, policy: Policy | None, model: RoundModel, seed: int, q_every_s: float = 0.0) -> None:
        self.policy, self.model = policy, model
        self.jitter_rng = random.Random(seed * 7919 + 1)
        self.totals = Totals()
        self.q_every_s, self._next_q_sample = q_every_s, 0.0

    def generate(self, trace: Trace) -> None:
        pos, r = 0, 0
        self.totals.generations += 1
        while pos < trace.n:
            room = self.model.ch.context_limit - (trace.prompt_len + pos) - 1
            if room < 0:
                return  # context_limit: the real loop stops here too
            limit = max(0, min(trace.n - pos - 1, room, self.model.ch.max_draft))
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
        tele = self.model.telemetry(r, k, min(trace.run[pos], k), self.jitter_rng, **view)
        t0 = time.perf_counter()
        q = policy.observe(tele)
        self.totals.controller_s += ctrl + gate_s + time.perf_counter() - t0
        tele = replace(tele, q_deficit_j=q)  # as the real loop records it
        self._record(tele, q)
        return tele

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
        "q_trace": per_device[0].q_trace,
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
    args = p.parse_args(argv)
    bad = [
        ("--rtt-ms and --jitter-ms must be >= 0", args.rtt_ms >= 0 and args.jitter_ms >= 0),
        ("--devices and --tokens-per-device must be >= 1", args.devices >= 1 and args.tokens_per_device >= 1),
        ("--edge-load must be > 0", args.edge_load > 0),
        ("--max-draft must be >= 0", args.max_draft >= 0),
        ("budgets must be > 0", all(b > 0 for b in args.budgets) and (args.v_budget or 1) > 0),
    ]
    for message, ok in bad:
        if not ok:
            p.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    from benchmarks import simulate_sweep as sw  # sweeps and plots import this module's engine

    args = parse_args(argv)
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
    t0 = time.perf_counter()
    result = sw.sweep(traces, RoundModel(costs, channel), cfg)
    result["channel"] = {**asdict(channel), "radio": args.radio}
    result["costs"] = asdict(costs)
    result["traces"] = {"file": args.traces.name, "prompts": len(traces), "pair": meta["pair"], "check": meta["check"]}
    result["simulated_s"] = round(time.perf_counter() - t0, 1)
    written = sw.write_outputs(result, args.out, plots=not args.no_plots)
    print(sw.markdown(result))
    print(f"simulated in {result['simulated_s']} s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
