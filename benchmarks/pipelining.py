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
throughput: where chains pay in time but not within the budget). Per run: tokens/s, J/token, blocks
with drafts sent ahead, how many of them were verified and how many answered stale, empty blocks
sent ahead (apart, verified or stale), the hit rate (verified / sent ahead), wasted drafted tokens and
their estimated J per output token, and exact match against an `ar-edge` run (the target decoding
alone, streamed; a difference is printed loudly, exit 1). `--repeats N` runs the whole set N times, round trips
interleaved (repeat 1 of every round trip, then repeat 2, ...), so slow drift of a shared machine
falls on every configuration alike; each repeat is one entry of `rtts` (its own `repeat` number,
edge, traces under `rtt<ms>_r<i>/`), and `summary` holds per round trip the median of each ratio
over the repeats, every repeat's value beside it. Writes `results.json` (with the resolved
`settings`) and `results.md` under `--out`. `--report DIR` runs nothing: it re-derives DIR's
figures from its results.json and traces (`rebuild`) and rewrites both files.
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

from gelato.benchmarks.bench_run import pipeline_stats
from gelato.benchmarks.policies import Bench, Run, RunSpec, energy_note, git_state
from gelato.benchmarks.procs import machine
from gelato.tiny.train import gsm8k_file


def trace_pipeline_stats(trace: Path) -> dict[str, Any]:
    """Send-ahead and pre-draft figures from a run's gzipped per-round trace: those of
    `gelato-bench gsm8k` (`bench_run.pipeline_stats`), per output token of the trace's rounds."""
    with gzip.open(trace, "rt", encoding="utf-8") as f:
        rounds = [json.loads(line) for line in f]
    return pipeline_stats(rounds, sum(r["emitted"] for r in rounds))


