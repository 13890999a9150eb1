"""`gelato-edge`: serve a target model for GELATO device sessions.

Contract (extend, don't break): `gelato-edge [options]` binds at once with health NOT_SERVING, loads
the target (without --target: the embedded default), then prints a line containing `listening on
HOST:PORT` (the real port when --port 0). A port another process already listens on is a one-line
`error: port P on HOST is in use` (exit 2), never a second server sharing it. SIGTERM/SIGINT stop
it gracefully (open sessions get --shutdown-grace-s; a second signal exits at once, 128 + its
number). Serving a non-loopback address needs TLS
and a token or client certificates (`--tls-client-ca`), or an explicit `--insecure`; a bad TLS or
token file is a one-line error naming it (exit 2).
A target that cannot be loaded (no such model, no room for it on the device, any other failure) is a
one-line error (exit 2), never a traceback (an unforeseen failure's is logged at --log-level DEBUG).
Metrics (--metrics-port) go on --metrics-host (default 127.0.0.1), never on --host; --metrics-port
and --health-port must name a port (>= 1): 0 would bind one that nobody is told.
`gelato-edge --health-check [ADDR]` asks an edge's health service once and exits 0 when it is
SERVING, 1 otherwise (the container health check). Every option, its default and its
`GELATO_EDGE_*` variable: `gelato-edge --help`, made from `gelato.edge.config.EdgeConfig`.
Bad settings are one-line usage errors naming the flag (exit 2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, NoReturn

from gelato.channel import host_port
from gelato.cli_common import EnvArgumentParser, endpoint, fail, say, setup_logging, setup_torch_threads
from gelato.config import ConfigError
from gelato.edge.config import EdgeConfig
from gelato.security import SecurityConfigError, is_loopback, read_token, server_credentials

if TYPE_CHECKING:  # torch and the server load only to serve: a health check stays light
    from gelato.edge.server import EdgeServer
    from gelato.models import LoadedModel

# After a shutdown's drain, how long a forward still running (its stream already ended) may take
# before the process exits without it.
MODEL_THREAD_EXIT_S = 0.5
log = logging.getLogger("gelato.edge")


def build_parser() -> EnvArgumentParser:
    """Every `EdgeConfig` setting as an option (and a `GELATO_EDGE_*` variable), plus
    `--health-check`: a one-shot action, not a setting of the server, so it has no variable."""
    p = EnvArgumentParser(
        prog="gelato-edge",
        description="GELATO edge: batched target verification server",
        env_prefix="GELATO_EDGE",
        env_skip={"health_check"},
    )
    EdgeConfig.add_arguments(p)
    p.add_argument(
        "--health-check",
        nargs="?",
        const="",
        default=None,
        type=lambda text: endpoint(text) if text else text,
        metavar="ADDR",
        help="do not serve: ask the edge at ADDR (default: where this configuration serves health: "
        "--health-host:--health-port, else --host:--port, a wildcard host through loopback) whether it is "
        "SERVING; exit 0 if so, 1 otherwise",
    )
    return p


def health_check(address: str, timeout_s: float, tls: bool = False) -> int:
    """One `grpc.health.v1.Health/Check` (overall status) in plaintext: 0 when SERVING, else 1."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gelato.channel import PLAINTEXT_OPTIONS

    try:
        with grpc.insecure_channel(address, options=PLAINTEXT_OPTIONS) as channel:  # never via a proxy
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        hint = " (this edge serves TLS there: check its --health-port instead)" if tls else ""
        say(f"gelato-edge: health {address}: {code.name if code else 'error'}: {details}{hint}", logging.ERROR)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"gelato-edge: health {address}: {status}", flush=True)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


async def load_target(server: EdgeServer, config: EdgeConfig) -> LoadedModel:
    """`server.load`, or with --device-map the same steps with accelerate's placement (the model
    thread loads; health flips to SERVING once the target is there). A placement the KV pool cannot
    follow (a layer whose parts run on different devices) is a ModelLoadError naming it."""
    from gelato.edge.placement import model_kv_devices
    from gelato.models import ModelLoadError, load_model

    if config.device_map is None:
        return await server.load(config.target, config.dtype, config.device)

    load = functools.partial(
        load_model,
        config.target,
        "target",
        config.dtype,
        config.device,
        device_map=config.device_map,
        max_memory=config.max_memory,
        offload_folder=config.offload_folder,
    )
    loaded = await asyncio.get_running_loop().run_in_executor(server.service.executor, load)
    try:  # each layer's KV goes where the layer runs (gelato.edge.kv_pool)
        devices = model_kv_devices(loaded.model)
    except ValueError as exc:
        raise ModelLoadError(f"--device-map {config.device_map}: {exc}") from None
    runs = ", ".join(f"{devices.count(d)} on {d}" for d in dict.fromkeys(devices))
    say(f"gelato-edge: --device-map {config.device_map}: layers (and their KV) run {runs}", logging.INFO)
    return await server.serve_loaded(loaded)


