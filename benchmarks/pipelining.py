"""Pipelined speculation benchmark: send-ahead and local pre-drafting against the same
policies without pipelining, over emulated round trips of 0/10/20/50/100 ms.

Contract: `python -m gelato.benchmarks.pipelining [--rtts-ms 0,10,20,50,100] [--n 8] [--out DIR]` runs,
per round trip, one `gelato-edge` and one `gelato.benchmarks.delay_proxy` (the set-up of
`gelato.benchmarks.policies`: edge + proxy pinned to one CPU, the device to another, cpu-model meter with
`--device-profile` (default `phone`) + the `--radio` model (default `wifi`) — an ESTIMATE, named so
with its profile and radio in every output), then device processes for
fixed-K (K in `--fixed`, no pipelining), `gelato` without pipelining, with `--pipeline local` and
with `--pipeline send-ahead`, and the fastest fixed-K with send-ahead. The gelato runs get the
budget ē = the J/token of the fastest fixed-K measured just before (its energy, same round trip):
the target is more tokens/s at no more J/token; one more gelato send-ahead run has no budget (pure
throughput: where chains pay in time but not within the budget). Per run: tokens/s, J/token, blocks sent ahead,
hit rate (sent-ahead blocks verified / all sent ahead), stale blocks, wasted drafted tokens and
their estimated J per output token, and exact match against the unpipelined gelato run (a
difference is printed loudly, exit 1). `--repeats N` runs the whole set N times, round trips
interleaved (repeat 1 of every round trip, then repeat 2, ...), so slow drift of a shared machine
falls on every configuration alike; each repeat is one entry of `rtts` (its own `repeat` number,
edge, traces under `rtt<ms>_r<i>/`), and `summary` holds per round trip the median of each ratio
over the repeats, every repeat's value beside it. Writes `results.json` and `results.md` under
`--out`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from gelato.benchmarks.policies import Bench, Run, RunSpec, energy_note, git_state
from gelato.benchmarks.procs import machine
from gelato.tiny.train import gsm8k_file


def pipeline_stats(trace: Path) -> dict[str, Any]:
    """Send-ahead figures from a run's gzipped per-round trace."""
    with gzip.open(trace, "rt", encoding="utf-8") as f:
        rounds = [json.loads(line) for line in f]
    ahead = sum(bool(r.get("sent_ahead")) for r in rounds)
    stale = sum(r.get("stale_blocks", 0) for r in rounds)
    emitted = sum(r["emitted"] for r in rounds) or 1
    predrafted = [r for r in rounds if r.get("predrafted")]
    return {
        "sent_ahead": ahead,
        "stale": stale,
        "ahead_hit_rate": ahead / (ahead + stale) if ahead + stale else None,
        "predraft_hit_rate": sum(r["predraft_hit"] for r in predrafted) / len(predrafted) if predrafted else None,
        "wasted_tokens_per_token": sum(r.get("wasted_tokens", 0) for r in rounds) / emitted,
        "wasted_j_per_token": sum(r.get("wasted_j", 0.0) for r in rounds) / emitted,
    }


def run_one(bench: Bench, spec: RunSpec) -> Run:
    run = bench.run(spec)
    run.summary.update(pipeline_stats(bench.traces / f"{spec.slug}.jsonl.gz"))
    s = run.summary
    jpt = s["energy_j_per_token"]
    hit = s["ahead_hit_rate"]
    print(
        f"  {spec.label:<28} {s['tokens_per_s']:8.1f} tok/s  {'-' if jpt is None else f'{jpt * 1e3:.3f}'} mJ/tok"
        f"  ahead {s['sent_ahead']:>5}  hit {'-' if hit is None else f'{hit:.2f}'}",
        flush=True,
    )
    return run


