"""`gelato-edge`: serve a target model for GELATO device sessions.

Contract (extend, don't break): `gelato-edge --target MODEL [--host 127.0.0.1] [--port 50051]
[--dtype D] [--device DEV]` binds at once with health NOT_SERVING, loads the target, then prints a
line containing `listening on HOST:PORT` (the real port when --port 0). A port another process
already listens on is a one-line `error: port P on HOST is in use` (exit 2), never a second server
sharing it. SIGTERM/SIGINT stop it gracefully. Without --target it serves the embedded default.
Security: `--tls-cert/--tls-key` serve TLS (`--tls-client-ca`: clients must present a certificate
it signed), `--auth-token-file` requires `authorization: Bearer <token>` on every call but health.
Serving a non-loopback address needs both, or an explicit `--insecure`.
Operations: every flag is also an environment variable (`GELATO_EDGE_PORT`, ...; the command line
wins); SIGTERM drains open sessions for `--shutdown-grace-s`; `--health-port` also serves the gRPC
health service alone, in plaintext (for probes that cannot speak TLS); `gelato-edge --health-check
[ADDR]` asks an edge's health service once and exits 0 when it is SERVING, 1 otherwise (the
container health check). `--device-map`/`--max-memory`/`--offload-folder` place a target too large
for one device through accelerate.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

from gelato.cli_common import (
    EnvArgumentParser,
    add_model_args,
    endpoint,
    fail,
    first_failed,
    max_memory,
    port_number,
    setup_torch_threads,
)
from gelato.security import SecurityConfigError, is_loopback, read_token, server_credentials

if TYPE_CHECKING:  # torch and the server load only to serve: a health check stays light
    from edge.server import EdgeServer
    from gelato.models import LoadedModel

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
DEVICE_MAPS = ("auto", "balanced", "sequential")  # gelato.models.DEVICE_MAPS, without importing torch


def build_parser() -> argparse.ArgumentParser:
    p = EnvArgumentParser(
        prog="gelato-edge",
        description="GELATO edge: batched target verification server",
        env_prefix="GELATO_EDGE",
        env_skip={"health_check"},
    )
    p.add_argument("--target", default=None, help="hub id or local folder (default: the embedded tiny target)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=port_number, default=50051, help="0 picks a free port")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--max-draft-tokens", type=int, default=32, help="largest draft block accepted")
    p.add_argument(
        "--max-ahead-rounds",
        type=int,
        default=4,
        help="send-ahead (pipelined speculation): blocks a session may send past its last verdict; 0: off (default 4)",
    )
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
    p.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=5.0,
        help="on SIGTERM/SIGINT, let open sessions finish this long before cutting them (default 5)",
    )
    p.add_argument(
        "--health-port",
        type=port_number,
        default=None,
        help="also serve the gRPC health service alone, in plaintext, on this port (for probes without TLS)",
    )
    p.add_argument("--health-host", default="127.0.0.1", help="bind address of --health-port (default loopback)")
    p.add_argument(
        "--health-check",
        nargs="?",
        const="",
        default=None,
        type=lambda text: endpoint(text) if text else text,
        metavar="ADDR",
        help="do not serve: ask the edge at ADDR (default: this configuration's --health-port, else --port, "
        "on 127.0.0.1) whether it is SERVING; exit 0 if so, 1 otherwise",
    )
    p.add_argument("--health-check-timeout-s", type=float, default=3.0, help="deadline of --health-check")
    p.add_argument(
        "--device-map",
        default=None,
        choices=DEVICE_MAPS,
        help="place the target over the GPUs, CPU memory and disk with accelerate (a target too large for one "
        "device); replaces --device",
    )
    p.add_argument(
        "--max-memory",
        type=max_memory,
        default=None,
        metavar="DEV=SIZE,...",
        help="with --device-map: the most each device may hold, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
    )
    p.add_argument("--offload-folder", default=None, help="with --device-map: where weights beyond memory go")
    add_model_args(p)
    return p


def health_check(address: str, timeout_s: float, tls: bool = False) -> int:
    """One `grpc.health.v1.Health/Check` (overall status) in plaintext: 0 when SERVING, else 1."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        hint = " (this edge serves TLS there: check its --health-port instead)" if tls else ""
        print(f"gelato-edge: health {address}: {code.name if code else 'error'}: {details}{hint}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"gelato-edge: health {address}: {status}", flush=True)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


async def load_target(server: EdgeServer, args: argparse.Namespace) -> LoadedModel:
    """`server.load`, or with --device-map the same steps with accelerate's placement (the model
    thread loads; health flips to SERVING once the target is there)."""
    from gelato.models import ModelLoadError, execution_devices, load_model

    if args.device_map is None:
        return await server.load(args.target, args.dtype, args.device)
    from grpc_health.v1 import health_pb2

    load = functools.partial(
        load_model,
        args.target,
        "target",
        args.dtype,
        args.device,
        device_map=args.device_map,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
    )
    loaded = await asyncio.get_running_loop().run_in_executor(server.service.executor, load)
    where = sorted(str(d) for d in execution_devices(loaded.model))
    first = next(loaded.model.parameters()).device
    if where != [str(first)]:  # the KV pool lives where the first weight is, one device for all layers
        placed = getattr(loaded.model, "hf_device_map", {})
        raise ModelLoadError(
            f"--device-map {args.device_map} ran the target's layers on {', '.join(where)} and put its first weight "
            f"on {first} ({placed}); the edge keeps all sessions' KV on one device, so it needs one execution "
            "device holding the input embedding: give that device more --max-memory (weights beyond it may "
            "still lie in CPU memory or on disk)"
        )
    server.service.loaded = loaded
    await server._set_health(health_pb2.HealthCheckResponse.SERVING)
    return loaded


async def serve(args: argparse.Namespace) -> int:
    from edge.server import EdgeConfig, EdgeServer, PortInUseError
    from gelato.models import ModelLoadError

    config = EdgeConfig(
        host=args.host,
        port=args.port,
        max_sessions=args.max_sessions,
        max_draft_tokens=args.max_draft_tokens,
        max_ahead_rounds=args.max_ahead_rounds,
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
    health_server = None
    if args.health_port is not None:
        try:
            health_server = await serve_health(server, args.health_host, args.health_port)
        except OSError as exc:
            await server.stop(0)
            return fail(str(exc))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loaded = await load_target(server, args)
    except ModelLoadError as exc:
        await server.stop(0)
        if health_server is not None:
            await health_server.stop(0)
        return fail(str(exc))
    print(
        f"gelato-edge: target {loaded.name} ({loaded.dtype}, {loaded.device}) listening on {args.host}:{port}",
        flush=True,
    )
    await stop.wait()
    open_sessions = len(server.service.registry)
    print(
        f"gelato-edge: shutting down: health NOT_SERVING, {open_sessions} open session(s) get "
        f"{args.shutdown_grace_s:g} s to finish",
        file=sys.stderr,
        flush=True,
    )
    await server.stop(args.shutdown_grace_s)  # health NOT_SERVING at once, then the drain
    if health_server is not None:
        await health_server.stop(0)
    return 0


async def serve_health(server: EdgeServer, host: str, port: int) -> Any:
    """A second gRPC server with only the edge's health service (same status), in plaintext."""
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    from edge.server import port_in_use

    if port_in_use(host, port):
        raise OSError(f"--health-port {port} on {host} is in use")
    health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(server.health, health_server)
    try:
        bound = health_server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot serve health on {host}:{port}")
    await health_server.start()
    return health_server


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.health_check is not None:
        if args.health_check_timeout_s <= 0:
            return fail("--health-check-timeout-s must be > 0")
        address = args.health_check or f"127.0.0.1:{args.health_port or args.port}"
        tls = bool(args.tls_cert) and not args.health_check and args.health_port is None
        return health_check(address, args.health_check_timeout_s, tls)
    broken = first_failed(
        [
            ("--shutdown-grace-s must be >= 0", args.shutdown_grace_s >= 0),
            (
                "--max-memory and --offload-folder need --device-map",
                bool(args.device_map or not (args.max_memory or args.offload_folder)),
            ),
            (
                f"--device {args.device} and --device-map exclude each other: the map places the model",
                not args.device_map or args.device == "auto",
            ),
            ("--max-sessions must be >= 1", args.max_sessions >= 1),
            ("--max-draft-tokens must be >= 1", args.max_draft_tokens >= 1),
            ("--max-ahead-rounds must be >= 0", args.max_ahead_rounds >= 0),
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
