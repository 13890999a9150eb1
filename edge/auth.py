"""Bearer-token check for every edge call except a health check.

Contract: `BearerAuth(token)` is a `grpc.aio.ServerInterceptor`; a call whose `authorization`
metadata is not `Bearer <token>` (constant-time comparison) ends at once with UNAUTHENTICATED and
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


def _denying(handler: grpc.RpcMethodHandler, refuse: Callable[..., Awaitable[None]] = _deny) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only refuses (`refuse`)."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


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
        if handler is None:
            # No such method. Behind a token it is refused all the same (UNIMPLEMENTED would tell a
            # caller without the token which methods exist; a stream handler reads no request
            # first); the health-only port holds no secret and says it has no such method.
            return grpc.stream_stream_rpc_method_handler(self.refuse) if self.hides_methods else None
        return _denying(handler, self.refuse)


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
