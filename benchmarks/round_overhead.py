"""Where a loopback round's time goes, and how far it is from the models' own cost.

Contract: `python -m gelato.benchmarks.round_overhead [--n 10] [--max-new-tokens 128] [--k 4] [--repeats 1]
[--prompts gsm8k|demo] [--out benchmarks/results/round_overhead_cpu]` runs on the built-in tiny pair
(or `--target/--drafter`), greedy, one torch thread per process; with two or more cores the edge and
the echo server run on one core, this process and the device on another. Per repeat, one after the
other (so that a ratio's two sides see the same machine):

- plain: a real `gelato-edge` and real `gelato-device --policy fixed-0` (unpipelined, then with
  `--pipeline send-ahead`: its empty blocks sent ahead; then `ar-edge`: the edge decoding alone,
  streaming its tokens, no block per token, up to `--stream-tokens` a message, and again with one a
  message) then `fixed-K` processes (unpipelined, then
  `fixed-K` and `gelato` with `--pipeline send-ahead`: the next block drafted while the edge
  verifies), nothing instrumented: tokens/s and the round loop's own round time (`--trace`
  t_round_s); each followed by its in-process reference: the target decoding alone (a KV-cached
  greedy loop, and `generate()`) after fixed-0, transformers' assisted generation with the same
  pair at K (constant schedule, no confidence stop) and at its defaults after fixed-K;
- echo: grpc.aio bidi streams in another process with the real channel and server options and the
  edge handler's shape, a block up and a verdict down (`ECHO_VARIANTS`: bare bytes, `wait_for`
  reads, protobuf messages, and protobuf with a model-thread-like pause in the handler); each reply
  carries the handler's own time, so transit = round trip - handler time, as in the rounds;
- raw forwards with the caches the real code uses (drafter: K one-token forwards on a
  `DynamicCache`; target: one forward over K+1 tokens, and over 1, on a `DynamicCache` and through
  the edge's `KVPool`) at the runs' mean context.

Then, once: an edge process running `gelato.edge.cli`'s own `main` with timers wrapped around the real
functions of its hot path (message parse, block decode, session checks, the batcher's queue, the
model thread, `pooled_forward`, the model forward, acceptance, verdict encode), and in this process
the real `EdgeClient` round loop with timers around the drafter's forwards, entropy, drafting, verdict
apply, the drafter-thread offload, block encode, stream write/read and verdict decode. Every round
is split into disjoint parts that sum to it: timed calls, and differences between nested timers
(thread hops, gRPC transit, bookkeeping); the transit is also split into its way up and down by the
shared monotonic clock. Means over rounds, without one warm-up generation per policy and without
rounds slower than median + 5 MAD (preempted by another process). Edge CPU per verdict comes from
the edge process's CPU time over each session.

It prints a table and, with `--out`, writes OUT.json and OUT.md: the command, the machine, the load
average, every number, and the overhead outside the model forwards ranked with what could cut each
part. Ratios of tokens/s are medians over repeats of each repeat's ratio. A shared machine drifts:
compare ratios within one run. The instrumentation costs under a microsecond or so per timed call
(measured and reported).

The phases live in sibling modules: `round_overhead_timers` (Recorder, timed, Patches),
`round_overhead_instrument` (the instrumented edge and device), `round_overhead_echo` (the gRPC
echo), `round_overhead_refs` (raw forwards, in-process references, plain runs),
`round_overhead_analysis` (a round's decomposition) and `round_overhead_report` (the markdown).
This module is the CLI: it runs them in order and re-exports their public names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from gelato.benchmarks.round_overhead_analysis import (
    COMPONENTS,
    STATUS,
    decompose,
    ranked_overhead,
    summarize_policy,
)
from gelato.benchmarks.round_overhead_echo import (
    ECHO_SERVICE,
    ECHO_VARIANTS,
    ECHO_WORK_MS,
    _serve_echo,
    echo_rounds,
    sample_messages,
)
from gelato.benchmarks.round_overhead_instrument import _serve_edge, device_timers, instrumented_device
from gelato.benchmarks.round_overhead_refs import (
    _sum_runs,
    assistant_settings,
    assisted_runs,
    model_thread_alone,
    plain_run,
    raw_forwards,
    target_alone,
)
from gelato.benchmarks.round_overhead_report import (
    AHEAD,
    STREAMS,
    STREAMS_EACH,
    ahead_name,
    markdown,
    summary_lines,
    table,
)
from gelato.benchmarks.round_overhead_timers import Patches, Recorder, timed, wrapper_cost_us
from gelato.device.policy import PolicyOptions

__all__ = [
    "COMPONENTS",
    "DEFAULT_POLICIES",
    "ECHO_SERVICE",
    "ECHO_VARIANTS",
    "ECHO_WORK_MS",
    "STATUS",
    "STREAMS",
    "STREAMS_EACH",
    "Patches",
    "Recorder",
    "assistant_settings",
    "assisted_runs",
    "decompose",
    "device_timers",
    "echo_rounds",
    "instrumented_device",
    "load_prompts",
    "main",
    "markdown",
    "model_thread_alone",
    "plain_run",
    "ranked_overhead",
    "raw_forwards",
    "run",
    "sample_messages",
    "summarize_policy",
    "summary_lines",
    "table",
    "target_alone",
    "timed",
    "wrapper_cost_us",
]

DEFAULT_POLICIES = ("fixed-0", "fixed-4")


def load_prompts(source: str, n: int, data: Path | None = None) -> tuple[list[str], str]:
    """`n` prompts: GSM8K test questions from `data` (which must exist), else from the default path
    (`$GELATO_GSM8K_DIR`, or shared/data/gsm8k beside the checkout) when found; else the demo's."""
    if source == "gsm8k":
        from gelato.tiny.train import default_gsm8k_path

        path = data or default_gsm8k_path("test")
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                return [json.loads(line)["question"] for line, _ in zip(f, range(n), strict=False)], "GSM8K test"
    from gelato.benchmarks.demo import demo_prompts

    return demo_prompts(n), "the demo's synthetic problems"