def one_rtt(args: argparse.Namespace, rtt_ms: float, repeat: int = 1) -> dict[str, Any]:
    folder = f"rtt{rtt_ms:g}" + (f"_r{repeat}" if args.repeats > 1 else "")
    ns = argparse.Namespace(**{**vars(args), "one_way_ms": rtt_ms / 2, "out": args.out / folder})
    bench = Bench(ns)
    try:
        measured = bench.measure_rtt()
        of = f", repeat {repeat} of {args.repeats}" if args.repeats > 1 else ""
        print(f"round trip {rtt_ms:g} ms nominal{of}, {measured['measured_ms']:.2f} ms measured", flush=True)
        kmax = ("--k-max", str(args.k_max))
        fixed = [run_one(bench, RunSpec(f"fixed-{k}", f"fixed-{k}", "fixed")) for k in args.fixed]
        best = max(fixed, key=lambda r: r.summary["tokens_per_s"])
        budget = best.summary["energy_j_per_token"]
        b = ("--energy-budget-j-per-token", repr(budget)) if budget else ()
        specs = [
            RunSpec("gelato", "gelato", "gelato", (*kmax, *b), budget=budget),
            RunSpec("gelato local", "gelato", "gelato", (*kmax, *b, "--pipeline", "local"), budget=budget),
            RunSpec("gelato send-ahead", "gelato", "gelato", (*kmax, *b, "--pipeline", "send-ahead"), budget=budget),
            RunSpec("gelato send-ahead, no budget", "gelato", "gelato", (*kmax, "--pipeline", "send-ahead")),
            RunSpec(f"{best.spec.label} send-ahead", best.spec.policy, "fixed", ("--pipeline", "send-ahead")),
        ]
        runs = fixed + [run_one(bench, s) for s in specs]
        measured_after = bench.measure_rtt()
    finally:
        bench.close()
    ref = runs[len(fixed)].token_ids  # gelato without pipelining
    mismatches = [r.spec.label for r in runs if r.token_ids != ref]
    by = {r.spec.label: r.summary for r in runs}
    tps = {k: v["tokens_per_s"] for k, v in by.items()}
    sa = by["gelato send-ahead"]
    return {
        "rtt_nominal_ms": rtt_ms,
        "repeat": repeat,
        "rtt_measured_ms": [measured["measured_ms"], measured_after["measured_ms"]],
        "fastest_fixed": best.spec.label,
        "budget_j_per_token": budget,
        "gelato_send_ahead_vs_fastest_fixed": tps["gelato send-ahead"] / tps[best.spec.label],
        "gelato_send_ahead_vs_gelato": tps["gelato send-ahead"] / tps["gelato"],
        "gelato_local_vs_gelato": tps["gelato local"] / tps["gelato"],
        "gelato_send_ahead_no_budget_vs_fastest_fixed": tps["gelato send-ahead, no budget"] / tps[best.spec.label],
        "fixed_send_ahead_vs_fixed": tps[f"{best.spec.label} send-ahead"] / tps[best.spec.label],
        "gelato_send_ahead_j_within_fastest_fixed": (
            None if budget is None or sa["energy_j_per_token"] is None else sa["energy_j_per_token"] <= budget
        ),
        "lossless_mismatches": mismatches,
        "runs": [{**r.summary, "per_prompt": r.prompts} for r in runs],
    }


RATIOS = (
    "gelato_send_ahead_vs_fastest_fixed",
    "gelato_send_ahead_vs_gelato",
    "gelato_local_vs_gelato",
    "gelato_send_ahead_no_budget_vs_fastest_fixed",
    "fixed_send_ahead_vs_fixed",
)


