"""Trace-driven fleet simulator: every draft-length policy over long horizons and many devices,
without models (fleet scale).

Contract: `python -m gelato.benchmarks.simulate --traces FILE --out DIR [--rtt-ms 20] [--devices 1]
[--tokens-per-device 20000] [--budgets J,...] [--vs V,...] [--seed 0]` replays traces recorded by
`gelato.benchmarks.traces` and writes `DIR/simulate.json`, `DIR/table.md` and PNG plots (the sweeps and
outputs are `gelato.benchmarks.simulate_sweep`); it prints the markdown table. As a library:
`load_traces(path)`, `Channel`, `RoundModel`, `Spec`, `run_spec(spec, traces, model, devices,
tokens, seed)` -> one policy's summary dict. `--pipelining [--rtts-ms 0,10,20,50,100]
[--ahead-blocks 2] [--guess-match P] [--k-max 0]` runs the pipelining sweep instead
(`simulate_pipelining.pipelining_sweep`): send-ahead and local pre-drafting against the same policies
without pipelining, per round trip; `DIR/simulate.json`, `DIR/table.md`, `DIR/pipelining.png`.

The round loop is `gelato.device.generate.speculative_generate`'s, with the models replaced by the trace:
`decide(limit)` -> cap = min(k_max if gated else k_ref, limit) -> drafts one by one, the gate seeing
each draft's recorded entropy (a draft whose drafter argmax is eos ends the block after the gate
saw it, as in `Drafter.draft`) -> accepted = leading agreements from the block's start, capped at
the block -> a `Telemetry` with every field the real loop fills -> `observe`, whose Q goes back
into the telemetry. One policy object lives through all of a device's generations, as in the CLI.

Pipelining (`Spec.pipeline`, as `gelato-device --pipeline`):
- `local` (`gelato.device.generate._verify_pipelined`): while a block's verdict is in flight the device
  drafts after it, one token at a time, up to `Policy.predraft_depth` tokens, its own eos, or the
  token in progress when the verdict arrives (drafting past the verdict delays the next round).
  A hit — every draft accepted and the first pre-drafted token the target's — starts the next
  block with the rest (no forward for those; the stop rule still sees them); else they are wasted.
- `send-ahead` (`gelato.device.pipeline.pipelined_generate`) on a simulated clock: the device drafts one
  thing at a time; while the oldest verdict is out it drafts the next block of the chain (the guess
  of the previous block's target token + the drafts: one forward more than the drafts) when
  `Policy.send_ahead(decision, Π p_hit of the blocks in flight, first)` says so (`first`: a chain's
  start, as the real loop passes it), up to `ahead_blocks` past
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
- Round time: t = t_draft(k) + t_edge(k)·edge_load + rtt + jitter + transfer(bytes), or with a local
  pre-draft t_draft(k) + max(that wait, the pre-draft: the tokens started before the verdict, the
  last one finished after it), whose overrun is the round's, not the transport's; device energy
  = P_draft·t_draft + P_wait·(t − t_draft) + radio(bytes) + the radio's connected state between
  transfers (its tail power over the drafting and over the wait, each up to the tail's time; over
  the whole round with send-ahead), as the real loop charges it. No edge contention between devices.
- Energy is the rounds' (what the real loop's telemetry and the deficit queue see); the radio's
  per-generation tail and the session open/close messages are not charged.
- Powers: P_draft defaults to the cpu-model `phone` profile's active + idle W (2.0 + 0.5 = 2.5 W:
  that meter charges idle power over the drafting time too), P_wait to its idle 0.5 W.
- Controller CPU time (decide, gate, observe) is measured and reported per round, but not added to
  the simulated time, so a run is deterministic given its seed.
- Pipelining: a chain never projects past the trace's n tokens (the real loop's limit is
  `max_new_tokens`, so past a target eos it may send one more block, stale or wasted); drafting a
  token costs the same whether it is a draft, a guess or a pre-draft (the fitted per-token time;
  the intercept once per block).
The `oracle` bound drafts exactly the run of tokens the target will accept (capped at the edge's
block limit), so it never wastes a draft and never ends a round early; same cost model.

Modules: `simulate_model` (traces, costs, channel, round model, specs), `simulate_rounds` (a
device's state and shared round rules), `simulate_device` (the round loop, local pre-drafting, the
oracle, fleet runs), `simulate_chain` (send-ahead), `simulate_sweep` and `simulate_pipelining` (the
sweeps and their outputs). This module is the CLI and re-exports the engine's names.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gelato.benchmarks.bench_plots import plots_unavailable
from gelato.benchmarks.simulate_device import Device, pipeline_stats, run_device, run_spec, summarize
from gelato.benchmarks.simulate_model import (
    DEFAULT_MAX_DRAFT,
    Channel,
    Costs,
    RoundModel,
    Spec,
    Trace,
    agree_runs,
    fit_line,
    load_traces,
)
from gelato.benchmarks.simulate_rounds import Totals
from gelato.device.policy import PolicyOptions
from gelato.power import radio_profile

__all__ = [
    "DEFAULT_MAX_DRAFT",
    "Channel",
    "Costs",
    "Device",
    "RoundModel",
    "Spec",
    "Totals",
    "Trace",
    "agree_runs",
    "code_state",
    "fit_line",
    "load_traces",
    "main",
    "parse_args",
    "pipeline_stats",
    "pipelining_main",
    "run_device",
    "run_spec",
    "summarize",
    "trace_agreement",
]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gelato.benchmarks.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", type=Path, required=True, help="a gelato.benchmarks.traces JSON file")
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
    pipe = p.add_argument_group("pipelining: --pipelining runs its sweep instead of the budget/V sweeps")
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
    no_plots_here = plots_unavailable(args.no_plots)
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
        (no_plots_here, not no_plots_here),
    ]
    for message, ok in bad:
        if not ok:
            p.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    from gelato.benchmarks import simulate_sweep as sw  # the sweeps and plots: only the CLI needs them

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
        # A fixed K above --max-draft would run as K = max-draft under another name.
        fixed_ks=tuple(k for k in defaults.fixed_ks if k <= args.max_draft),
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

    from gelato.benchmarks.provenance import ROOT as root
    from gelato.benchmarks.provenance import git_output

    commit = git_output(["rev-parse", "HEAD"])
    changed = git_output(["status", "--short", "device", "gelato"])
    files = sorted(p for d in ("device", "gelato") for p in (root / d).rglob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]
    return {"commit": commit, "device_gelato_changed": bool(changed.strip()), "sources_sha256_12": digest}


def pipelining_main(
    args: argparse.Namespace, traces: list[Trace], costs: Costs, meta: dict[str, Any], channel: Channel, t0: float
) -> int:
    import shlex
    import sys

    from gelato.benchmarks import simulate_pipelining as sp

    cfg = sp.PipelineConfig(
        rtts_ms=args.rtts_ms,
        devices=args.devices,
        tokens_per_device=args.tokens_per_device,
        seed=args.seed,
        ahead_blocks=args.ahead_blocks,
        v=args.v,
        k_max=args.k_max,
        guess_match=args.guess_match,
    )
    result = sp.pipelining_sweep(traces, costs, channel, cfg)
    argv = sys.argv[1:] if args.command_argv is None else args.command_argv
    result["command"] = shlex.join([".venv/bin/python", "-m", "gelato.benchmarks.simulate", *argv])
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
    written = sp.write_pipelining_outputs(result, args.out, plots=not args.no_plots)
    print(sp.pipelining_markdown(result))
    print(f"simulated in {result['simulated_s']} s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
