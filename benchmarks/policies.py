"""Controller benchmark: every draft policy over an emulated Wi-Fi round trip.

Contract: `python -m gelato.benchmarks.policies [--n 20] [--one-way-ms 10] [--out DIR] [--policies LIST]
[--budgets J,J,...]` starts one `gelato-edge` (built-in target, pinned to CPU 0 when there are ≥ 2),
one `gelato.benchmarks.delay_proxy` process in front of it (CPU 0 too: it works only while a message is in
flight, when neither side computes) and, per policy, one `gelato-device` on CPU 1 that reaches the
edge THROUGH the proxy. Greedy, built-in drafter, the first N GSM8K test questions, 128 new tokens,
cpu-model meter with the `--device-profile` (default `phone`) + the `--radio` model (default `wifi`)
(an ESTIMATE, named so with its profile and radio in every output: `energy_note`), `--k-max 8` for
every adaptive policy (the range of the fixed-K sweep).

Order: fixed-0..8; then the budgets ē = the smallest fixed-K device J/token × `--budget-factors`
(1.0, 1.1, 1.25, 1.5) unless `--budgets` names them; then heuristic, entropy (τ), adaedl (λ), and
lyapunov and gelato without a budget and at every ē. Per run: tokens/s (ratio of sums over
prompts), device J/token (Σ energy / Σ tokens), the controller's long-run J/token and final Q (one
controller per device run), acceptance, mean draft length, rounds, block stop reasons, and exact
match of every output against fixed-0's (losslessness: a difference is printed loudly, exit 1).
Per budget: gelato's and lyapunov's tokens/s ÷ the fastest fixed-K with J/token ≤ ē, and whether
their J/token ≤ 1.05 ē (`policies_report`). `--repeats R`: the whole list R times in a row (ē from
the first fixed-K sweep), each repeat judged on its own runs, and the medians of those per-repeat
ratios reported: the runs are sequential and the machine drifts, so a budget taken from a fixed-K
run long before the controller's makes it look better or worse than it is. Writes
`results.json`, `results.md` and gzipped per-round traces under `--out`, with the exact command,
the machine and the measured round trip (gRPC Info through the proxy minus direct).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gelato.benchmarks.bench_run import answered_rounds
from gelato.benchmarks.delay_proxy import ProxyProcess, grpc_info_rtt, rtt_summary
from gelato.benchmarks.policies_report import compare_budgets, markdown, over_repeats, print_run
from gelato.benchmarks.procs import check_energy_source, child_env, machine, start_edge, unique_label
from gelato.benchmarks.provenance import git_output
from gelato.tiny.train import gsm8k_file

DEFAULT_POLICIES = ",".join([*(f"fixed-{k}" for k in range(9)), "heuristic", "entropy", "adaedl", "lyapunov", "gelato"])


@dataclass(frozen=True)
class RunSpec:
    """One device process: a policy and its flags. `slug` names its trace file."""

    label: str
    policy: str
    family: str
    flags: tuple[str, ...] = ()
    budget: float | None = None
    repeat: int = 0  # 1.. with `--repeats` > 1 (0: the only one)

    @property
    def slug(self) -> str:
        slug = self.label.replace(" ", "_").replace("ē=", "b").replace("τ=", "t").replace("λ=", "l")
        return f"{slug}_r{self.repeat}" if self.repeat else slug


@dataclass
class Run:
    spec: RunSpec
    summary: dict[str, Any] = field(default_factory=dict)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def fixed_specs(selected: list[str]) -> list[RunSpec]:
    ks = sorted({int(p.split("-", 1)[1]) for p in selected if p.startswith("fixed-")} | {0})  # fixed-0: reference
    return [RunSpec(f"fixed-{k}", f"fixed-{k}", "fixed") for k in ks]


def adaptive_specs(selected: list[str], args: argparse.Namespace, budgets: list[float]) -> list[RunSpec]:
    kmax = ("--k-max", str(args.k_max))
    out: list[RunSpec] = []
    if "heuristic" in selected:
        out.append(RunSpec("heuristic", "heuristic", "heuristic", kmax))
    if "entropy" in selected:
        for tau in parse_floats(args.entropy_thresholds):
            out.append(RunSpec(f"entropy τ={tau:g}", "entropy", "entropy", (*kmax, "--entropy-threshold", f"{tau:g}")))
    if "adaedl" in selected:
        for lam in parse_floats(args.adaedl_lambdas):
            out.append(RunSpec(f"adaedl λ={lam:g}", "adaedl", "adaedl", (*kmax, "--adaedl-lambda", f"{lam:g}")))
    v = ("--v", f"{args.v:g}") if args.v is not None else ()
    for family in ("lyapunov", "gelato"):
        if family not in selected:
            continue
        out.append(RunSpec(family, family, family, kmax))  # no budget: V changes nothing (and is refused)
        for b in budgets:
            flags = (*kmax, *v, "--energy-budget-j-per-token", repr(b))
            out.append(RunSpec(f"{family} ē={b:.4g}", family, family, flags, budget=b))
    return out


def cheapest_fixed_j(summaries: list[dict[str, Any]]) -> float | None:
    """The fewest J/token of any fixed-K run among `summaries` (None: no fixed-K energy measured)."""
    jpt = [s["energy_j_per_token"] for s in summaries if s["family"] == "fixed" and s["energy_j_per_token"] is not None]
    return min(jpt, default=None)


def choose_budgets(args: argparse.Namespace, fixed: list[Run]) -> list[float]:
    """Explicit `--budgets`, else the cheapest fixed-K J/token times each factor (same run, same RTT)."""
    if args.budgets:
        return parse_floats(args.budgets)
    least = cheapest_fixed_j([r.summary for r in fixed])
    if least is None:
        print("no fixed-K energy measured: lyapunov/gelato run without budgets only", flush=True)
        return []
    # Full precision: a rounded-down ×1.0 budget would exclude the very fixed-K that defined it.
    return [least * f for f in parse_floats(args.budget_factors)]


class Bench:
    """The edge, the proxy and the per-policy device runs of one benchmark."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cores = sorted(os.sched_getaffinity(0))
        pin = len(cores) >= 2 and subprocess.run(["which", "taskset"], capture_output=True).returncode == 0
        self.edge_prefix = ["taskset", "-c", str(cores[0])] if pin else []
        self.device_prefix = ["taskset", "-c", str(cores[1])] if pin else []
        self.pinning = f"edge + proxy on CPU {cores[0]}, device on CPU {cores[1]}" if pin else "not pinned"
        self.traces = args.out / "traces"
        self.traces.mkdir(parents=True, exist_ok=True)
        self.labels: dict[int, dict[str, int]] = {}  # per repeat: runs under each label so far
        self.edge = start_edge(["--threads", "1"], prefix=self.edge_prefix)
        try:
            self.proxy = ProxyProcess(self.edge.address, args.one_way_ms, args.jitter_ms, args.seed, self.edge_prefix)
        except RuntimeError:
            self.edge.stop()
            raise

    def close(self) -> None:
        self.proxy.stop()
        self.edge.stop()

    def measure_rtt(self, n: int = 30) -> dict[str, Any]:
        """Timed Info calls through the proxy and straight to the edge; the difference is the
        round trip the proxy added (gRPC's own ~0.5 ms cancels out)."""
        via = asyncio.run(grpc_info_rtt(self.proxy.address, n))
        direct = asyncio.run(grpc_info_rtt(self.edge.address, n))
        out = {"via_proxy": rtt_summary(via), "direct": rtt_summary(direct), "nominal_ms": 2 * self.args.one_way_ms}
        out["measured_ms"] = round(statistics.median(via) * 1e3 - statistics.median(direct) * 1e3, 3)
        return out

    def device_cmd(self, spec: RunSpec, trace: Path) -> list[str]:
        a = self.args
        cmd = [*self.device_prefix, sys.executable, "-m", "gelato.device.cli", "--json", "--threads", "1"]
        cmd += ["--edge", self.proxy.address, "--prompts-file", str(a.data), "--limit", str(a.n)]
        cmd += ["--max-new-tokens", str(a.max_new_tokens), "--policy", spec.policy, *spec.flags]
        cmd += ["--meter", "cpu-model", "--device-profile", a.device_profile, "--radio", a.radio]
        return [*cmd, "--trace", str(trace)]

    def run(self, spec: RunSpec) -> Run:
        spec = replace(spec, label=unique_label(spec.label, self.labels.setdefault(spec.repeat, {})))
        trace = self.traces / f"{spec.slug}.jsonl"
        t0, code = time.perf_counter(), code_hash()
        cmd = self.device_cmd(spec, trace)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=child_env())
        if res.returncode != 0:
            raise RuntimeError(f"gelato-device {spec.label} failed ({res.returncode}):\n{res.stderr[-4000:]}")
        records = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
        rounds = [json.loads(line) for line in trace.read_text().splitlines()]
        with gzip.open(trace.with_suffix(".jsonl.gz"), "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({k: compact(v) for k, v in r.items()}) + "\n" for r in rounds)
        trace.unlink()
        run = Run(spec, prompts=[prompt_row(r) for r in records], token_ids=[r["token_ids"] for r in records])
        run.summary = summarize(spec, records, rounds)
        check_energy_source(spec.label, run.summary["energy"])
        run.summary.update(process_wall_s=round(time.perf_counter() - t0, 1), code=code)
        # The machine may be shared: a high load during a run makes its timings suspect.
        run.summary["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
        return run


def compact(v: Any) -> Any:
    """Five significant digits: the traces shrink ~2× and no measurement here is that precise."""
    return float(f"{v:.5g}") if isinstance(v, float) else [compact(x) for x in v] if isinstance(v, list) else v


def prompt_row(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("n_tokens", "elapsed_s", "tokens_per_s", "energy_j", "rounds", "drafted", "accepted", "stop_reason")
    return {k: r.get(k) for k in (*keys, "q_deficit_j", "long_run_j_per_token")}


def summarize(spec: RunSpec, records: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["n_tokens"] for r in records)
    elapsed = sum(r["elapsed_s"] for r in records)
    drafted = sum(r["drafted"] for r in records)
    n_rounds = sum(r["rounds"] for r in records)
    joules = [r["energy_j"] for r in records]
    return {
        **asdict(spec),  # label, policy, family, flags, budget (ē in J/token, None without)
        "prompts": len(records),
        "tokens": tokens,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        # None when any prompt's meter could not read: never 0 J.
        "energy_j_per_token": None if any(j is None for j in joules) or not tokens else sum(joules) / tokens,
        "energy": sorted({f"{r['energy_source']} ({r['energy_kind']})" for r in records}),
        "long_run_j_per_token": records[-1].get("long_run_j_per_token"),
        "q_final_j": records[-1].get("q_deficit_j"),
        "acceptance": sum(r["accepted"] for r in records) / drafted if drafted else None,
        "mean_draft_len": drafted / n_rounds if n_rounds else 0.0,
        "rounds": n_rounds,
        "tokens_per_round": tokens / n_rounds if n_rounds else 0.0,
        **trace_stats(rounds),
    }


def trace_stats(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """What the controller did, from the per-round trace."""
    answered = answered_rounds(rounds)  # ar-edge: the rounds that read a message
    t_mid = statistics.median(r["t_round_s"] for r in answered)
    return {
        "stop_reasons": dict(Counter(r["stop_reason"] for r in rounds).most_common()),
        "k_ref_mean": statistics.fmean(r["k_ref"] for r in rounds),
        "k_hist": dict(sorted(Counter(r["k"] for r in rounds).items())),
        "q_max_j": max(r["q_deficit_j"] or 0.0 for r in rounds),
        # Rounds the objective decided over budget (every K dearer than ē by its estimates); traces
        # written before the field was recorded count none.
        "over_budget_rounds": sum(bool(r.get("over_budget")) for r in rounds),
        # Rounds drafted to observe acceptance where the estimates alone drafted nothing.
        "explore_rounds": sum(bool(r.get("explore")) for r in rounds),
        "t_net_median_ms": round(statistics.median(r["t_net_s"] for r in answered) * 1e3, 3),
        # A round over twice the median: the device was descheduled (a shared machine), not the policy.
        "stalled_rounds": sum(r["t_round_s"] > 2 * t_mid for r in answered),
        **speed_probe(rounds),
    }


def speed_probe(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """How fast the machine ran during a run: the drafter's time per drafted token and the edge's
    compute time per verified row (block drafts + 1); the first is None without drafts. Both fall as blocks
    grow (a block's first drafter forward and each edge forward carry a fixed cost), so compare runs
    of similar mean draft length: between those, a slower probe means the shared machine ran slower
    during that run (runs are sequential), which costs it time and, with the cpu-model estimate (CPU
    time x power), joules, whatever its policy decided."""
    drafted = sum(r["k"] for r in rounds)
    rows = sum(r["k"] + 1 for r in rounds)
    return {
        "draft_ms_per_token": 1e3 * sum(r["t_draft_s"] for r in rounds) / drafted if drafted else None,
        "edge_ms_per_row": 1e3 * sum(r["t_edge_compute_s"] for r in rounds) / rows if rows else None,
    }


def check_lossless(runs: list[Run]) -> list[str]:
    """Every run's tokens against fixed-0's (the edge alone), prompt by prompt."""
    ref = next(r for r in runs if r.spec.label == "fixed-0").token_ids
    bad = []
    for run in runs:
        same = [a == b for a, b in zip(run.token_ids, ref, strict=True)]
        run.summary["exact_match"] = f"{sum(same)}/{len(same)}"
        tag = f" #{run.spec.repeat}" if run.spec.repeat else ""
        bad += [f"{run.spec.label}{tag}: prompt {i}" for i, ok in enumerate(same) if not ok]
    return bad


def git_state() -> dict[str, Any]:
    """The commit and the files changed on top of it: others edit the tree while benchmarks run."""
    return {"commit": git_output(["rev-parse", "HEAD"]), "changed": git_output(["status", "--short"]).splitlines()}


def code_files() -> list[Path]:
    """What `code_hash` covers: the device, edge and shared (controller included) sources, hashed
    per run, so that a change mid-benchmark shows up. Found where Python imports them from: the
    checkout's device/, edge/ and gelato/, or the installed gelato/ that holds all three (folders
    named beside this file were the checkout's only: installed, gelato/ was missed silently)."""
    import gelato
    import gelato.device
    import gelato.edge

    dirs = {Path(m.__file__).resolve().parent for m in (gelato, gelato.device, gelato.edge) if m.__file__}
    return sorted({p for d in dirs for p in d.rglob("*.py")})


def code_hash() -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in code_files())).hexdigest()[:12]


def energy_note(device_profile: str, radio: str) -> str:
    """What every device run's energy is: the cpu-model estimate with the profile and radio model the
    devices were given (`--device-profile`, `--radio`), never a measurement."""
    radio_part = "no radio model" if radio == "none" else f"{radio} radio model"
    return f"device energy: cpu-model (estimated) {device_profile} profile + {radio_part}, not a measurement"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gelato.benchmarks.policies", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20, help="GSM8K test questions (the first N)")
    p.add_argument("--data", type=Path, default=None, help="GSM8K test JSONL (default: the shared copy)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--one-way-ms", type=float, default=10.0, help="proxy delay per direction")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="proxy jitter seed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/policies_tiny_rtt20"))
    p.add_argument("--force", action="store_true", help="write into an --out folder that already holds a run")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma list; fixed-0 always runs (the reference)")
    p.add_argument("--budgets", default="", help="ē values in J/token (default: from the fixed-K sweep)")
    p.add_argument("--budget-factors", default="1.0,1.1,1.25,1.5", help="× the cheapest fixed-K J/token")
    p.add_argument("--entropy-thresholds", default="1,2,3,4.5", help="τ values (nats) of entropy")
    p.add_argument("--adaedl-lambdas", default="0.1,0.3,0.5", help="λ values of adaedl (γ = 0.2)")
    p.add_argument("--k-max", type=int, default=8, help="cap of every adaptive policy")
    p.add_argument("--v", type=float, default=None, help="V of the budgeted lyapunov/gelato runs")
    p.add_argument("--device-profile", default="phone")
    p.add_argument("--radio", default="wifi")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the whole list this many times in a row and judge each repeat on its own runs (the machine "
        "drifts: a budget set from a fixed-K run minutes earlier is fair, one from half an hour earlier is not)",
    )
    return p


def run_all(bench: Bench, args: argparse.Namespace) -> tuple[list[Run], list[float]]:
    """Every run, in order: the fixed-K sweep, the budgets from it, the adaptive policies; with
    `--repeats R` > 1 that whole list R times in a row (fixed-0, the losslessness reference, only in
    the first unless named), each run tagged with its repeat and ē kept from the first sweep, so
    every repeat compares the controllers with fixed-K runs made minutes apart."""
    selected = [p.strip() for p in args.policies.split(",") if p.strip()]
    runs: list[Run] = []
    repeats = args.repeats
    fixed = fixed_specs(selected)
    again = [s for s in fixed if s.label != "fixed-0" or "fixed-0" in selected]
    n_budgets = len(parse_floats(args.budgets or args.budget_factors))
    n_adaptive = len(adaptive_specs(selected, args, [0.0] * n_budgets))
    total = len(fixed) + n_adaptive + (repeats - 1) * (len(again) + n_adaptive)  # for the progress line

    def go(specs: list[RunSpec], repeat: int) -> None:
        for spec in specs:
            runs.append(bench.run(replace(spec, repeat=repeat if repeats > 1 else 0)))
            print_run(len(runs), total, runs[-1].summary)

    go(fixed, 1)
    budgets = choose_budgets(args, runs)
    print("budgets ē (J/token): " + ", ".join(f"{b:.5g}" for b in budgets), flush=True)
    adaptive = adaptive_specs(selected, args, budgets)
    go(adaptive, 1)
    for r in range(2, repeats + 1):
        go([*again, *adaptive], r)
    return runs, budgets


def comparisons(runs: list[Run], budgets: list[float], repeats: int) -> dict[str, Any]:
    """The targets' verdicts: one repeat's as before; with repeats, each repeat's own (its runs
    only) and the medians over them, against ē as set and against ē rescaled per repeat by its
    cheapest fixed-K J/token over the first repeat's (the budget the first sweep's ratio would
    have given in that repeat)."""
    summaries = [r.summary for r in runs]
    if repeats <= 1:
        return compare_budgets(summaries, budgets)
    groups = [[s for s in summaries if s["repeat"] == r] for r in range(1, repeats + 1)]
    per_repeat = [compare_budgets(g, budgets) for g in groups]
    # ē × how much dearer each repeat's cheapest fixed-K ran than the first's (ē came from that).
    cheapest = [cheapest_fixed_j(g) for g in groups]
    scales = [c / cheapest[0] if c and cheapest[0] else 1.0 for c in cheapest]
    rescaled = [compare_budgets(g, budgets, x) for g, x in zip(groups, scales, strict=True)]
    return {
        "per_repeat": per_repeat,
        "over_repeats": over_repeats(per_repeat),
        "scales": scales,
        "per_repeat_rescaled": rescaled,
        "over_repeats_rescaled": over_repeats(rescaled),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.v is not None and not parse_floats(args.budgets or args.budget_factors):
        parser.error("--v: V applies to the budgeted lyapunov/gelato runs, and no budget is asked for")
    if (args.out / "results.json").exists() and not args.force:  # the default is a committed result
        parser.error(f"--out {args.out} already holds a run (results.json): choose another --out, or --force")
    args.data = gsm8k_file("test", args.data)  # one-line error and exit when it is missing
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per process, as pinned
    command = shlex.join(["python", "-m", "gelato.benchmarks.policies", *(sys.argv[1:] if argv is None else argv)])
    print(f"gelato.benchmarks.policies: {command}", flush=True)
    t0 = time.perf_counter()
    bench = Bench(args)
    try:
        rtt = bench.measure_rtt()
        print(f"round trip through the proxy: {rtt['measured_ms']:.2f} ms (nominal {rtt['nominal_ms']:g})", flush=True)
        runs, budgets = run_all(bench, args)
        rtt_after = bench.measure_rtt()
    finally:
        bench.close()
    bad = check_lossless(runs)
    result = {
        "command": command,
        "machine": machine(),
        "git": git_state(),
        "pinning": bench.pinning,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rtt": {"before": rtt, "after": rtt_after},
        "energy_note": energy_note(args.device_profile, args.radio),
        "budgets_j_per_token": budgets,
        "runs": [{**r.summary, "per_prompt": r.prompts} for r in runs],
        "comparisons": comparisons(runs, budgets, args.repeats),
        "lossless_failures": bad,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")  # Bench made the folder
    (args.out / "results.md").write_text(md := markdown(result))
    print("\n" + md)
    if bad:
        print("!" * 80 + f"\nLOSSLESSNESS VIOLATED: outputs differ from fixed-0's for {'; '.join(bad)}\n" + "!" * 80)
        return 1
    print(f"losslessness: every output of every run equals fixed-0's token for token. ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
