"""Command-line pieces shared by `gelato-edge` and `gelato-device`.

Contract: `add_model_args` adds `--dtype`/`--device`/`--threads`; `setup_torch_threads` applies
`--threads` (one thread per process is the fastest on small CPUs, SPEC §9); `fail` prints a
one-line `error:` message and returns the CLI's exit status; `first_failed` picks the message of
the first bound a set of flags breaks. `port_number` and `endpoint` are
argparse types: a bad value is a usage error (exit 2) naming the flag, never a traceback or, as
gRPC does with a port above 65535, a silently different port.
"""

from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")


def first_failed(bounds: list[tuple[str, bool]]) -> str | None:
    """The message of the first (message, holds) pair that does not hold; None when all do."""
    return next((message for message, holds in bounds if not holds), None)


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0-65535, got {port}")
    return port


GRPC_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")


def endpoint(text: str) -> str:
    """HOST:PORT (IPv6 as [ADDR]:PORT) with a port in 1-65535, or a gRPC target URI naming several
    replicas (`dns:///edge:50051`, `ipv4:10.0.0.1:50051,10.0.0.2:50051`); returned unchanged."""
    if text.startswith(GRPC_TARGET_SCHEMES):
        if not text.split(":", 1)[1].strip("/"):
            raise argparse.ArgumentTypeError(f"a gRPC target needs addresses after the scheme, got {text!r}")
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or host in ("[]",):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"write an IPv6 address as [ADDR]:PORT, got {text!r}")
    if port_number(port) == 0:
        raise argparse.ArgumentTypeError(f"port must be in 1-65535, got 0 in {text!r}")
    return text


def setup_torch_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise SystemExit(fail("--threads must be >= 1"))
        torch.set_num_threads(threads)


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