def _exit_now(line: str, code: int) -> NoReturn:
    """Say `line` and exit with `code` without the interpreter's teardown (which joins the model
    thread, however long its forward still runs)."""
    say(line)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def _stop_now(sig: signal.Signals) -> None:
    """A second SIGTERM or Ctrl-C during the drain: exit at once (128 + the signal's number); the
    open sessions' devices see the connection go, as when an edge dies, and fail over."""
    _exit_now(f"gelato-edge: {sig.name} again: exiting now, without waiting for open sessions", 128 + sig)


async def serve(config: EdgeConfig) -> int:
    from gelato.edge.server import EdgeServer, PortInUseError
    from gelato.models import ModelLoadError, load_failure
    from gelato.security import SecurityConfigError

    server = EdgeServer(config)
    stop = asyncio.Event()  # set by SIGTERM / Ctrl-C from here on, also while the target loads
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():  # an embedder's thread gets no signals
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    if _EARLY_STOP:  # asked to stop while starting: as while the target loads, at once
        stop.set()
    if config.metrics_port is not None:  # on --metrics-host (loopback by default), never on --host
        try:
            server.service.metrics.serve(config.metrics_host, config.metrics_port)
        except OSError as exc:
            return fail(f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {exc}")
    try:
        port = await server.start()
    except PortInUseError as exc:  # another edge (or anything) listens there: say so, in one line
        return fail(str(exc))
    except SecurityConfigError as exc:  # a TLS file changed since the settings were checked (rotated, unmounted)
        return fail(str(exc))
    except (OSError, RuntimeError) as exc:
        return fail(f"cannot listen on {config.host}:{config.port}: {exc}")
    health_server = None
    if config.health_port is not None:
        try:
            health_server = await serve_health(server, config.health_host, config.health_port)
        except OSError as exc:
            await server.stop(0)
            return fail(str(exc))
    loading = asyncio.ensure_future(load_target(server, config))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        await stopped_while_loading(server, health_server, loading)
    stopping.cancel()
    try:
        loaded = loading.result()
    except Exception as exc:  # any failed load is one line and exit 2, never a traceback
        await server.stop(0)
        if health_server is not None:
            await health_server.stop(0)
        if isinstance(exc, ModelLoadError):
            return fail(str(exc))
        # Not foreseen (a bug, or a failure below transformers): its type and first line, and
        # the traceback in the log at DEBUG.
        log.debug("loading the target failed", exc_info=exc)
        return fail(f"{load_failure('target', config.target, exc)} (--log-level DEBUG logs the traceback)")
    print(
        f"gelato-edge: target {loaded.name} ({loaded.dtype}, {loaded.device}) listening on {config.host}:{port}",
        flush=True,
    )
    await stop.wait()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second one: no drain (Ctrl-C twice)
            loop.add_signal_handler(sig, _stop_now, sig)
    open_sessions = len(server.service.registry)
    say(
        f"gelato-edge: shutting down: health NOT_SERVING, {open_sessions} open session(s) get "
        f"{config.shutdown_grace_s:g} s to finish"
    )
    await server.stop(config.shutdown_grace_s)  # health NOT_SERVING at once, then the drain
    if health_server is not None:
        await health_server.stop(0)
    if not server.service.executor.wait_idle(MODEL_THREAD_EXIT_S):
        # A forward outlived the drain (a long prefill; its stream is cancelled already): the
        # interpreter would join the model thread at exit, past a container's stop timeout.
        _exit_now("gelato-edge: a forward is still running; exiting without waiting for it", 0)
    return 0


async def stopped_while_loading(server: EdgeServer, health_server: Any, loading: asyncio.Future[Any]) -> NoReturn:
    """SIGTERM or Ctrl-C while the target loads (a download, a big checkpoint): no session can be
    open yet, so stop serving at once and exit 0 without waiting for the load. The load runs on
    the model thread, which the interpreter would join at exit (minutes for a big checkpoint,
    longer than a container's stop timeout), hence `os._exit` once the servers are down."""
    say("gelato-edge: stopped while loading the target")
    loading.cancel()  # health stays NOT_SERVING: the load's result is never used
    await server.stop(0)
    if health_server is not None:
        await health_server.stop(0)
    sys.stdout.flush()
    os._exit(0)


def probe_address(host: str, port: int) -> str:
    """Where a probe on this host reaches a server bound to `host`:`port`: a wildcard bind through
    loopback, any other address as it is (an edge bound to one address only answers there)."""
    host = host.strip("[]")  # a bracketed IPv6 address, as --host takes it
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host_port(host, port)


async def serve_health(server: EdgeServer, host: str, port: int) -> Any:
    """A second gRPC server with only the edge's health service (same status), in plaintext."""
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    from gelato.edge.server import port_in_use

    if port_in_use(host, port):
        raise OSError(f"--health-port {port} on {host} is in use")
    from gelato.edge.auth import CheckOnly

    health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=[CheckOnly()])
    health_pb2_grpc.add_HealthServicer_to_server(server.health, health_server)
    try:
        bound = health_server.add_insecure_port(host_port(host, port))
    except RuntimeError:
        bound = 0
    if not bound:
        raise OSError(f"cannot serve health on {host}:{port}")
    await health_server.start()
    return health_server


