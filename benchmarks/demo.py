"""The main job on the embedded default: edge + device processes, a few prompts, a results table.

Contract: `gelato-demo` (the README's first command) starts `gelato-edge` with the built-in tiny
target on loopback, runs `gelato-device` with the built-in drafter on the project's own short
math word problems for several draft policies, and prints one table row per policy: emitted
tokens/s (ratio of sums), acceptance per drafted token, rounds, mean draft length, and device
J/token with its energy source named (measured or estimated). Edge and device share this host, so
the device meters with `--meter cpu-model` by default: an estimate of the device process alone
(labelled estimated). A host-wide meter (`--meter rapl|nvml|jetson|auto`) would add the edge's
energy to every row's "device" J/token (all of it for ar-edge); the demo says so when one is used.
The device is given `--radio` (default wifi) explicitly, and the energy note names that model. Every
process starts with the caller's `GELATO_DEVICE_*` / `GELATO_EDGE_*` variables removed
(`gelato.benchmarks.procs.child_env`): the demo's flags are its whole configuration.
Greedy; both processes pinned to one torch thread each. `--pair random` uses tiny random models
instead. Losslessness is checked, not assumed: every policy's tokens must equal the first policy's
(default `ar-edge`, the edge decoding alone) for every prompt, else the demo says which differ and
exits 1.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gelato.benchmarks.procs import exit_on_signals, run_device, start_edge
from gelato.models import default_model_path
from gelato.power import HOST_WIDE
from gelato.tiny.random_pair import synthetic_problem


def demo_prompts(n: int, seed: int = 2026) -> list[str]:
    rng = random.Random(seed)
    return [synthetic_problem(rng)[0] for _ in range(n)]


NOT_THE_TARGETS = ("ar-device",)  # the drafter alone: its output is not the target's, nothing to check


def summarize(policy: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["n_tokens"] for r in records)
    elapsed = sum(r["elapsed_s"] for r in records)
    drafted = sum(r["drafted"] for r in records)
    rounds = sum(r["rounds"] for r in records)
    return {
        "policy": policy,
        "prompts": len(records),
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        # None (JSON null, "-"): nothing drafted, or no target checked the drafts (ar-device).
        "acceptance": sum(r["accepted"] for r in records) / drafted
        if drafted and policy not in NOT_THE_TARGETS
        else None,
        "rounds": rounds,
        "mean_draft_len": drafted / rounds if rounds else 0.0,
        "tokens_per_round": tokens / rounds if rounds else 0.0,
        "energy_j_per_token": device_j_per_token(records, tokens),
        "energy": sorted({f"{r['energy_source']} ({r['energy_kind']})" for r in records}),
    }


def device_j_per_token(records: list[dict[str, Any]], tokens: int) -> float | None:
    """Total device energy over emitted tokens; None when any reading was unavailable (never 0)."""
    joules = [r["energy_j"] for r in records]
    if not tokens or any(j is None for j in joules):
        return None
    return float(sum(joules)) / tokens


def lossless_reference(policies: list[str]) -> str | None:
    """The first policy whose output is the target's (None: no such policy ran)."""
    return next((p for p in policies if p not in NOT_THE_TARGETS), None)


def mismatches(runs: dict[str, list[dict[str, Any]]], reference: str) -> list[str]:
    """'policy: prompt i' for every output that differs from the reference policy's (`ar-device`'s
    output is the drafter's own, never compared)."""
    ref = [r["token_ids"] for r in runs[reference]]
    return [
        f"{policy}: prompt {i}"
        for policy, records in runs.items()
        if policy not in NOT_THE_TARGETS
        for i, (rec, want) in enumerate(zip(records, ref, strict=True))
        if rec["token_ids"] != want
    ]


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| policy | prompts | tokens | tokens/s | acceptance | rounds | mean draft len | tokens/round "
        "| device J/token |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        jpt = "n/a" if r["energy_j_per_token"] is None else f"{r['energy_j_per_token']:.4f}"
        lines.append(
            f"| {r['policy']} | {r['prompts']} | {r['tokens']} | {r['tokens_per_s']:.1f} | {acc} "
            f"| {r['rounds']} | {r['mean_draft_len']:.2f} | {r['tokens_per_round']:.2f} | {jpt} |"
        )
    return "\n".join(lines)


METER_HELP = (
    "device energy meter, passed to gelato-device --meter (default cpu-model: an estimate of the device "
    "process alone, labelled estimated). Edge and device run on THIS host, so host-wide meters mislead here: "
    "rapl sums whole CPU packages and jetson the whole board (the edge process included), nvml all of the GPU "
    "(both models with --device auto), and auto picks one of those first; their 'measured' device J/token "
    "would include the edge's energy, and ar-edge would be charged the edge's whole work"
)


DEFAULT_RADIO = "wifi"


def device_args(
    drafter: str,
    edge: str,
    prompts_file: Path,
    max_new_tokens: int,
    policy: str,
    meter: str,
    radio: str = DEFAULT_RADIO,
) -> list[str]:
    """One policy's `gelato-device` flags (before `--json`, which run_device adds). The radio model
    is always passed: the energy note names it, so it never rests on the device's default."""
    return [
        *("--drafter", drafter, "--edge", edge, "--threads", "1"),
        *("--prompts-file", str(prompts_file), "--max-new-tokens", str(max_new_tokens)),
        *("--policy", policy, "--radio", radio, "--meter", meter),
    ]


def radio_text(radio: str) -> str:
    return "no radio model" if radio == "none" else f"{radio} radio model"


