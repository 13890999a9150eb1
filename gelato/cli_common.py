"""Command-line pieces shared by `gelato-edge` and `gelato-device`.

Contract: `add_model_args` adds `--dtype`/`--device`/`--threads`; `setup_torch_threads` applies
`--threads` (one thread per process is the fastest on small CPUs, SPEC §9); `fail` prints a
one-line `error:` message and returns the CLI's exit status.
"""

from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")


def setup_torch_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise SystemExit(fail("--threads must be >= 1"))
        torch.set_num_threads(threads)


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