def summarize_repeats(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round trip (in first-seen order): each ratio's median over the repeats and every
    repeat's value; how many repeats kept gelato send-ahead within its budget; the fastest fixed-K
    and the send-ahead figures of each repeat."""
    out = []
    for rtt in dict.fromkeys(e["rtt_nominal_ms"] for e in entries):
        reps = [e for e in entries if e["rtt_nominal_ms"] == rtt]
        sa = [next(x for x in e["runs"] if x["label"] == "gelato send-ahead") for e in reps]
        row: dict[str, Any] = {"rtt_nominal_ms": rtt, "repeats": len(reps)}
        row["rtt_measured_ms"] = statistics.median(e["rtt_measured_ms"][0] for e in reps)
        for key in RATIOS:
            row[key] = {"median": statistics.median(e[key] for e in reps), "each": [e[key] for e in reps]}
        within = [e["gelato_send_ahead_j_within_fastest_fixed"] for e in reps]
        row["gelato_send_ahead_j_within_fastest_fixed"] = f"{sum(w is True for w in within)}/{len(within)}"
        row["fastest_fixed"] = [e["fastest_fixed"] for e in reps]
        row["send_ahead_sent"] = [x["sent_ahead"] for x in sa]
        row["send_ahead_hit_rate"] = [x["ahead_hit_rate"] for x in sa]
        row["send_ahead_wasted_j_per_token"] = [x["wasted_j_per_token"] for x in sa]
        out.append(row)
    return out


def _ratio_cell(r: dict[str, Any]) -> str:
    if len(r["each"]) == 1:
        return f"{r['median']:.2f}×"
    return f"{r['median']:.2f}× ({', '.join(f'{x:.2f}' for x in r['each'])})"


def _list_cell(xs: list[Any], spec: str) -> str:
    return ", ".join("-" if x is None else format(x, spec) for x in xs)


def markdown(result: dict[str, Any]) -> str:
    summary = result.get("summary") or summarize_repeats(result["rtts"])
    n = max(r["repeats"] for r in summary)
    lines = [
        "# Pipelined speculation: send-ahead vs local pre-drafting vs none",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; {result['pinning']}  ",
        f"Energy: {result['energy_note']}",
        "",
        *(
            [f"Ratios: the median of {n} repeats (round trips interleaved), each repeat's value in brackets.", ""]
            if n > 1
            else []
        ),
        "| RTT ms (measured) | fastest fixed-K | gelato send-ahead ÷ fastest fixed | ÷ gelato | local ÷ gelato "
        "| send-ahead J/tok ≤ fixed's | sent ahead | hit rate | wasted mJ/tok | no budget ÷ fastest fixed "
        "| fixed send-ahead ÷ fixed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        wasted = [None if w is None else w * 1e3 for w in r["send_ahead_wasted_j_per_token"]]
        lines.append(
            f"| {r['rtt_nominal_ms']:g} ({r['rtt_measured_ms']:.1f}) | {', '.join(r['fastest_fixed'])} "
            f"| {_ratio_cell(r['gelato_send_ahead_vs_fastest_fixed'])} "
            f"| {_ratio_cell(r['gelato_send_ahead_vs_gelato'])} "
            f"| {_ratio_cell(r['gelato_local_vs_gelato'])} | {r['gelato_send_ahead_j_within_fastest_fixed']} "
            f"| {_list_cell(r['send_ahead_sent'], 'd')} | {_list_cell(r['send_ahead_hit_rate'], '.2f')} "
            f"| {_list_cell(wasted, '.3f')} | {_ratio_cell(r['gelato_send_ahead_no_budget_vs_fastest_fixed'])} "
            f"| {_ratio_cell(r['fixed_send_ahead_vs_fixed'])} |"
        )
    lines += [
        "",
        "Every run:",
        "",
        "| RTT | repeat | run | tok/s | mJ/tok | sent ahead | hit rate | stale | wasted tok/tok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rtts"]:
        for x in r["runs"]:
            jpt = x["energy_j_per_token"]
            hit = x["ahead_hit_rate"]
            lines.append(
                f"| {r['rtt_nominal_ms']:g} | {r.get('repeat', 1)} | {x['label']} | {x['tokens_per_s']:.1f} "
                f"| {'-' if jpt is None else f'{jpt * 1e3:.3f}'} | {x['sent_ahead']} "
                f"| {'-' if hit is None else f'{hit:.2f}'} | {x['stale']} | {x['wasted_tokens_per_token']:.2f} |"
            )
    bad = [
        f"{r['rtt_nominal_ms']:g} ms (repeat {r.get('repeat', 1)}): {m}"
        for r in result["rtts"]
        for m in r["lossless_mismatches"]
    ]
    verdict = "VIOLATED: " + "; ".join(bad) if bad else "every output equals gelato's (unpipelined) token for token"
    lines += ["", f"Losslessness: {verdict}."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gelato.benchmarks.pipelining", description=__doc__.split("\n\n")[0])
    p.add_argument("--rtts-ms", default="0,10,20,50,100", help="emulated round trips (ms), comma list")
    p.add_argument("--n", type=int, default=8, help="GSM8K test questions (the first N)")
    p.add_argument("--repeats", type=int, default=1, help="run every configuration N times, round trips interleaved")
    p.add_argument("--data", type=Path, default=None, help="GSM8K test JSONL (default: the shared copy)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--fixed", default="2,3,4,6", help="fixed-K values to find the fastest fixed K")
    p.add_argument("--k-max", type=int, default=8)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-profile", default="phone")
    p.add_argument("--radio", default="wifi")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pipelining_tiny"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.data = gsm8k_file("test", args.data)
    args.fixed = [int(k) for k in args.fixed.split(",") if k.strip()]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    command = shlex.join(["python", "-m", "gelato.benchmarks.pipelining", *(sys.argv[1:] if argv is None else argv)])
    print(f"gelato.benchmarks.pipelining: {command}", flush=True)
    t0 = time.perf_counter()
    if args.repeats < 1:
        raise SystemExit("gelato.benchmarks.pipelining: --repeats must be >= 1")
    rtt_list = [float(x) for x in args.rtts_ms.split(",") if x.strip()]
    rtts = [one_rtt(args, rtt, i) for i in range(1, args.repeats + 1) for rtt in rtt_list]
    cores = sorted(os.sched_getaffinity(0))
    result = {
        "command": command,
        "machine": machine(),
        "git": git_state(),
        "pinning": f"edge + proxy on CPU {cores[0]}, device on CPU {cores[1]}" if len(cores) >= 2 else "not pinned",
        "energy_note": energy_note(args.device_profile, args.radio),
        "rtts": rtts,
        "summary": summarize_repeats(rtts),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "results.md").write_text(md := markdown(result))
    print("\n" + md)
    return 1 if any(r["lossless_mismatches"] for r in rtts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
