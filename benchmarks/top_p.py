"""What top-p filtering costs at a real vocabulary: `gelato.sampling.top_p_filter` against a full sort.

Contract: `python -m gelato.benchmarks.top_p [--vocab 151936] [--rows 1,5] [--spreads 8,4,3,2,1]
[--repeats 15] [--seed 0] [--out PATH]` builds, per logit spread `s`, rows of `s × N(0, 1)` logits
over `--vocab` entries, applies the temperature (and top-k) of each `SETTINGS` entry, and times on
the same probabilities `top_p_filter` (what `process_logits` runs) and `full_sort_top_p` (the same
nucleus found by sorting the whole row, as `process_logits` did before). It prints per spread,
setting and row count the nucleus size, both medians in ms and their ratio, and checks that both
keep the same tokens with the same probabilities; `--out PATH` also writes PATH.json and PATH.md.
One torch thread; this process pinned to one CPU where the OS allows.

Why spreads: how many tokens the nucleus holds decides the cost (a window of the most probable
tokens when it is small, a sort of the row when it is not), and random logits of a chosen spread
give every size from a handful of tokens (a trained model's usual next-token distribution) to most
of the vocabulary (a random-weight model's, e.g. the Qwen-shaped checkpoint of
`gelato.benchmarks.controller_overhead`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QWEN_VOCAB = 151936
# (temperature, top_p, top_k): a common nucleus setting, and Qwen2.5 instruct's shipped default.
SETTINGS = {"t0.7_top_p0.9": (0.7, 0.9, 0), "t0.7_top_p0.8_top_k20": (0.7, 0.8, 20)}
COLUMNS = ("spread", "rows", "nucleus (tokens per row)", "top_p_filter ms", "full sort ms", "speedup", "same")


def full_sort_top_p(probs: Any, top_p: float) -> Any:
    """The nucleus of `gelato.sampling.top_p_filter` (same prefix masses, ties with the crossing
    token kept), found by sorting the whole row: the reference."""
    import torch

    sorted_p = torch.sort(probs, dim=-1, descending=True).values
    before = sorted_p.double().cumsum(dim=-1) - sorted_p.double()
    kept = (before < top_p).sum(dim=-1, keepdim=True)
    out = probs.masked_fill(probs < sorted_p.gather(-1, kept - 1), 0.0)
    return out / out.sum(dim=-1, keepdim=True)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(vocab: int, rows: int, spread: float, setting: tuple[float, float, int], repeats: int, seed: int) -> dict:
    """One row of the table: nucleus sizes, both medians (alternating calls), same result or not."""
    import torch

    from gelato.sampling import top_p_filter

    temperature, top_p, top_k = setting
    gen = torch.Generator().manual_seed(seed)
    scaled = torch.randn(rows, vocab, generator=gen) * spread / temperature
    if top_k:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    fast, slow = top_p_filter(probs, top_p), full_sort_top_p(probs, top_p)
    same = torch.equal(fast > 0, slow > 0) and torch.allclose(fast, slow, rtol=0, atol=1e-7)
    fast_ms: list[float] = []
    slow_ms: list[float] = []
    for _ in range(3):  # alternating, so drift touches both alike
        fast_ms.append(_median_ms(lambda: top_p_filter(probs, top_p), repeats))
        slow_ms.append(_median_ms(lambda: full_sort_top_p(probs, top_p), repeats))
    fast_med, slow_med = statistics.median(fast_ms), statistics.median(slow_ms)
    return {
        "spread": spread,
        "rows": rows,
        "nucleus": (fast > 0).sum(dim=-1).tolist(),
        "window_ms": fast_med,
        "full_sort_ms": slow_med,
        "speedup": slow_med / fast_med,
        "same": bool(same),
    }


def render(result: dict) -> str:
    lines = [
        "# Top-p filtering at a real vocabulary",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; one torch thread; {result['pinning']}. Vocabulary {result['vocab']:,}; "
        f"logits `spread × N(0, 1)`, temperature (and top-k) applied, then top-p. Median ms per call "
        f"(median of 3 alternating runs of {result['repeats']} calls each). `same`: both keep the same tokens "
        "with the same probabilities.",
        "",
    ]
    for name, rows in result["settings"].items():
        lines += [f"## {name}", "", f"| {' | '.join(COLUMNS)} |", "|---:|---:|---|---:|---:|---:|---|"]
        for r in rows:
            nucleus = ", ".join(str(n) for n in r["nucleus"])
            lines.append(
                f"| {r['spread']:g} | {r['rows']} | {nucleus} | {r['window_ms']:.3f} | {r['full_sort_ms']:.3f} "
                f"| {r['speedup']:.2f}× | {'yes' if r['same'] else 'NO'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="top_p", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=QWEN_VOCAB, help="logits per row (default: Qwen2.5's 151,936)")
    p.add_argument("--rows", default="1,5", help="comma list: rows per call (1: a drafted token; 5: a K=4 verify)")
    p.add_argument("--spreads", default="8,4,3,2,1", help="comma list of logit spreads (peaked to flat)")
    p.add_argument("--repeats", type=int, default=15, help="calls per timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    try:
        rows = [int(x) for x in args.rows.split(",") if x.strip()]
        spreads = [float(x) for x in args.spreads.split(",") if x.strip()]
    except ValueError:
        p.error("--rows and --spreads take comma lists of numbers")
    if not rows or not spreads or min(rows) < 1 or min(spreads) <= 0 or args.vocab < 2 or args.repeats < 1:
        p.error("--rows >= 1, --spreads > 0, --vocab >= 2 and --repeats >= 1, each list non-empty")

    import torch

    from gelato.benchmarks.procs import machine, pin_to_one_cpu

    torch.set_num_threads(1)
    pinning = pin_to_one_cpu()
    result: dict[str, Any] = {
        "command": " ".join(["python -m gelato.benchmarks.top_p", *argv]),
        "machine": machine(),
        "pinning": pinning,
        "vocab": args.vocab,
        "repeats": args.repeats,
        "settings": {},
    }
    for name, setting in SETTINGS.items():
        out = result["settings"][name] = []
        for spread in spreads:
            for n in rows:
                r = measure(args.vocab, n, spread, setting, args.repeats, args.seed)
                out.append(r)
                print(json.dumps({"setting": name, **r}), flush=True)
    md = render(result)
    print(md)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(md)
    return 0 if all(r["same"] for rs in result["settings"].values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