# SIGTERMs and SIGINTs that came before `serve` put its handlers in place (importing torch and transformers
# takes seconds): as a container's PID 1 the default action is none, and a `docker stop` then
# waited for its SIGKILL while the edge went on to load and serve.
_EARLY_STOP: list[int] = []


def _stop_early(signum: int, frame: object) -> None:
    _EARLY_STOP.append(signum)


def _release_ctrl_c() -> None:
    """SIGINT back to a KeyboardInterrupt, where `main` held it (the main thread)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _stop_early:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    """`_main` with SIGTERM and SIGINT kept from the start (`_EARLY_STOP`; a Ctrl-C there was a
    KeyboardInterrupt traceback, exit 130); the handlers before are put back."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return _main(argv)
    _EARLY_STOP.clear()
    previous = {sig: signal.signal(sig, _stop_early) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = EdgeConfig.from_args(args)
    setup_logging(config.log_level, config.log_format)
    try:
        config.validate()
    except ConfigError as exc:
        return fail(parser.explain(str(exc)))
    if args.health_check is not None:
        _release_ctrl_c()  # a probe, not a server: Ctrl-C stops it as it stops any command
        alone = config.health_port is not None  # health on its own port, else on the main one
        host = config.health_host if alone else config.host
        probed = config.health_port or config.port
        if not args.health_check and probed == 0:  # 0 served a free port, which no setting names
            return fail(parser.explain("--health-check without an address needs the --port the edge serves, not 0"))
        address = args.health_check or probe_address(host, probed)
        tls = bool(config.tls_cert) and not args.health_check and config.health_port is None
        try:
            return health_check(address, config.health_check_timeout_s, tls)
        except KeyboardInterrupt:
            return 130  # as a shell reports Ctrl-C, without a traceback
    try:
        config = with_security(config)
    except ConfigError as exc:
        return fail(parser.explain(str(exc)))
    risk = exposure(config)
    if risk is not None:
        # Accepted only through --insecure: said at every start, naming the variable if it came
        # from one (a GELATO_EDGE_INSECURE left exported would otherwise pass unnoticed).
        why = parser.explain("--insecure")
        say(f"gelato-edge: warning: serving {config.host} {risk[0]} ({why}): {risk[1]}")
    for name, host, port in (("metrics", config.metrics_host, config.metrics_port),
                             ("health", config.health_host, config.health_port)):  # fmt: skip
        if host != "127.0.0.1" and port is None:  # the port turns that server on: an address alone serves nothing
            warning = f"gelato-edge: warning: --{name}-host {host} without --{name}-port serves nothing"
            say(parser.explain(warning))
    if config.metrics_port is not None and not is_loopback(config.metrics_host):
        # Asked for (a scraper outside the host), but never guarded: said at every start, as --insecure is.
        where = host_port(config.metrics_host, config.metrics_port)
        note = f"gelato-edge: warning: metrics on {where} (--metrics-host) are plaintext and need no token: "
        say(parser.explain(note + "anyone who reaches that port reads this edge's load (sessions, batches, tokens)"))
    setup_torch_threads(config.threads)
    return asyncio.run(serve(config))


def exposure(config: EdgeConfig) -> tuple[str, str] | None:
    """What an exposed (non-loopback) edge lacks, as (what, so what); None when it serves loopback
    or TLS that knows its callers: a token (`auth_token`, read) or client certificates signed by
    `--tls-client-ca` (mutual TLS)."""
    if is_loopback(config.host):
        return None
    if config.tls_cert and (config.auth_token or config.tls_client_ca):
        return None
    if config.tls_cert:
        return "with TLS but without a token or client certificates", "anyone who reaches the port can use this edge"
    if config.auth_token:
        return "without TLS", "its devices' bearer token crosses the network in plaintext"
    return "without TLS and a token", "anyone who reaches the port can use this edge"


def with_security(config: EdgeConfig) -> EdgeConfig:
    """Check the TLS/token settings (reading the files now, so a bad path costs no model load: a
    certificate file without a certificate, a key not belonging to its certificate, a client CA
    without a certificate, a token file that is not one RFC 6750 word) and refuse an exposed port
    without them (`exposure`); returns the config with `auth_token` read from its file. Raises ConfigError."""
    config.validate()  # the TLS files' pairing among the rest
    token = None
    try:
        if config.tls_cert and config.tls_key:
            server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        if config.auth_token_file:
            token = read_token(config.auth_token_file)
    except SecurityConfigError as exc:
        raise ConfigError(str(exc)) from exc
    risk = exposure(dataclasses.replace(config, auth_token=token))
    if risk is not None and not config.insecure:
        raise ConfigError(
            f"refusing to serve {config.host} {risk[0]}: {risk[1]}; pass --tls-cert/--tls-key with "
            "--auth-token-file or --tls-client-ca, or --insecure to accept that"
        )
    return dataclasses.replace(config, auth_token=token)


if __name__ == "__main__":
    raise SystemExit(main())
