"""Bearer-token check for every edge call except a health check.

Contract: `BearerAuth(token)` is a `grpc.aio.ServerInterceptor`; a call whose `authorization`
metadata is not `Bearer <token>` (constant-time comparison) ends at once, before any request is
read, with UNAUTHENTICATED and
never reaches the service, whatever its kind (unary or streaming), nor learns whether the method
exists (a method the edge lacks is refused the same). Health's `Check` stays open so
that container and load-balancer checks work without the token; its `Watch` stream does not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from gelato.security import OPEN_METHODS, token_matches

DENIED = "missing or wrong bearer token: the edge needs the token of its --auth-token-file"


async def _deny(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


ONLY_CHECK = "this port serves grpc.health.v1.Health/Check only (Watch and the rest: the main port, with the token)"


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, ONLY_CHECK)


class _Gate(grpc.aio.ServerInterceptor):
    """Serves the open methods (health's `Check`) and what `allows` lets through; refuses the rest
    with `refuse`, whatever the call's kind."""

    refuse: Callable[..., Awaitable[None]] = staticmethod(_deny)
    hides_methods = False  # refuse methods that do not exist as those that do

    def allows(self, details: grpc.HandlerCallDetails) -> bool:
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method in OPEN_METHODS or self.allows(details):
            return handler
        if handler is None and not self.hides_methods:
            return None  # the health-only port holds no secret: it says it has no such method
        # Refused as a stream, whatever the method's kind: a stream handler reads no request first
        # (a unary-request one would wait for its message, so a caller that never sends it would
        # hold the call open, and learn from that which methods exist: an unknown one is refused
        # all the same behind a token, not UNIMPLEMENTED).
        return grpc.stream_stream_rpc_method_handler(self.refuse)


class CheckOnly(_Gate):
    """For the plaintext health-only port (`--health-port`): `Check` is served, anything else (a
    never-ending `Watch` stream that anyone reaching the port could open in any number) is
    refused PERMISSION_DENIED."""

    refuse = staticmethod(_refuse)


class BearerAuth(_Gate):
    hides_methods = True

    def __init__(self, token: str) -> None:
        self.token = token

    def allows(self, details: grpc.HandlerCallDetails) -> bool:
        return token_matches(details.invocation_metadata, self.token)
