"""`gelato-edge`: serve a target model for GELATO device sessions.

Contract (extend, don't break): `gelato-edge --target MODEL [--host 127.0.0.1] [--port 50051]
[--dtype D] [--device DEV]` binds at once with health NOT_SERVING, loads the target, then prints a
line containing `listening on HOST:PORT` (the real port when --port 0). A port another process
already listens on is a one-line `error: port P on HOST is in use` (exit 2), never a second server
sharing it. SIGTERM/SIGINT stop it gracefully. Without --target it serves the embedded default.
Security: `--tls-cert/--tls-key` serve TLS (`--tls-client-ca`: clients must present a certificate
it signed), `--auth-token-file` requires `authorization: Bearer <token>` on every call but health.
Serving a non-loopback address needs both, or an explicit `--insecure`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from edge.server import EdgeConfig, EdgeServer, PortInUseError
from gelato.cli_common import add_model_args, fail, first_failed, port_number, setup_torch_threads
from gelato.models import ModelLoadError
from gelato.security import SecurityConfigError, is_loopback, read_token, server_credentials

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gelato-edge", description="GELATO edge: batched target verification server")
    p.add_argument("--target", default=None, help="hub id or local folder (default: the embedded tiny target)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=port_number, default=50051, help="0 picks a free port")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--max-draft-tokens", type=int, default=32, help="largest draft block accepted")
    p.add_argument("--kv-budget-mb", type=float, default=0.0, help="target KV memory for sessions (0: no limit)")
    p.add_argument("--batch-window-ms", type=float, default=2.0, help="wait this long for more rows to batch")
    p.add_argument("--max-batch", type=int, default=16, help="most draft blocks verified in one forward")
    p.add_argument("--idle-timeout-s", type=float, default=300.0, help="free sessions idle this long")
    p.add_argument("--metrics-port", type=port_number, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS)
    p.add_argument("--tls-cert", default=None, help="PEM server certificate (chain): serve TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates it signed (mutual TLS)")
    p.add_argument("--auth-token-file", default=None, help="file holding the bearer token every call must carry")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback --host without TLS and a token (anyone who reaches the port can use it)",
    )
    add_model_args(p)
    return p


async def serve(args: argparse.Namespace) -> int:
    config = EdgeConfig(
        host=args.host,
        port=args.port,
        max_sessions=args.max_sessions,
        max_draft_tokens=args.max_draft_tokens,
        kv_budget_mb=args.kv_budget_mb,
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        idle_timeout_s=args.idle_timeout_s,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=args.auth_token,
    )
    server = EdgeServer(config)
    if args.metrics_port is not None:
        try:
            server.service.metrics.serve(args.host, args.metrics_port)
        except OSError as exc:
            return fail(f"cannot serve metrics on {args.host}:{args.metrics_port}: {exc}")
    try:
        port = await server.start()
    except PortInUseError as exc:  # another edge (or anything) listens there: say so, in one line
        return fail(str(exc))
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
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    broken = first_failed(
        [
            ("--max-sessions must be >= 1", args.max_sessions >= 1),
            ("--max-draft-tokens must be >= 1", args.max_draft_tokens >= 1),
            ("--max-batch must be >= 1", args.max_batch >= 1),
            ("--batch-window-ms must be >= 0", args.batch_window_ms >= 0),
            ("--kv-budget-mb must be >= 0", args.kv_budget_mb >= 0),
            ("--idle-timeout-s must be > 0", args.idle_timeout_s > 0),
        ]
    )
    if broken:
        return fail(broken)
    problem = security_problem(args)
    if problem:
        return fail(problem)
    setup_torch_threads(args.threads)
    return asyncio.run(serve(args))


def security_problem(args: argparse.Namespace) -> str | None:
    """Check the TLS/token flags (reading the files now, so a bad path costs no model load) and
    refuse an exposed port without them; sets `args.auth_token`."""
    args.auth_token = None
    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    if args.tls_client_ca and not args.tls_cert:
        return "--tls-client-ca needs --tls-cert/--tls-key (mutual TLS is TLS first)"
    try:
        if args.tls_cert:
            server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        if args.auth_token_file:
            args.auth_token = read_token(args.auth_token_file)
    except SecurityConfigError as exc:
        return str(exc)
    if not is_loopback(args.host) and not (args.tls_cert and args.auth_token) and not args.insecure:
        return (
            f"refusing to serve {args.host} without TLS and a token: anyone who reaches the port could use "
            "the edge; pass --tls-cert/--tls-key and --auth-token-file, or --insecure to accept that"
        )
    return None


if __name__ == "__main__":
    raise SystemExit(main())
