"""What a model forward costs after a gap, on this machine: the term the round-overhead floor leaves out.

Contract: `python -m gelato.benchmarks.forward_gap [--gaps-ms 0,1,5,15] [--repeats 5] [--calls 60]
[--context 120] [--drafter M] [--target M] [--out PATH]` times one-token cached forwards of the
drafter and the target (the built-in pair by default; one torch thread, this process pinned to one
CPU where the OS allows), each forward after a gap spent asleep (`sleep`: a thread waiting for the
other side of a round) or spinning in Python (`spin`: the core busy with other work meanwhile), and
prints the median ms per gap and its ratio to forwards back to back (gap 0); `--out PATH` also writes PATH.json
and PATH.md. `measure(loaded, context, gaps_s, repeats, calls, how)` is the measurement.

Why: the round-overhead floor (`gelato.benchmarks.round_overhead`) uses raw forwards timed back to
back. In a round each side's first forward comes after the other side's part of the round (the
drafter's after the edge's verify, the target's after the device's drafting), so what a gap costs
here is part of a round that no code change removes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _wait(gap_s: float, how: str) -> None:
    if gap_s <= 0:
        return
    if how == "sleep":
        time.sleep(gap_s)
        return
    end = time.perf_counter() + gap_s
    while time.perf_counter() < end:  # Python work: the core stays busy, caches see other data
        pass


def measure(loaded: Any, context: int, gaps_s: list[float], repeats: int, calls: int, how: str) -> dict[float, float]:
    """Median seconds of one cached one-token forward (`KVSequence.forward_last`, as the drafter
    drafts) after each gap; per gap the median over `repeats` of the median over `calls` forwards
    (the first 5 of each run dropped). The gaps alternate within each repeat; the cache is reset to
    `context` tokens whenever it grows 80 past it, so every forward sees about the same context."""
    import torch

    from gelato.benchmarks.demo import demo_prompts
    from gelato.kv import KVSequence
    from gelato.models import encode_prompt

    base = encode_prompt(loaded.tokenizer, demo_prompts(1)[0])  # a synthetic problem, as the demo's
    ids = (base * (context // max(len(base), 1) + 1))[:context]

    def fresh() -> KVSequence:
        seq = KVSequence(loaded.model, loaded.vocab_size, list(ids))
        seq.prefill(context)
        return seq

    per_gap: dict[float, list[float]] = {g: [] for g in gaps_s}
    with torch.inference_mode():
        for _ in range(repeats):
            for gap in gaps_s:
                seq, token, times = fresh(), int(ids[-1]), []
                for _ in range(calls + 5):
                    _wait(gap, how)
                    t0 = time.perf_counter()
                    token = int(seq.forward_last((token,)).argmax())
                    times.append(time.perf_counter() - t0)
                    if len(seq.tokens) > context + 80:
                        seq = fresh()
                per_gap[gap].append(statistics.median(times[5:]))
    return {g: statistics.median(v) for g, v in per_gap.items()}


def markdown(result: dict[str, Any]) -> str:
    out = [
        "# Forward after a gap",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']}; {result['pinning']}; one torch thread; {result['context']} cached tokens; "
        f"median over {result['repeats']} repeats of the median of {result['calls']} one-token forwards.",
        "",
        "| model | gap | " + " | ".join(f"{g:g} ms" for g in result["gaps_ms"]) + " |",
        "|---|---|" + "---:|" * len(result["gaps_ms"]),
    ]
    for row in result["rows"]:
        cells = [f"{ms:.3f} ({ms / row['ms'][0]:.2f}×)" for ms in row["ms"]]
        out.append(f"| {row['model']} | {row['how']} | " + " | ".join(cells) + " |")
    out += ["", "ms per forward (× the forwards back to back, gap 0)."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="forward_gap", description=__doc__.split("\n\n")[0])
    p.add_argument("--gaps-ms", default="0,1,5,15", help="comma list of gaps in ms (0 first: the reference)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=60, help="forwards per gap and repeat")
    p.add_argument("--context", type=int, default=120, help="cached tokens")
    p.add_argument("--drafter", default=None, help="drafter checkpoint (default: the embedded tiny drafter)")
    p.add_argument("--target", default=None, help="target checkpoint (default: the embedded tiny target)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = p.parse_args(argv)
    try:
        gaps_ms = [float(x) for x in args.gaps_ms.split(",") if x.strip()]
    except ValueError:
        p.error(f"--gaps-ms: not a comma list of numbers: {args.gaps_ms!r}")
    if not gaps_ms or gaps_ms[0] != 0 or min(gaps_ms) < 0:
        p.error("--gaps-ms must start with 0 (the reference) and hold no negative gap")
    if min(args.repeats, args.calls, args.context) < 1:
        p.error("--repeats, --calls and --context must be >= 1")

    import torch

    from gelato.benchmarks.procs import machine, pin_to_one_cpu
    from gelato.models import load_model

    torch.set_num_threads(1)
    pinning = pin_to_one_cpu()
    gaps_s = [g / 1e3 for g in gaps_ms]
    rows = []
    for role, path in (("drafter", args.drafter), ("target", args.target)):
        loaded = load_model(path, role, "float32", "cpu")
        for how in ("sleep", "spin"):
            ms = measure(loaded, args.context, gaps_s, args.repeats, args.calls, how)
            rows.append({"model": role, "how": how, "ms": [ms[g] * 1e3 for g in gaps_s]})
    result = {
        "command": " ".join(["python -m gelato.benchmarks.forward_gap", *argv]),
        "machine": machine(),
        "pinning": pinning,
        "context": args.context,
        "repeats": args.repeats,
        "calls": args.calls,
        "gaps_ms": gaps_ms,
        "rows": rows,
    }
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