def run(args: argparse.Namespace, argv: list[str], cores: list[int]) -> dict[str, Any]:
    """Every phase; `cores`: the CPUs this process may use (the edge gets the first, the rest of
    the work the second, when there are two)."""
    import grpc
    import torch
    import transformers

    from gelato.benchmarks.procs import machine, start_edge
    from gelato.models import encode_prompt, load_model

    k = args.k
    policies = ["fixed-0", f"fixed-{k}"]
    load = {"start": os.getloadavg()[0]}
    texts, source = load_prompts(args.prompts, args.n, args.data)
    target = load_model(args.target, "target", "float32", "cpu")
    drafter = load_model(args.drafter, "drafter", "float32", "cpu")
    prompts = [encode_prompt(drafter.tokenizer, t) for t in texts]
    pin = len(cores) >= 2 and shutil.which("taskset") is not None
    edge_prefix = ["taskset", "-c", str(cores[0])] if pin else []
    pinning = (
        f"edge and echo processes on CPU {cores[0]}, device and references on CPU {cores[1]}" if pin else "not pinned"
    )
    edge_args = ["--threads", "1", *(["--target", args.target] if args.target else [])]
    me = [sys.executable, "-m", "gelato.benchmarks.round_overhead"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prompts_file = tmp / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in [texts[0], *texts]))
        acc: dict[str, list[dict[str, Any]]] = {}
        raw: list[dict[str, float]] = []
        echoes: dict[str, list[tuple[float, float]]] = {v: [] for v in ECHO_VARIANTS}
        # Everything a ratio compares is measured in each repeat, one after the other (a plain run,
        # then its in-process reference; the echo and the raw forwards), so that the machine's
        # drift touches both sides of each ratio alike.
        edge = start_edge(edge_args, prefix=edge_prefix)
        echo = None
        try:
            echo = start_edge([], prefix=[*edge_prefix, *me, "--serve-echo", str(k), "--"])
            for r in range(args.repeats):
                print(
                    f"plain runs, references and floors, repeat {r + 1}/{args.repeats} ...", file=sys.stderr, flush=True
                )
                pid = edge.proc.pid
                acc.setdefault("fixed-0", []).append(
                    plain_run(edge.address, args.drafter, prompts_file, "fixed-0", args.max_new_tokens, edge_pid=pid)
                )
                acc.setdefault(AHEAD, []).append(
                    plain_run(
                        edge.address, args.drafter, prompts_file, "fixed-0", args.max_new_tokens, "send-ahead", pid
                    )
                )
                acc.setdefault(STREAMS, []).append(
                    plain_run(edge.address, args.drafter, prompts_file, STREAMS, args.max_new_tokens, edge_pid=pid)
                )
                acc.setdefault(STREAMS_EACH, []).append(
                    plain_run(
                        edge.address,
                        args.drafter,
                        prompts_file,
                        STREAMS,
                        args.max_new_tokens,
                        edge_pid=pid,
                        extra=("--stream-tokens", "1"),
                    )
                )
                for name, res in target_alone(target, prompts, args.max_new_tokens).items():
                    acc.setdefault(f"target_{name}", []).append(res)
                acc.setdefault("model_thread_alone", []).append(
                    model_thread_alone(target, prompts, args.max_new_tokens)
                )
                acc.setdefault(policies[1], []).append(
                    plain_run(edge.address, args.drafter, prompts_file, policies[1], args.max_new_tokens, edge_pid=pid)
                )
                for policy in (policies[1], "gelato"):  # drafted blocks sent ahead: drafting overlaps verifying
                    acc.setdefault(ahead_name(policy), []).append(
                        plain_run(
                            edge.address, args.drafter, prompts_file, policy, args.max_new_tokens, "send-ahead", pid
                        )
                    )
                for name, res in assisted_runs(target, drafter, prompts, args.max_new_tokens, k).items():
                    acc.setdefault(f"assisted_{name}", []).append(res)
                for v in ECHO_VARIANTS:
                    echoes[v] += asyncio.run(echo_rounds(echo.address, v, k, args.echo_rounds))
                # The raw forwards at the runs' mean context: the prompt plus half the output.
                context = round(
                    statistics.fmean(len(p) for p in prompts) + acc["fixed-0"][0]["tokens"] / len(prompts) / 2
                )
                raw.append(raw_forwards(drafter, target, context, k, args.raw_reps))
        finally:
            edge.stop()
            if echo is not None:
                echo.stop()
        plain = {n: _sum_runs(acc[n]) for n in policies}
        references = {
            "target": {n: _sum_runs(acc[f"target_{n}"]) for n in ("loop", "generate")},
            "model_thread_alone": _sum_runs(acc["model_thread_alone"]),
            "assisted": {n: _sum_runs(acc[f"assisted_{n}"]) for n in (f"k{k}", "defaults")},
        }
        load["before_instrumented"] = os.getloadavg()[0]
        print("instrumented edge and device ...", file=sys.stderr, flush=True)
        stats = tmp / "edge_stats.json"
        edge = start_edge(edge_args, prefix=[*edge_prefix, *me, "--serve-edge", str(stats), "--"])
        try:
            device = asyncio.run(instrumented_device(edge.address, drafter, prompts, policies, args.max_new_tokens))
        finally:
            edge.stop()
        edge_stats = json.loads(stats.read_text())
    # Per quantity the median over repeats: a repeat that another process preempted does not count.
    floors: dict[str, Any] = {key: statistics.median(r[key] for r in raw) for key in raw[0]}
    floors["context_tokens"] = raw[0]["context_tokens"]
    floors["raw_per_repeat"] = raw
    up, down = sample_messages(k)
    floors["echo"] = {}
    for v, rounds in echoes.items():
        rtt = sorted(r for r, _ in rounds)
        floors["echo"][v] = {
            "median_ms": statistics.median(rtt) * 1e3,
            "mean_ms": statistics.fmean(rtt) * 1e3,
            "p90_ms": rtt[int(0.9 * (len(rtt) - 1))] * 1e3,
            # As the decomposition's transit: the round trip minus the server handler's own time.
            "transit_mean_ms": statistics.fmean(r - h for r, h in rounds) * 1e3,
            "transit_median_ms": statistics.median(r - h for r, h in rounds) * 1e3,
            "rounds": len(rounds),
            "what": ECHO_VARIANTS[v],
        }
    floors.update(echo_rtt_ms=floors["echo"]["bare"]["median_ms"], bytes_up=up.ByteSize(), bytes_down=down.ByteSize())

    def tps(run: dict[str, Any]) -> float:
        return float(run["tokens"] / run["seconds"])

    # Each ratio per repeat (its two sides measured one after the other), then the median.
    fk = f"fixed-{k}"
    pairs = {
        "fixed0_vs_target_loop": ("fixed-0", "target_loop"),
        "fixed0_vs_target_generate": ("fixed-0", "target_generate"),
        "fixed0_ahead_vs_target_loop": (AHEAD, "target_loop"),
        "ar_edge_vs_target_loop": (STREAMS, "target_loop"),
        "ar_edge_each_vs_target_loop": (STREAMS_EACH, "target_loop"),
        "ar_edge_vs_ar_edge_each": (STREAMS, STREAMS_EACH),
        "fixedk_vs_assisted_k": (fk, f"assisted_k{k}"),
        "fixedk_vs_assisted_defaults": (fk, "assisted_defaults"),
        "fixedk_ahead_vs_assisted_k": (ahead_name(fk), f"assisted_k{k}"),
        "fixedk_ahead_vs_assisted_defaults": (ahead_name(fk), "assisted_defaults"),
        "gelato_ahead_vs_assisted_defaults": (ahead_name("gelato"), "assisted_defaults"),
    }
    pipelined = [AHEAD, ahead_name(fk), ahead_name("gelato")]
    per_repeat = {
        name: [tps(x) / tps(y) for x, y in zip(acc[a], acc[b], strict=True)] for name, (a, b) in pairs.items()
    }
    cost = wrapper_cost_us()
    pols = {n: summarize_policy(n, device, edge_stats, plain[n], floors, k) for n in policies}
    calls = statistics.fmean(p["timed_calls_per_round"] for p in pols.values())
    command = "python -m gelato.benchmarks.round_overhead " + " ".join(shlex.quote(a) for a in argv)
    return {
        "meta": {
            "command": command.strip(),
            "machine": machine(),
            "pinning": pinning,
            "pair": "embedded" if not (args.target or args.drafter) else "given",
            "target": target.name,
            "drafter": drafter.name,
            "prompts": source,
            "n": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "k": k,
            "stream_tokens": PolicyOptions().stream_tokens,  # ar-edge's default, as its runs used it
            "repeats": args.repeats,
            "threads_per_process": 1,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
            "wrapper_cost_us": cost,
            "instrumentation_us_per_round": cost * calls,
            "load_average_1min": {**load, "end": os.getloadavg()[0]},
            "not_instrumented": sorted(set(device["missing"]) | set(edge_stats["missing"])),
        },
        "policies": pols,
        "floors": floors,
        "references": references,
        "pipelined": {p: {n: v for n, v in _sum_runs(acc[p]).items() if n != "token_ids"} for p in pipelined},
        "streamed": {n: v for n, v in _sum_runs(acc[STREAMS]).items() if n != "token_ids"},
        "streamed_each": {n: v for n, v in _sum_runs(acc[STREAMS_EACH]).items() if n != "token_ids"},
        "ratios": {name: statistics.median(values) for name, values in per_repeat.items()},
        "ratios_per_repeat": per_repeat,
        # Another process only ever slows a run down: the best repeat of each side, compared.
        "ratios_of_best": {
            name: max(tps(x) for x in acc[a]) / max(tps(y) for y in acc[b]) for name, (a, b) in pairs.items()
        },
        "lossless": lossless(acc, [*policies, *pipelined, STREAMS, STREAMS_EACH]),
    }