def run_one(bench: Bench, spec: RunSpec) -> Run:
    run = bench.run(spec)
    spec = run.spec  # its label made unique by `Bench.run`: the trace it wrote
    run.summary.update(trace_pipeline_stats(bench.traces / f"{spec.slug}.jsonl.gz"))
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
        # The target decoding alone (streamed: no round trip per token), every output's reference.
        target_alone = run_one(bench, RunSpec("ar-edge", "ar-edge", "reference"))
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
        runs = [target_alone, *fixed, *(run_one(bench, s) for s in specs)]
        measured_after = bench.measure_rtt()
    finally:
        bench.close()
    mismatches = [r.spec.label for r in runs if r.token_ids != target_alone.token_ids]
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
        "lossless_reference": "ar-edge",
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
    and the send-ahead figures of each repeat. Each repeat's ratios are against its own fastest
    fixed K (the one that also set its gelato runs' budget), so where repeats found different
    fastest Ks the median compares each with its own (the table says so)."""
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
        row["send_ahead_verified"] = [x["ahead_verified"] for x in sa]
        row["send_ahead_empty"] = [x["sent_empty"] for x in sa]
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


def _sent_cell(r: dict[str, Any]) -> str:
    keys = ("send_ahead_sent", "send_ahead_verified", "send_ahead_empty")
    return ", ".join("/".join(str(x) for x in t) for t in zip(*(r[k] for k in keys), strict=True))


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
        "| send-ahead J/tok ≤ fixed's | sent ahead / verified / empty | hit rate | wasted mJ/tok "
        "| no budget ÷ fastest fixed | fixed send-ahead ÷ fixed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        wasted = [None if w is None else w * 1e3 for w in r["send_ahead_wasted_j_per_token"]]
        lines.append(
            f"| {r['rtt_nominal_ms']:g} ({r['rtt_measured_ms']:.1f}) | {', '.join(r['fastest_fixed'])} "
            f"| {_ratio_cell(r['gelato_send_ahead_vs_fastest_fixed'])} "
            f"| {_ratio_cell(r['gelato_send_ahead_vs_gelato'])} "
            f"| {_ratio_cell(r['gelato_local_vs_gelato'])} | {r['gelato_send_ahead_j_within_fastest_fixed']} "
            f"| {_sent_cell(r)} | {_list_cell(r['send_ahead_hit_rate'], '.2f')} "
            f"| {_list_cell(wasted, '.3f')} | {_ratio_cell(r['gelato_send_ahead_no_budget_vs_fastest_fixed'])} "
            f"| {_ratio_cell(r['fixed_send_ahead_vs_fixed'])} |"
        )
    mixed = [f"{r['rtt_nominal_ms']:g} ms" for r in summary if len(set(r["fastest_fixed"])) > 1]
    lines += [
        "",
        "Sent ahead: blocks with drafts sent before their parent's verdict (verified or stale); verified: "
        "those verified; empty: empty blocks sent ahead (the target's next token, verified or stale, not in the hit "
        "rate). Hit rate: verified ÷ sent ahead.",
        *(
            [
                "",
                f"The repeats' fastest fixed K differ at {', '.join(mixed)}: there each repeat's ratios are against "
                "its own fastest fixed K, so the median mixes those Ks.",
            ]
            if mixed
            else []
        ),
        "",
        "Every run:",
        "",
        "| RTT | repeat | run | tok/s | mJ/tok | sent ahead | verified | stale | empty | hit rate | wasted tok/tok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rtts"]:
        for x in r["runs"]:
            jpt = x["energy_j_per_token"]
            hit = x["ahead_hit_rate"]
            lines.append(
                f"| {r['rtt_nominal_ms']:g} | {r.get('repeat', 1)} | {x['label']} | {x['tokens_per_s']:.1f} "
                f"| {'-' if jpt is None else f'{jpt * 1e3:.3f}'} | {x['sent_ahead']} | {x['ahead_verified']} "
                f"| {x['stale_blocks']} | {x['sent_empty']} | {'-' if hit is None else f'{hit:.2f}'} "
                f"| {_list_cell([x['wasted_tokens_per_token']], '.2f')} |"
            )
    bad = [
        f"{r['rtt_nominal_ms']:g} ms (repeat {r.get('repeat', 1)}): {m}"
        for r in result["rtts"]
        for m in r["lossless_mismatches"]
    ]
    # Results made before the target-alone run was added checked against unpipelined gelato.
    refs = {r.get("lossless_reference", "gelato (unpipelined)") for r in result["rtts"]}
    against = " and ".join(f"{ref}'s" for ref in sorted(refs))
    verdict = "VIOLATED: " + "; ".join(bad) if bad else f"every output equals {against} token for token"
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
    p.add_argument("--force", action="store_true", help="write into an --out folder that already holds a run")
    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="re-derive DIR's tables from its results.json and committed traces (no runs; what was measured is kept)",
    )
    return p


def rebuild(folder: Path) -> dict[str, Any]:
    """A results folder's figures re-derived from what it recorded: each run's pipelining figures
    from its trace (`trace_pipeline_stats`), the summary from the repeats, results.json and
    results.md rewritten; tokens/s, energy and outputs are kept as measured."""
    result = json.loads((folder / "results.json").read_text())
    for entry in result["rtts"]:
        name = f"rtt{entry['rtt_nominal_ms']:g}"
        sub = folder / f"{name}_r{entry.get('repeat', 1)}"
        traces = (sub if sub.is_dir() else folder / name) / "traces"
        for run in entry["runs"]:
            run.pop("stale", None)  # the name `stale_blocks` had before the figures were split
            run.update(trace_pipeline_stats(traces / f"{RunSpec(run['label'], '', '').slug}.jsonl.gz"))
    result["summary"] = summarize_repeats(result["rtts"])
    result["rebuilt"] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "code": git_state()}
    (folder / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (folder / "results.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report is not None:
        print(markdown(rebuild(args.report)))
        return 0
    if (args.out / "results.json").exists() and not args.force:  # the default is a committed result
        parser.error(f"--out {args.out} already holds a run (results.json): choose another --out, or --force")
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
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "report"},
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
