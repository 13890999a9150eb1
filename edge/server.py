"""The edge's gRPC server: the Gelato service (`gelato.edge.service`), health, reflection.

Contract: `EdgeServer.start()` binds and serves immediately with health NOT_SERVING (a port some
other process listens on raises `PortInUseError`: no SO_REUSEPORT sharing); `load(...)` loads the
target off the event loop and flips health to SERVING. `EdgeServer` refuses a config that names a
token file whose token was not read. How the service answers bad input: `gelato.edge.service`.

Shutdown (`EdgeServer.stop(grace_s)`): health turns NOT_SERVING and new calls are refused at once;
open sessions are served as usual for `grace_s`. Then the edge itself ends every Session stream
still open with UNAVAILABLE `SHUTDOWN_DETAILS` (`gelato.edge.service`), at a moment its device is
waiting for the edge, not writing: the device's next message is answered with that status instead
of being served, a verdict being computed is replaced by it, and a stream whose device has sent
nothing for `SETTLE_S` since its last answer (a silent device) is ended then; gRPC cancels
whatever is still open (other services' calls, a stuck forward, an answer a stalled device does
not read) `SETTLE_S + BACKSTOP_S` after the grace period. Why not leave it all to gRPC:
`server.stop(grace)` cancels the calls at the deadline whatever the device is doing, and a grpc.aio
client whose write is in flight when its call ends reports INTERNAL "Internal error from Core" (its
failed send) instead of the server's status, so a device in mid-write could not tell a shutdown
(fail over) from a fault. A device that writes without waiting for its answer
(send-ahead), or thinks for longer than `SETTLE_S` and writes just as it is ended, can still
meet that race (the device client reads that INTERNAL as UNAVAILABLE and fails over).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gelato.channel import SERVER_OPTIONS, host_port
from gelato.config import ConfigError
from gelato.edge.auth import BearerAuth
from gelato.edge.config import EdgeConfig
from gelato.edge.endless import ENDLESS_METHODS, ENDLESS_SETTLE_S, MAX_ENDLESS_STREAMS, EdgeHealth, StreamCap
from gelato.edge.pool_cache import pool_model
from gelato.edge.pool_check import check_pool
from gelato.edge.service import BACKSTOP_S, SERVICE_NAME, SETTLE_S, GelatoService
from gelato.models import LoadedModel, load_model
from gelato.security import server_credentials

log = logging.getLogger("gelato.edge")
# gRPC's default lets a second server bind a port another one listens on (SO_REUSEPORT): two edges
# would then split the connections between them. One edge per port.
EDGE_SERVER_OPTIONS = [*SERVER_OPTIONS, ("grpc.so_reuseport", 0)]


class PortInUseError(OSError):
    """Another socket already listens on the edge's port."""


def port_in_use(host: str, port: int) -> bool:
    """Whether HOST:PORT is taken by a listening socket, probed as gRPC binds (SO_REUSEADDR, so a
    port left in TIME_WAIT counts as free). Other bind failures are not this function's to name."""
    if port == 0:
        return False
    try:
        addrs = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _, addr in addrs:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


class EdgeServer:
    """Owns the grpc.aio server, the health servicer and the Gelato service."""

    def __init__(self, config: EdgeConfig) -> None:
        """Raises ConfigError for settings that break a rule (`EdgeConfig.validate`) and for a token
        file whose token was not read (`gelato.edge.cli.with_security` reads it): an embedder's
        config then fails closed instead of serving without the token it names."""
        config.validate()
        if config.auth_token_file and not config.auth_token:
            raise ConfigError(
                f"--auth-token-file {config.auth_token_file} is set but no token was read from it: "
                "pass the config through gelato.edge.cli.with_security"
            )
        self.config = config
        self.service = GelatoService(config)
        self.health = EdgeHealth()
        # The token first: a caller without it is refused before it could take a stream's place.
        self.stream_cap = StreamCap(ENDLESS_METHODS, MAX_ENDLESS_STREAMS)
        interceptors: list[grpc.aio.ServerInterceptor] = [BearerAuth(config.auth_token)] if config.auth_token else []
        self.server = grpc.aio.server(options=EDGE_SERVER_OPTIONS, interceptors=[*interceptors, self.stream_cap])
        self.port = 0

    async def start(self) -> int:
        host, port = self.config.host, self.config.port
        if port_in_use(host, port):  # checked first: gRPC would also log its own bind error
            raise PortInUseError(f"port {port} on {host} is in use")
        self.server.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = self._bind(host_port(host, port))
        except RuntimeError:  # gRPC >= 1.6x raises where older versions returned 0
            self.port = 0
        if self.port == 0:
            if port_in_use(host, port):  # taken between the check above and the bind
                raise PortInUseError(f"port {port} on {host} is in use")
            tls = " (or gRPC refused --tls-cert/--tls-key/--tls-client-ca)" if self.config.tls_cert else ""
            raise OSError(f"cannot bind {host}:{port}{tls}")
        await self.server.start()
        self.service.batcher.start()
        return self.port

    def _bind(self, address: str) -> int:
        c = self.config
        if c.tls_cert and c.tls_key:
            return self.server.add_secure_port(address, server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca))
        return self.server.add_insecure_port(address)

    async def load(self, target: str | None, dtype: str, device: str) -> LoadedModel:
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(self.service.executor, load_model, target, "target", dtype, device)
        return await self.serve_loaded(loaded)

    async def serve_loaded(self, loaded: LoadedModel) -> LoadedModel:
        """Serve a target loaded on the model thread: as the pool serves it (`pool_model`), once the
        load-time probe passed (`check_pool`, ModelLoadError otherwise); health then SERVING."""
        loaded = pool_model(loaded)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.service.executor, check_pool, loaded)
        await loop.run_in_executor(self.service.executor, self.service.registry.prepare, loaded)
        self.service.loaded = loaded
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return loaded

    async def _set_health(self, status: int) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING and no new calls at once, open sessions get `grace_s`, then each is
        ended UNAVAILABLE (`GelatoService.end_streams`); gRPC cancels any other call left
        `SETTLE_S + BACKSTOP_S` after the grace period."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        core = asyncio.ensure_future(self.server.stop(grace_s + SETTLE_S + BACKSTOP_S))  # refuses new calls now
        try:
            await self.service.end_streams(grace_s)
        finally:
            # Health watchers have had NOT_SERVING (written at once, well within this wait); their
            # streams, and reflection's, never end on their own: ended here, not at gRPC's backstop.
            await asyncio.sleep(ENDLESS_SETTLE_S)
            self.stream_cap.end_all()
            await core
        await self.service.batcher.stop()
        self.service.executor.shutdown(wait=False)