def lossless(acc: dict[str, list[dict[str, Any]]], runs: list[str]) -> bool:
    """Every repeat of every run in `runs` gave fixed-0's first output (the edge decoding alone,
    greedy): one repeat or one run that differs makes the whole benchmark not lossless."""
    want = acc["fixed-0"][0]["token_ids"]
    return all(r["token_ids"] == want for p in runs for r in acc[p])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-edge"]:
        return _serve_edge(argv[1:])
    if argv[:1] == ["--serve-echo"]:
        return _serve_echo(argv[1:])
    p = argparse.ArgumentParser(prog="round_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=None, help="target checkpoint (default: the embedded tiny target)")
    p.add_argument("--drafter", default=None, help="drafter checkpoint (default: the embedded tiny drafter)")
    p.add_argument("--n", type=int, default=10, help="prompts")
    p.add_argument("--prompts", choices=["gsm8k", "demo"], default="gsm8k", help="GSM8K test (when found) or demo")
    p.add_argument(
        "--data", type=Path, default=None, help="GSM8K test JSONL (default: $GELATO_GSM8K_DIR, else the shared copy)"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="drafts per round of the speculative run (fixed-K)")
    p.add_argument("--echo-rounds", type=int, default=2000)
    p.add_argument("--raw-reps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=1, help="alternations of plain runs and in-process references")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    if min(args.n, args.k, args.max_new_tokens, args.repeats, args.echo_rounds, args.raw_reps) < 1:
        p.error("--n, --k, --max-new-tokens, --repeats, --echo-rounds and --raw-reps must be >= 1")
    if args.data is not None and not args.data.is_file():
        p.error(f"--data {args.data}: no such file")

    import torch

    threads, affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    cores = sorted(affinity)
    torch.set_num_threads(1)
    if len(cores) >= 2 and shutil.which("taskset"):
        os.sched_setaffinity(0, {cores[1]})  # the device and the references; the edge gets cores[0]
    try:
        result = run(args, argv, cores)
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, affinity)
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    return 0 if result["lossless"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
