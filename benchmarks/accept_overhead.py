"""Greedy acceptance of a batch: row by row against one transfer for the batch.

Contract: `python -m gelato.benchmarks.accept_overhead [--device cuda] [--vocab 152064] [--k 4]
[--rows 1,8,16,32,64] [--reps 50] [--out FILE.json]` prints, per batch size, the median time of
greedy acceptance over random float32 logits laid out as the KV pool returns them (views of one
`[rows, k+1, vocab]` tensor): row by row (`verify_greedy` per row: an argmax and a device-to-host
transfer each, what the edge did before) and batched (`gelato.edge.verifier.greedy_argmaxes`: the
argmaxes of every row, one transfer, then `accept_greedy` per row), and checks both give the same
verdicts. On a CPU the two are close (no device sync); on a GPU every transfer waits for the
device, so row by row pays one sync per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gelato.edge.verifier import greedy_argmaxes
from gelato.sampling import accept_greedy, verify_greedy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, vocab: int, k: int, rows: int, reps: int) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(rows)
    logits = torch.randn(rows, k + 1, vocab, generator=gen, device=device)
    views = [logits[i] for i in range(rows)]
    drafts = [tuple(int(x) for x in logits[i, :k].argmax(-1).tolist()) for i in range(rows)]  # all accepted
    one, batched = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a = [verify_greedy(v[-(k + 1) :], d) for v, d in zip(views, drafts, strict=True)]
        one.append(time.perf_counter() - t0)
        _sync(device)
        t0 = time.perf_counter()
        best = greedy_argmaxes(views, [k] * rows)
        b = [accept_greedy(best[j], d) for j, d in enumerate(drafts)]
        batched.append(time.perf_counter() - t0)
        if a != b:
            raise AssertionError(f"verdicts differ at {rows} rows: {a} != {b}")
    row_ms, batch_ms = statistics.median(one) * 1e3, statistics.median(batched) * 1e3
    return {"rows": rows, "row_by_row_ms": round(row_ms, 4), "batched_ms": round(batch_ms, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="accept_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=152064, help="Qwen2.5-7B's logit rows")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rows", default="1,8,16,32,64")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    levels = [measure(device, args.vocab, args.k, int(n), args.reps) for n in args.rows.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"greedy acceptance, {name}, vocab {args.vocab}, k {args.k}, median of {args.reps}")
    for r in levels:
        print(f"{r['rows']:>4} rows: row by row {r['row_by_row_ms']:.3f} ms, batched {r['batched_ms']:.3f} ms")
    if args.out:
        meta = {"device": name, "torch": torch.__version__, "vocab": args.vocab, "k": args.k, "reps": args.reps}
        args.out.write_text(json.dumps({"meta": meta, "levels": levels}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