def energy_lines(rows: list[dict[str, Any]], radio: str = DEFAULT_RADIO) -> list[str]:
    """What the table's device J/token is: the sources the device runs reported plus the radio model
    they were given (`radio`: the `--radio` passed to every device), and a warning when one of the
    sources read the whole host, which the edge shares here."""
    energy = sorted({e for r in rows for e in r["energy"]})
    lines = [f"device energy: {', '.join(energy)} meter + {radio_text(radio)} (gelato-demo --meter, --radio)."]
    sources = {e.split(" ", 1)[0] for e in energy}
    if "cpu-model" in sources:
        lines.append("cpu-model estimates the device process alone: its CPU seconds x active W + idle W x wall time.")
    wide = sorted(sources & set(HOST_WIDE))
    if wide:
        lines.append(
            f"WARNING: {', '.join(wide)} reads the whole host, which the edge shares here: every device J/token "
            "above includes the edge's energy (ar-edge: all of its work). --meter cpu-model meters the device "
            "process alone."
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gelato-demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pair",
        choices=["embedded", "random"],
        default="embedded",
        help="embedded: the GSM8K-trained tiny pair (default); random: a random-weight pair built now",
    )
    p.add_argument("--prompts", type=int, default=6, help="word problems to ask (default 6)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="per prompt (default 96)")
    policies = "ar-edge,fixed-0,fixed-4,heuristic,lyapunov,gelato"
    p.add_argument(
        "--policies", default=policies, help=f"gelato-device policies, the first the reference (default {policies})"
    )
    p.add_argument("--meter", default="cpu-model", help=METER_HELP)
    p.add_argument(
        "--radio",
        default=DEFAULT_RADIO,
        help=f"radio energy model, passed to gelato-device --radio (default {DEFAULT_RADIO}; none: no radio energy)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON to this file")
    return p


def check_args(args: argparse.Namespace) -> str:
    """What would fail in a device process after the edge started, refused first ('' when fine)."""
    from gelato.device.policy import parse_policy
    from gelato.power import RADIOS, SOURCES

    if args.prompts < 1:
        return "--prompts must be >= 1"
    if args.max_new_tokens < 1:
        return "--max-new-tokens must be >= 1"
    policies = [p.strip() for p in args.policies.split(",")]
    if not all(policies):
        return f"--policies: an empty name in {args.policies!r}"
    if len(set(policies)) < len(policies):  # one row per policy: a second run's outputs went unchecked
        return f"--policies: a policy named twice in {args.policies!r}"
    for name in policies:
        try:
            parse_policy(name)
        except ValueError as exc:
            return f"--policies: {exc}"
    meters = ("auto", *SOURCES, "none")  # what `gelato.power.open_meter` and `--meter none` take
    if args.meter not in meters and not args.meter.startswith("replay:"):
        return f"--meter: unknown meter {args.meter!r} (one of {', '.join(meters)}, replay:FILE)"
    if args.radio not in (*RADIOS, "none"):
        return f"--radio: unknown radio {args.radio!r} (one of {', '.join((*RADIOS, 'none'))})"
    if args.json is not None and not args.json.parent.is_dir():  # written at the end: know now
        return f"--json: no such folder: {args.json.parent}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = check_args(args)
    if bad:
        parser.error(bad)
    try:
        with exit_on_signals():  # SIGTERM (`timeout`, a cancelled job) still stops the edge
            return run(args)
    except RuntimeError as exc:  # a device or edge process failed: its own output says why
        print(f"gelato-demo: error: {exc}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as exc:  # a device that hangs (the edge was stopped on the way out)
        print(f"gelato-demo: error: a device run took longer than {exc.timeout:g} s", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the edge was stopped on the way out; one line, as gelato-device
        print("gelato-demo: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:

    with tempfile.TemporaryDirectory() as tmp:
        if args.pair == "random":
            from gelato.tiny.random_pair import build_random_pair

            paths = build_random_pair(Path(tmp) / "pair")
            target, drafter = str(paths["target"]), str(paths["drafter_agree"])
        else:
            target, drafter = default_model_path("target"), default_model_path("drafter")
        prompts_file = Path(tmp) / "prompts.jsonl"
        prompts = demo_prompts(args.prompts)
        prompts_file.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in prompts))
        print(f"gelato-demo: edge target {target}\n             device drafter {drafter}", flush=True)
        edge = start_edge(["--target", target, "--threads", "1"])
        rows, runs = [], {}
        try:
            for policy in (p.strip() for p in args.policies.split(",")):  # as `check_args` read them
                records = run_device(
                    device_args(
                        drafter, edge.address, prompts_file, args.max_new_tokens, policy, args.meter, args.radio
                    )
                )
                runs[policy] = records
                rows.append(summarize(policy, records))
                print(f"  {policy}: done", flush=True)
        finally:
            edge.stop()
    reference = lossless_reference(list(runs))
    sample = runs[reference or next(iter(runs))][0]
    print(f"\nQ: {sample['prompt']}\nA: {sample['text']}\n")
    print(table(rows))
    print("\n" + "\n".join(energy_lines(rows, args.radio)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    bad = mismatches(runs, reference) if reference else []
    if bad:
        print(f"LOSSLESSNESS VIOLATED: outputs differ from {reference}'s for " + "; ".join(bad))
        return 1
    if "ar-edge" in runs:
        print("ar-edge = the edge decodes alone and streams its tokens (no drafting).")
    if "fixed-0" in runs:
        print("fixed-0 = no drafting, one device-edge round trip per token.")
    if "ar-device" in runs:
        print("ar-device = the drafter alone, no edge: not the target's output, not compared.")
    if reference and len(set(runs) - set(NOT_THE_TARGETS)) > 1:
        which = "Every row's" if not set(runs) & set(NOT_THE_TARGETS) else "Every edge-verified row's"
        print(f"{which} outputs were checked token for token against {reference}'s: identical (greedy).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
