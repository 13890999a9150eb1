"""`gelato-edge`: serve a target model for GELATO device sessions.

Contract (extend, don't break): `gelato-edge --target MODEL [--host 127.0.0.1] [--port 50051]
[--dtype D] [--device DEV]` binds at once with health NOT_SERVING, loads the target, then prints a
line containing `listening on HOST:PORT` (the real port when --port 0). SIGTERM/SIGINT stop it
gracefully. Without --target it serves the embedded default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from edge.server import EdgeConfig, EdgeServer
from gelato.cli_common import add_model_args, fail, setup_torch_threads
from gelato.models import ModelLoadError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gelato-edge", description="GELATO edge: batched target verification server")
    p.add_argument("--target", default=None, help="hub id or local folder (default: the embedded tiny target)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--max-draft-tokens", type=int, default=32, help="largest draft block accepted")
    p.add_argument("--log-level", default="WARNING")
    add_model_args(p)
    return p


async def serve(args: argparse.Namespace) -> int:
    config = EdgeConfig(
        host=args.host, port=args.port, max_sessions=args.max_sessions, max_draft_tokens=args.max_draft_tokens
    )
    server = EdgeServer(config)
    try:
        port = await server.start()
    except (OSError, RuntimeError) as exc:
        return fail(f"cannot listen on {args.host}:{args.port}: {exc}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loaded = await server.load(args.target, args.dtype, args.device)
    except ModelLoadError as exc:
        await server.stop(0)
        return fail(str(exc))
    print(
        f"gelato-edge: target {loaded.name} ({loaded.dtype}, {loaded.device}) listening on {args.host}:{port}",
        flush=True,
    )
    await stop.wait()
    print("gelato-edge: shutting down", file=sys.stderr, flush=True)
    await server.stop(5.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.max_sessions < 1 or args.max_draft_tokens < 1:
        return fail("--max-sessions and --max-draft-tokens must be >= 1")
    setup_torch_threads(args.threads)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
